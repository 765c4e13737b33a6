/*
 * The init of a namespaced instance: `ten __tenement_init -- APP ARGS...`.
 *
 * The namespace runtime (runtimes/namespace.lua) clones `ten` itself as
 * PID 1 of the instance's new PID namespace, and main() hands over to
 * tn_init_main before any Lua state exists: plain C, a small fresh process.
 * An app as PID 1 would be a poor init: the kernel drops every signal it has
 * no handler for (a plain `sleep` ignores SIGTERM there), and orphans would
 * pile up as zombies nobody reaps. So the init:
 *   - forks the app, which becomes PID 2, in its own process group;
 *   - forwards SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1 and SIGUSR2 to that
 *     group, so the app's own children get them too (the supervisor signals
 *     the init's group, which holds only the init);
 *   - reaps every process that ends in the namespace (orphans are reparented
 *     to PID 1);
 *   - when the app exits, SIGKILLs whatever is left in the namespace, reaps
 *     it, and exits with the app's status: its exit code, or 128 + the
 *     signal that killed it. PID 1 cannot pass a death by signal on by
 *     raising the signal on itself (the kernel ignores it for an init), so
 *     128 + n it is, the shells' convention: SIGKILL gives 137.
 * Its own failures: 125 (bad usage, fork failed); the app not found, 127;
 * found but not runnable, 126, each with one line on stderr.
 *
 * Run by hand outside a PID namespace (it is not PID 1), it still forwards
 * and reaps, as a child subreaper, but kills only the app's process group at
 * the end: kill(-1) there would be every process of the machine.
 */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

int tn_init_main(int argc, char **argv);

#define INIT_ARG "__tenement_init"
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

int tn_init_main(int argc, char **argv) {
    int first = 2;
    if (first < argc && strcmp(argv[first], "--") == 0) first++;
    if (first >= argc) {
        fprintf(stderr, "usage: %s " INIT_ARG " -- COMMAND [ARG...]\n"
                        "(the init of namespaced instances; tenement runs it itself)\n",
                argc > 0 ? argv[0] : "ten");
        return EXIT_INIT_FAILED;
    }
    int pid1 = getpid() == 1;
    if (!pid1) prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);

    /* Blocked, then taken with sigwaitinfo: no handler runs, nothing races
     * the fork, and a signal that arrives before the app exists waits for
     * it. (For PID 1 a blocked signal is queued even without a handler.) */
    sigset_t set, old;
    sigemptyset(&set);
    for (size_t i = 0; i < sizeof forwarded / sizeof forwarded[0]; i++) sigaddset(&set, forwarded[i]);
    sigaddset(&set, SIGCHLD);
    sigprocmask(SIG_BLOCK, &set, &old);

    pid_t app = fork();
    if (app < 0) {
        fprintf(stderr, "ten init: fork: %s\n", strerror(errno));
        return EXIT_INIT_FAILED;
    }
    if (app == 0) {
        setpgid(0, 0);
        sigprocmask(SIG_SETMASK, &old, NULL);
        execvp(argv[first], argv + first);
        int err = errno;
        fprintf(stderr, "ten init: cannot run %s: %s\n", argv[first], strerror(err));
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
            fprintf(stderr, "ten init: sigwaitinfo: %s\n", strerror(errno));
            kill(-app, SIGKILL);
            return EXIT_INIT_FAILED;
        }
        if (sig == SIGCHLD) {
            reap(app, &app_status, &app_done);
        } else if (kill(-app, sig) != 0) {
            kill(app, sig); /* the app left its group: it alone, then */
        }
    }

    if (pid1) {
        /* Every process of the namespace but us. Nothing can outlive the
         * app: the kernel would kill it when we exit anyway, but then
         * after our status is out, racing whoever restarts the instance. */
        kill(-1, SIGKILL);
        while (waitpid(-1, NULL, 0) > 0 || errno == EINTR) {}
    } else {
        kill(-app, SIGKILL);
        int dummy = 0, done = 0;
        reap(app, &dummy, &done);
    }
    return status_code(app_status);
}
