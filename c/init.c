/*
 * The init of a namespaced instance: PID 1 of its PID namespace.
 *
 * Built twice from this one file:
 *   - alone (TN_INIT_ALONE), static and against musl, as `tenement-init`:
 *     the Makefile embeds its bytes in `ten` and in core.so, core.proc.init_fd
 *     puts them in a sealed memfd once per process, and the namespace
 *     runtime (runtimes/namespace.lua) execs that fd in the instance's new
 *     namespaces as `tenement-init -- APP ARGS...`. No second file to
 *     install, and a start that costs a fraction of ten's: no dynamic
 *     loader, no relocations, no libcrypto constructor, and none of glibc's
 *     start-up cpuid queries, each a trap to the hypervisor on a VM. (Run as
 *     PID 1, ten took about 2 ms to get to the app; this, about 0.1 ms.)
 *   - into `ten`, where main() hands `ten __tenement_init -- APP ARGS...`
 *     over to tn_init_main before any Lua state exists: the same init, for
 *     a run by hand.
 *
 * An app as PID 1 would be a poor init: the kernel drops every signal it has
 * no handler for (a plain `sleep` ignores SIGTERM there), and orphans would
 * pile up as zombies nobody reaps. So the init:
 *   - forks the app, which becomes PID 2, in its own process group;
 *   - forwards SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1 and SIGUSR2 to that
 *     group, so the app's own children get them too (the supervisor signals
 *     the init's group, which holds only the init);
 *   - reaps every process that ends in the namespace (orphans are reparented
 *     to PID 1);
 *   - when the app exits, exits with the app's status; the kernel reports
 *     that exit only once it has SIGKILLed and reaped whatever was left in
 *     the namespace. The status is the app's exit code, or 128 + the signal
 *     that killed it: PID 1 cannot pass a death by signal on by raising the
 *     signal on itself (the kernel ignores it for an init), so 128 + n it
 *     is, the shells' convention: SIGKILL gives 137. That alone cannot tell
 *     an app SIGKILLed from one that exited 137, so with --status-fd N the
 *     init first writes the app's wait status (an int) to fd N, which
 *     core.proc's spec.status_pipe reads to report the signal itself.
 *     Not PID 1, the init dies of the app's signal as it can.
 * Its own failures: 125 (bad usage, fork failed); the app not found, 127;
 * found but not runnable, 126, each with one line on stderr.
 *
 * Run by hand outside a PID namespace (it is not PID 1), it still forwards
 * and reaps, as a child subreaper, and SIGKILLs the app's process group at
 * the end (no namespace ends with it to take the rest along).
 *
 * Only libc calls that musl and glibc both have, and no tenement header: the
 * alone build has neither Lua nor libuv.
 */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

int tn_init_main(int argc, char **argv, int first);

#define EXIT_INIT_FAILED 125

static const int forwarded[] = {SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2};

static int status_code(int status) {
    if (WIFEXITED(status)) return WEXITSTATUS(status);
    if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
    return EXIT_INIT_FAILED;
}

/* Reap whatever has ended; note the app's status when it is among them. */
static void reap(pid_t app, int *app_status, int *app_done) {
    int status;
    pid_t pid;
    while ((pid = waitpid(-1, &status, WNOHANG)) > 0 || (pid < 0 && errno == EINTR)) {
        if (pid == app) {
            *app_status = status;
            *app_done = 1;
        }
    }
}

/* argv[0 .. first-1] name the init itself (`ten __tenement_init`, or
 * `tenement-init`); from argv[first] on: [--] COMMAND [ARG...]. */
int tn_init_main(int argc, char **argv, int first) {
    int self_words = first;
    int status_fd = -1;
    if (first + 1 < argc && strcmp(argv[first], "--status-fd") == 0) {
        status_fd = atoi(argv[first + 1]);
        first += 2;
        self_words += 2;
    }
    if (first < argc && strcmp(argv[first], "--") == 0) first++;
    if (first >= argc) {
        fputs("usage:", stderr);
        for (int i = 0; i < self_words && i < argc; i++) fprintf(stderr, " %s", argv[i]);
        fputs(" -- COMMAND [ARG...]\n(the init of namespaced instances; tenement runs it itself)\n", stderr);
        return EXIT_INIT_FAILED;
    }
    int pid1 = getpid() == 1;
    if (!pid1) prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);

    /* Blocked, then taken with sigwaitinfo: no handler runs, nothing races
     * the fork, and a signal that arrives before the app exists waits for
     * it. (For PID 1 a blocked signal is queued even without a handler;
     * one sent before this line is dropped, so the namespace runtime has us
     * start with them blocked already.) */
    sigset_t set, old;
    sigemptyset(&set);
    for (size_t i = 0; i < sizeof forwarded / sizeof forwarded[0]; i++) sigaddset(&set, forwarded[i]);
    sigaddset(&set, SIGCHLD);
    sigprocmask(SIG_BLOCK, &set, &old);

    pid_t app = fork();
    if (app < 0) {
        fprintf(stderr, "tenement-init: fork: %s\n", strerror(errno));
        return EXIT_INIT_FAILED;
    }
    if (app == 0) {
        setpgid(0, 0);
        if (status_fd >= 0) close(status_fd);
        /* what we forward, the app must be able to take, blocked as we
         * may have been given them */
        for (size_t i = 0; i < sizeof forwarded / sizeof forwarded[0]; i++) sigdelset(&old, forwarded[i]);
        sigdelset(&old, SIGCHLD);
        sigprocmask(SIG_SETMASK, &old, NULL);
        execvp(argv[first], argv + first);
        int err = errno;
        fprintf(stderr, "tenement-init: cannot run %s: %s\n", argv[first], strerror(err));
        _exit(err == ENOENT || err == ENOTDIR ? 127 : 126);
    }
    /* Also here, so the group exists before the first forwarded signal,
     * whichever of the two runs first. */
    setpgid(app, app);

    int app_status = 0, app_done = 0;
    while (!app_done) {
        siginfo_t si;
        int sig = sigwaitinfo(&set, &si);
        if (sig < 0) {
            if (errno == EINTR) continue;
            fprintf(stderr, "tenement-init: sigwaitinfo: %s\n", strerror(errno));
            kill(-app, SIGKILL);
            return EXIT_INIT_FAILED;
        }
        if (sig == SIGCHLD) {
            reap(app, &app_status, &app_done);
        } else if (kill(-app, sig) != 0) {
            kill(app, sig); /* the app left its group: it alone, then */
        }
    }

    /* As PID 1, nothing to do: when we exit, the kernel SIGKILLs every
     * process left in the namespace and waits until all are reaped before
     * our exit is reported (zap_pid_ns_processes), so nothing outlives our
     * status. It walks only the namespace's pids, where a kill(-1) from here
     * would walk every process of the host. */
    if (!pid1) {
        kill(-app, SIGKILL);
        int dummy = 0, done = 0;
        reap(app, &dummy, &done);
    }
    if (status_fd >= 0) {
        ssize_t n = write(status_fd, &app_status, sizeof app_status);
        (void)n; /* nobody reading: the exit code is all there is */
        close(status_fd);
    }
    if (!pid1 && WIFSIGNALED(app_status)) {
        /* our own core would be mistaken for the app's */
        struct rlimit nocore = {0, 0};
        setrlimit(RLIMIT_CORE, &nocore);
        int sig = WTERMSIG(app_status);
        signal(sig, SIG_DFL);
        sigset_t just;
        sigemptyset(&just);
        sigaddset(&just, sig);
        sigprocmask(SIG_UNBLOCK, &just, NULL);
        kill(getpid(), sig);
    }
    return status_code(app_status);
}

#ifdef TN_INIT_ALONE
#include <dirent.h>
#include <fcntl.h>
#include <limits.h>
#include <time.h>

/* ---- the keeper ----------------------------------------------------------
 * `tenement-keeper --keep TEN_PID CGROUP_DIR...`: what ten serve starts
 * beside itself (lua/tenement/keeper.lua) so that nothing its instances
 * forked outlives it. It sleeps until ten is gone (a parent-death SIGTERM,
 * or its parent is no longer ten), then SIGKILLs every process in the trees
 * of the server's instance cgroups until they stay empty, removes those
 * cgroups and exits; what it could not remove, the next ten serve on that
 * data directory does (cgroup.cleanup_stale). It lives
 * in this tiny static binary rather than in ten so that the keeper of every
 * server costs some kilobytes instead of a Lua state and ten's pages. Its
 * stdin is the server's lock file, held until it exits. */

/* SIGKILLs what dir's tree holds; -> how many processes were listed. */
static int kill_tree(const char *dir, int depth) {
    char path[PATH_MAX];
    int n = 0;
    if (depth == 0) {
        /* cgroup2 takes the whole subtree at once, forks in flight too */
        snprintf(path, sizeof path, "%s/cgroup.kill", dir);
        int fd = open(path, O_WRONLY | O_CLOEXEC);
        if (fd >= 0) {
            if (write(fd, "1", 1) < 0) { /* v1, or not allowed: the loop below */ }
            close(fd);
        }
    }
    snprintf(path, sizeof path, "%s/cgroup.procs", dir);
    FILE *f = fopen(path, "re");
    if (f) {
        int pid;
        while (fscanf(f, "%d", &pid) == 1) {
            if (pid > 0) kill(pid, SIGKILL);
            n++;
        }
        fclose(f);
    }
    if (depth > 32) return n;
    DIR *d = opendir(dir);
    if (!d) return n;
    struct dirent *e;
    while ((e = readdir(d))) {
        if (e->d_type != DT_DIR || e->d_name[0] == '.') continue;
        snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
        n += kill_tree(path, depth + 1);
    }
    closedir(d);
    return n;
}

/* rmdir dir's tree, deepest first (a cgroup goes only once its children
 * have). A cgroup whose last process is still exiting stays busy for a
 * moment: retried for about 2 s. -> how many cgroups are left. */
static int remove_tree(const char *dir, int depth) {
    char path[PATH_MAX];
    int left = 0;
    DIR *d = depth > 32 ? NULL : opendir(dir);
    if (d) {
        struct dirent *e;
        while ((e = readdir(d))) {
            if (e->d_type != DT_DIR || e->d_name[0] == '.') continue;
            snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
            left += remove_tree(path, depth + 1);
        }
        closedir(d);
    }
    for (int tries = 0; tries < 200; tries++) {
        if (rmdir(dir) == 0 || errno == ENOENT) return left;
        if (errno != EBUSY) break;
        struct timespec pause = {0, 10 * 1000 * 1000};
        nanosleep(&pause, NULL);
    }
    return left + 1;
}

static int keeper_main(int argc, char **argv) {
    if (argc < 4) {
        fputs("usage: tenement-keeper --keep TEN_PID CGROUP_DIR... (ten serve runs it itself)\n", stderr);
        return EXIT_INIT_FAILED;
    }
    pid_t ten = (pid_t)atol(argv[2]);
    prctl(PR_SET_NAME, "tenement-keeper", 0, 0, 0);
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGHUP);
    sigprocmask(SIG_BLOCK, &set, NULL);
    /* a SIGTERM while ten lives (someone else's) changes nothing, and the
     * parent is looked at now and then in case the signal was missed */
    while (getppid() == ten) {
        struct timespec ts = {10, 0};
        sigtimedwait(&set, NULL, &ts);
    }
    int killed = 0, left = 0;
    for (int round = 0; round < 500; round++) { /* about 5 s at most */
        left = 0;
        for (int i = 3; i < argc; i++) left += kill_tree(argv[i], 0);
        if (left == 0) break;
        killed = 1;
        struct timespec pause = {0, 10 * 1000 * 1000};
        nanosleep(&pause, NULL);
    }
    if (killed)
        fprintf(stderr, "tenement-keeper: ten serve (pid %ld) is gone: %s\n", (long)ten,
                left ? "some processes in its instance cgroups would not die" :
                       "killed what was left in its instance cgroups");
    if (left) return 1;
    /* Emptied, the cgroups go too, the bases with them: a server whose data
     * directory never serves again (retired, a test's) would otherwise
     * leave them for good, each one kernel memory. A ten that starts next
     * on this data directory waits for us (the lock), so none is its. */
    int kept = 0;
    for (int i = 3; i < argc; i++) kept += remove_tree(argv[i], 0);
    if (kept) fprintf(stderr, "tenement-keeper: %d of the instance cgroups of ten serve (pid %ld) could not be "
                      "removed; the next start on its data directory removes them\n", kept, (long)ten);
    return 0;
}

int main(int argc, char **argv) {
    if (argc > 1 && strcmp(argv[1], "--keep") == 0) return keeper_main(argc, argv);
    /* Exec'd from a memfd, the kernel names the process after the memfd
     * ("memfd:tenement-", cut to 15 bytes) or after the fd's number: give
     * ps in the instance a name that says what PID 1 is. */
    prctl(PR_SET_NAME, "tenement-init", 0, 0, 0);
    return tn_init_main(argc, argv, 1);
}
#endif
