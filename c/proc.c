/*
 * core.proc: spawning and watching child processes. Mechanism only: when to
 * restart, how long to wait before SIGKILL, what environment to give are Lua
 * policy (the supervisor and the runtime drivers).
 *
 * Spawning. Not fork(): the server's memory grows with its instances, and
 * fork copies page tables in proportion. We clone(2) with CLONE_VM |
 * CLONE_VFORK on a separately mapped stack, as glibc's posix_spawn does: the
 * child runs in our memory while this thread is suspended, until it calls
 * execve or _exit. So the child may only make async-signal-safe system calls
 * on data prepared beforehand (argv, envp, the resolved path: no malloc, no
 * stdio, no locks), and all signals are blocked around the clone so no
 * handler of ours runs in the child. CLONE_PIDFD gives a pidfd atomically, so
 * no pid is ever looked up again after the clone.
 *
 * A failing step in the child (chdir, setuid, exec, ...) records its stage
 * and errno in the argument block it shares with us and exits with 127; we
 * read the block when clone returns, which vfork semantics place after the
 * child's exec or exit. (glibc's posix_spawn reports errors the same way; a
 * CLOEXEC pipe would cost three more system calls and the fd juggling that
 * comes with them, for the same information.)
 *
 * Watching. Each child's pidfd is polled with a uv_poll_t: it turns readable
 * when the child exits, and waitid(P_PIDFD, WNOHANG) reaps exactly that
 * child. No SIGCHLD handler and no waitpid(-1): exactly one reaper per child,
 * and nothing else in the process (libuv's uv_spawn included) is disturbed.
 *
 * Lifetime. A process handle whose Lua side is closed or collected while the
 * child runs stays watched in C until the child exits, is reaped, and only
 * then freed: dropping a handle never leaks a pidfd or leaves a zombie. That
 * background watch is unref'd, so it does not keep the loop alive on its own.
 *
 * The parent-death signal (default SIGKILL) fires when the *thread* that
 * spawned the child ends, not the process: spawn from the loop's thread only.
 *
 * Namespaces. clone_flags put the child itself into new namespaces (with
 * newpid it is PID 1 there: the namespace runtime makes it the init of
 * c/init.c, which proc.init_fd serves from memory, run through exec_fd).
 * The child then sets the namespaces up before anything else: with newuser
 * it maps its own uid and gid to 0 (the single mapping an unprivileged
 * process may write for itself); mount_proc makes every mount private and
 * mounts a /proc of the new PID namespace; hostname names its UTS
 * namespace; loopback brings `lo` of its network namespace up. Then the
 * cgroups, rlimits and the credential change, as for any child.
 *
 * root walls the file system off: a tmpfs mounted on root.dir becomes the
 * child's /, holding only what root.mounts puts there (binds, read-only or
 * not, tmpfs, symlinks, in order, their mount points made as needed), its
 * /proc when mount_proc, and nothing of the host's else; the old / is
 * detached after pivot_root.
 * Which paths go in is the caller's policy (runtimes/namespace.lua).
 *
 * exec_fd runs the program behind an open fd (execveat with AT_EMPTY_PATH,
 * fexecve's system call) instead of a path: the child keeps that one fd
 * past the closing of ours, and exec closes it. argv[1] then only names the
 * program. A script cannot run that way (its interpreter would need the fd
 * by path, after exec closed it): ELF binaries only, which is what the init
 * is.
 *
 * status_pipe gives the child a pipe's write end as fd 3. The init, as PID 1,
 * cannot die of the signal that killed its app, so it writes the app's wait
 * status there before it exits, and that status is what wait reports: an
 * app SIGKILLed reads as killed by SIGKILL, not as the init's exit code 137.
 */
#include "tn.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <net/if.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/statvfs.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>
#include <linux/magic.h>
#include <linux/openat2.h>

extern char **environ;

#define PROC_MT "tenement.process"
#define PIPE_MT "tenement.pipe"

#define DEFAULT_PATH "/usr/local/bin:/usr/bin:/bin"
/* Enough for the child's few libc calls, with room for sanitizers; the pages
 * are reserved, not touched, so the size costs nothing. */
#define CHILD_STACK_SIZE (256 * 1024)
#define PIPE_READ_SIZE (64 * 1024)
#define MAX_RLIMITS 16
/* In the kernel since 6.3, in glibc's headers since 2.38. */
#ifndef MFD_EXEC
#define MFD_EXEC 0x0010U
#endif

/* ---- signal names ------------------------------------------------------ */

static const char *signal_name(int sig, char *buf, size_t size) {
    const char *abbr = sig > 0 ? sigabbrev_np(sig) : NULL;
    if (abbr) snprintf(buf, size, "SIG%s", abbr);
    else if (sig >= SIGRTMIN && sig <= SIGRTMAX) snprintf(buf, size, "SIGRTMIN+%d", sig - SIGRTMIN);
    else if (sig > 0 && sig < NSIG) snprintf(buf, size, "SIG%d", sig);
    else return NULL;
    return buf;
}

/* ---- the child --------------------------------------------------------- */

enum child_stage {
    ST_NONE, ST_SIGMASK, ST_SETSID, ST_SETPGID, ST_USERNS, ST_MOUNT_PRIVATE, ST_MOUNT_PROC,
    ST_HOSTNAME, ST_LOOPBACK, ST_NETNS, ST_CGROUP, ST_RLIMIT, ST_SETGROUPS, ST_SETGID, ST_SETUID,
    ST_PDEATHSIG, ST_PARENT, ST_NO_NEW_PRIVS, ST_CHDIR, ST_STDIO, ST_STATUS_FD, ST_CLOSE_FDS, ST_EXEC,
    ST_ROOT,
};

static const char *const stage_names[] = {
    "", "sigprocmask", "setsid", "setpgid", "user namespace id maps", "mount --make-rslave /",
    "mount proc on /proc", "sethostname", "bring up lo", "join the network namespace (setns)", "cgroup", "setrlimit", "setgroups", "setgid",
    "setuid", "prctl(PR_SET_PDEATHSIG)", "parent exited", "prctl(PR_SET_NO_NEW_PRIVS)",
    "chdir", "dup2", "dup2 the status pipe to fd 3", "close_range", "exec", "file system wall",
};

static const struct { const char *name; int resource; } rlimit_names[] = {
    {"as", RLIMIT_AS}, {"core", RLIMIT_CORE}, {"cpu", RLIMIT_CPU}, {"data", RLIMIT_DATA},
    {"fsize", RLIMIT_FSIZE}, {"locks", RLIMIT_LOCKS}, {"memlock", RLIMIT_MEMLOCK},
    {"msgqueue", RLIMIT_MSGQUEUE}, {"nice", RLIMIT_NICE}, {"nofile", RLIMIT_NOFILE},
    {"nproc", RLIMIT_NPROC}, {"rss", RLIMIT_RSS}, {"rtprio", RLIMIT_RTPRIO},
    {"rttime", RLIMIT_RTTIME}, {"sigpending", RLIMIT_SIGPENDING}, {"stack", RLIMIT_STACK},
    {NULL, 0},
};

static int rlimit_resource(lua_State *L, int idx) {
    const char *name = luaL_checkstring(L, idx);
    for (int i = 0; rlimit_names[i].name; i++)
        if (strcmp(name, rlimit_names[i].name) == 0) return rlimit_names[i].resource;
    return luaL_argerror(L, idx, lua_pushfstring(L, "unknown rlimit '%s'", name));
}

static void push_rlim(lua_State *L, rlim_t v) {
    if (v == RLIM_INFINITY) lua_pushliteral(L, "unlimited");
    else lua_pushinteger(L, (lua_Integer)v);
}

/* proc.rlimit(name [, soft [, hard]]) -> soft, hard (after setting, when
 * given) | nil, err, code: the server's own limits ("nofile", ...). */
static int l_proc_rlimit(lua_State *L) {
    int res = rlimit_resource(L, 1);
    struct rlimit lim;
    if (getrlimit(res, &lim) != 0) return tn_fail_errno(L, "getrlimit", errno);
    if (!lua_isnoneornil(L, 2)) {
        lim.rlim_cur = (rlim_t)luaL_checkinteger(L, 2);
        if (!lua_isnoneornil(L, 3)) lim.rlim_max = (rlim_t)luaL_checkinteger(L, 3);
        if (setrlimit(res, &lim) != 0) return tn_fail_errno(L, "setrlimit", errno);
    }
    push_rlim(L, lim.rlim_cur);
    push_rlim(L, lim.rlim_max);
    return 2;
}

static const struct { const char *name; int flag; } clone_flag_names[] = {
    {"newpid", CLONE_NEWPID}, {"newns", CLONE_NEWNS}, {"newipc", CLONE_NEWIPC},
    {"newuts", CLONE_NEWUTS}, {"newnet", CLONE_NEWNET}, {"newuser", CLONE_NEWUSER}, {NULL, 0},
};

/* One step of building a walled root (spec.root.mounts). */
enum root_kind { ROOT_BIND, ROOT_TMPFS, ROOT_SYMLINK };
struct root_op {
    int kind;
    const char *src;     /* bind: what (an absolute path with no link in it); symlink: its target */
    const char *where;   /* where it goes, as the app will see it */
    const char *data;    /* tmpfs: its options */
    int ro, is_file;
};
/* stage_arg of ST_ROOT outside the list of steps */
enum { ROOT_AT_TMPFS = -1, ROOT_AT_PROC = -2, ROOT_AT_PIVOT = -3, ROOT_AT_READONLY = -4 };

/* Everything the child needs, prepared by the parent. The child writes only
 * stage, err and stage_arg, and only when it fails, and ifr (the kernel's
 * answer to SIOCGIFFLAGS, which the parent never reads). */
struct child_args {
    const char *path;        /* or, with exec_fd, only the name for messages */
    int exec_fd;             /* -1: exec path */
    int status_fd;           /* -1, or the status pipe's write end, to become fd 3 */
    char *const *argv;
    char *const *envp;
    const char *cwd;
    int stdio[3];            /* fd to become 0, 1, 2; -1 leaves ours */
    int setsid;
    sigset_t mask;           /* the program's signal mask: spec.sigmask */
    int pdeathsig;
    pid_t parent_pid;
    int parent_pidfd;        /* only with CLONE_NEWPID, where getppid() is 0 */
    int userns;              /* CLONE_NEWUSER: write the id maps below */
    char uid_map[32], gid_map[32];
    size_t uid_map_len, gid_map_len;
    int mount_proc;
    const char *root_dir;    /* NULL, or where the walled root is built */
    const char *root_old;    /* root_dir + "/.oldroot" */
    const struct root_op *root_ops;
    int nroot_ops;
    const char *hostname;
    size_t hostname_len;
    int loopback;
    struct ifreq ifr;
    int netns_fd;            /* -1, or a network namespace to join */
    const int *cgroup_fds;
    int ncgroup_fds;
    int cgroup_into;         /* -1, or a cgroup2 directory to be born into */
    int into_done;           /* clone3 put the child there already */
    struct { int resource; struct rlimit lim; } rlimits[MAX_RLIMITS];
    int nrlimits;
    int set_groups;
    const gid_t *groups;
    size_t ngroups;
    int set_gid;
    gid_t gid;
    int set_uid;
    uid_t uid;
    int no_new_privs;
    int stage, err, stage_arg;
};

/* The child runs on a stack the sanitizers know nothing about, and must not
 * call into their runtime (it would print from the child, or unpoison the
 * parent's stack on _exit). */
#define CHILD_CODE __attribute__((no_sanitize_address, no_sanitize_undefined, noinline))

CHILD_CODE __attribute__((noreturn))
static void child_fail(struct child_args *a, int stage, int arg) {
    a->stage = stage;
    a->err = errno ? errno : EINVAL;
    a->stage_arg = arg;
    _exit(127);
}

/* Write a whole small file; -1 with errno on failure. */
CHILD_CODE static int child_write(const char *path, const char *data, size_t len) {
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    ssize_t n = write(fd, data, len);
    int err = errno;
    close(fd);
    if (n == (ssize_t)len) return 0;
    errno = n < 0 ? err : EIO;
    return -1;
}

/* Close every fd from first up, except keep (the fd to exec, or -1). */
CHILD_CODE static int child_close_fds(unsigned first, int keep) {
    unsigned from = first;
    if (keep >= (int)first) {
        if (keep > (int)first && syscall(SYS_close_range, first, (unsigned)keep - 1, 0) != 0) goto one_by_one;
        first = (unsigned)keep + 1;
    }
    if (syscall(SYS_close_range, first, ~0U, 0) == 0) return 0;
one_by_one:
    if (errno != ENOSYS) return -1;
    struct rlimit nofile;
    rlim_t max = 65536;
    if (getrlimit(RLIMIT_NOFILE, &nofile) == 0 && nofile.rlim_cur < max) max = nofile.rlim_cur;
    for (rlim_t fd = from; fd < max; fd++) {
        if ((int)fd != keep) close((int)fd);
    }
    return 0;
}

/* Brings up lo of the caller's network namespace; ifr names it ("lo"),
 * filled by the caller (memset is the sanitizers' in the child). Raw ioctl:
 * their interceptor would touch its runtime from the child. -> 0 | -1 */
CHILD_CODE static int lo_up(struct ifreq *ifr) {
    int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (s < 0) return -1;
    int rc = (int)syscall(SYS_ioctl, s, SIOCGIFFLAGS, ifr);
    if (rc == 0) {
        ifr->ifr_flags |= IFF_UP | IFF_RUNNING;
        rc = (int)syscall(SYS_ioctl, s, SIOCSIFFLAGS, ifr);
    }
    int e = errno;
    close(s);
    errno = e;
    return rc;
}

/* An O_PATH fd of path (relative to dirfd), resolved without following a
 * symbolic link anywhere on the way, and with beneath never above dirfd.
 * The wall is built from paths an app may have written in (its instance
 * directory, its socket directory): a link it left there must not turn a
 * bind into one of the host's directories, nor a mount point into a place
 * outside the new root. -> fd | -1 */
CHILD_CODE static int child_open_path(int dirfd, const char *path, int beneath, int flags) {
    struct open_how how;
    how.flags = (uint64_t)(O_PATH | O_CLOEXEC | flags);
    how.mode = 0;
    how.resolve = RESOLVE_NO_SYMLINKS | (beneath ? RESOLVE_BENEATH : 0);
    return (int)syscall(SYS_openat2, dirfd, path, &how, sizeof how);
}

/* "/proc/self/fd/N" into buf (at least 32 bytes): how mount(2) is handed an
 * fd, without the sanitizers' formatting in the child. */
CHILD_CODE static const char *fd_path(char *buf, int fd) {
    static const char prefix[] = "/proc/self/fd/";
    size_t n = 0;
    for (; prefix[n]; n++) buf[n] = prefix[n];
    char digits[12];
    int d = 0;
    do { digits[d++] = (char)('0' + fd % 10); fd /= 10; } while (fd > 0);
    while (d > 0) buf[n++] = digits[--d];
    buf[n] = '\0';
    return buf;
}

CHILD_CODE static void close_keep_errno(int fd) {
    int e = errno;
    close(fd);
    errno = e;
}

/* The place rel (a relative path) names under root_fd, made as it goes:
 * directories, and with is_file an empty file last (one already there
 * stays as it is). upto_parent stops at its directory and leaves the last
 * name in *last. -> O_PATH fd | -1 */
CHILD_CODE static int child_make_beneath(int root_fd, const char *rel, int is_file, int upto_parent,
                                         const char **last) {
    int cur = child_open_path(root_fd, ".", 1, O_DIRECTORY);
    if (cur < 0) return -1;
    const char *p = rel;
    while (*p) {
        size_t n = 0;
        while (p[n] && p[n] != '/') n++;
        int final = p[n] == '\0';
        if (final && upto_parent) {
            *last = p;
            return cur;
        }
        char part[NAME_MAX + 1];
        if (n > NAME_MAX) { close(cur); errno = ENAMETOOLONG; return -1; }
        for (size_t i = 0; i < n; i++) part[i] = p[i];
        part[n] = '\0';
        if (n > 0) {
            if (final && is_file) {
                /* read-only: a file of a read-only bind may be there already */
                int f = openat(cur, part, O_RDONLY | O_CREAT | O_NOFOLLOW | O_CLOEXEC, 0644);
                if (f < 0) { close_keep_errno(cur); return -1; }
                close(f);
            } else if (mkdirat(cur, part, 0755) != 0 && errno != EEXIST) {
                close_keep_errno(cur);
                return -1;
            }
            int next = child_open_path(cur, part, 1, final && is_file ? 0 : O_DIRECTORY);
            close_keep_errno(cur);
            if (next < 0) return -1;
            cur = next;
        }
        p += n + (p[n] == '/');
    }
    return cur;
}

/* A bind made read-only with everything under it (mount_setattr, 5.12);
 * before that kernel, the top mount only. fd: the mount, as an O_PATH fd. */
CHILD_CODE static int child_readonly(int fd) {
#ifdef SYS_mount_setattr
    struct { uint64_t set, clr, propagation, userns_fd; } attr = {.set = 0x1 /* MOUNT_ATTR_RDONLY */};
    if (syscall(SYS_mount_setattr, fd, "", AT_EMPTY_PATH | 0x8000 /* AT_RECURSIVE */, &attr, sizeof attr) == 0)
        return 0;
    if (errno != ENOSYS) return -1;
#endif
    char path[32];
    struct statfs st; /* the raw call: the sanitizers intercept statfs */
    if (syscall(SYS_fstatfs, fd, &st) != 0) return -1;
    unsigned long keep = 0;
    if (st.f_flags & ST_NOSUID) keep |= MS_NOSUID;
    if (st.f_flags & ST_NODEV) keep |= MS_NODEV;
    if (st.f_flags & ST_NOEXEC) keep |= MS_NOEXEC;
    return mount(NULL, fd_path(path, fd), NULL, MS_REMOUNT | MS_BIND | MS_RDONLY | keep, NULL);
}

/* One step of the wall, below root_fd. -> 0 | -1 with errno */
CHILD_CODE static int child_root_op(int root_fd, const struct root_op *op) {
    const char *rel = op->where + 1;
    char src_path[32], dst_path[32];
    int dst, rc;
    switch (op->kind) {
    case ROOT_BIND: {
        int src = child_open_path(AT_FDCWD, op->src, 0, 0);
        if (src < 0) return -1;
        dst = child_make_beneath(root_fd, rel, op->is_file, 0, NULL);
        if (dst < 0) { close_keep_errno(src); return -1; }
        rc = mount(fd_path(src_path, src), fd_path(dst_path, dst), NULL, MS_BIND | MS_REC, NULL);
        close_keep_errno(src);
        close_keep_errno(dst);
        if (rc != 0 || !op->ro) return rc;
        /* the fd taken before names what the mount now covers: again */
        dst = child_open_path(root_fd, rel, 1, 0);
        if (dst < 0) return -1;
        rc = child_readonly(dst);
        close_keep_errno(dst);
        return rc;
    }
    case ROOT_TMPFS:
        dst = child_make_beneath(root_fd, rel, 0, 0, NULL);
        if (dst < 0) return -1;
        rc = mount("tmpfs", fd_path(dst_path, dst), "tmpfs", MS_NOSUID | MS_NODEV, op->data);
        close_keep_errno(dst);
        return rc;
    case ROOT_SYMLINK: {
        const char *name = NULL;
        dst = child_make_beneath(root_fd, rel, 0, 1, &name);
        if (dst < 0) return -1;
        /* an O_PATH fd serves as the directory of *at calls */
        rc = symlinkat(op->src, dst, name);
        close_keep_errno(dst);
        return rc;
    }
    }
    errno = EINVAL;
    return -1;
}

/* Builds the walled root and moves into it. -> 0 | -1 with errno, and the
 * failing step in *at. */
CHILD_CODE static int child_root(struct child_args *a, int *at) {
    *at = ROOT_AT_TMPFS;
    if (mount("tmpfs", a->root_dir, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=1m") != 0) return -1;
    int root_fd = child_open_path(AT_FDCWD, a->root_dir, 0, O_DIRECTORY);
    if (root_fd < 0) return -1;
    for (int i = 0; i < a->nroot_ops; i++) {
        *at = i;
        if (child_root_op(root_fd, &a->root_ops[i]) != 0) { close_keep_errno(root_fd); return -1; }
    }
    if (a->mount_proc) {
        *at = ROOT_AT_PROC;
        char proc_path[32];
        int proc = child_make_beneath(root_fd, "proc", 0, 0, NULL);
        if (proc < 0) { close_keep_errno(root_fd); return -1; }
        int rc = mount("proc", fd_path(proc_path, proc), "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
        close_keep_errno(proc);
        if (rc != 0) { close_keep_errno(root_fd); return -1; }
    }
    *at = ROOT_AT_PIVOT;
    int made = mkdirat(root_fd, ".oldroot", 0700);
    close_keep_errno(root_fd);
    if (made != 0) return -1;
    if (syscall(SYS_pivot_root, a->root_dir, a->root_old) != 0) return -1;
    if (chdir("/") != 0) return -1;
    if (umount2("/.oldroot", MNT_DETACH) != 0) return -1;
    if (rmdir("/.oldroot") != 0) return -1;
    *at = ROOT_AT_READONLY;
    return mount(NULL, "/", NULL, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV, NULL);
}

CHILD_CODE static int child_main(void *arg) {
    struct child_args *a = arg;

    /* Handlers are ours and would run on our memory; ignored signals would
     * leak into the program (SIGPIPE ignored is a classic). Exec resets
     * handled signals anyway; the ignored ones it keeps, so reset all. The
     * raw system call, because glibc's sigaction refuses its two internal
     * signals, which an ignoring ancestor may have left ignored too. */
    static const unsigned long dfl[4]; /* the kernel's struct sigaction, all SIG_DFL */
    for (int s = 1; s < NSIG; s++) {
        if (s != SIGKILL && s != SIGSTOP) syscall(SYS_rt_sigaction, s, dfl, NULL, 8);
    }
    if (sigprocmask(SIG_SETMASK, &a->mask, NULL) != 0) child_fail(a, ST_SIGMASK, 0);

    if (a->setsid) {
        if (setsid() < 0) child_fail(a, ST_SETSID, 0);
    } else if (setpgid(0, 0) != 0) {
        child_fail(a, ST_SETPGID, 0);
    }

    /* The namespaces first: with a user namespace nothing below is allowed
     * until the maps exist, and the mounts must happen while we may. */
    if (a->userns) {
        /* An unprivileged gid_map is refused until setgroups is denied
         * (ENOENT: a kernel older than 3.19, which has no such file). */
        if (child_write("/proc/self/setgroups", "deny", 4) != 0 && errno != ENOENT)
            child_fail(a, ST_USERNS, 0);
        if (child_write("/proc/self/uid_map", a->uid_map, a->uid_map_len) != 0)
            child_fail(a, ST_USERNS, 1);
        if (child_write("/proc/self/gid_map", a->gid_map, a->gid_map_len) != 0)
            child_fail(a, ST_USERNS, 2);
    }
    if (a->mount_proc || a->root_dir) {
        /* Slave first: nothing mounted in here goes back to the host (a
         * shared / would carry our /proc into the host's namespace), while
         * the host's unmounts still reach us, so an instance does not keep
         * another's storage image mounted after ten unmounts it. The new
         * proc shows the PID namespace of its mounter, ours. */
        if (mount(NULL, "/", NULL, MS_REC | MS_SLAVE, NULL) != 0) child_fail(a, ST_MOUNT_PRIVATE, 0);
        int at = 0;
        if (a->root_dir) {
            if (child_root(a, &at) != 0) child_fail(a, ST_ROOT, at);
        } else if (mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL) != 0) {
            child_fail(a, ST_MOUNT_PROC, 0);
        }
    }
    if (a->hostname && sethostname(a->hostname, a->hostname_len) != 0) child_fail(a, ST_HOSTNAME, 0);
    if (a->netns_fd >= 0 && syscall(SYS_setns, a->netns_fd, CLONE_NEWNET) != 0) child_fail(a, ST_NETNS, 0);
    /* a new network namespace has lo, down */
    if (a->loopback && lo_up(&a->ifr) != 0) child_fail(a, ST_LOOPBACK, 0);

    /* Into the cgroups before exec, so the program's first allocation is
     * already accounted and limited. Done as the spawner, who may write. */
    for (int i = 0; i < a->ncgroup_fds; i++) {
        if (write(a->cgroup_fds[i], "0", 1) != 1) child_fail(a, ST_CGROUP, i);
    }
    if (a->cgroup_into >= 0 && !a->into_done) {
        /* the kernel could not clone into it: move in the old way */
        int fd = openat(a->cgroup_into, "cgroup.procs", O_WRONLY | O_CLOEXEC);
        if (fd < 0 || write(fd, "0", 1) != 1) child_fail(a, ST_CGROUP, a->ncgroup_fds);
        close(fd);
    }
    for (int i = 0; i < a->nrlimits; i++) {
        if (setrlimit(a->rlimits[i].resource, &a->rlimits[i].lim) != 0)
            child_fail(a, ST_RLIMIT, i);
    }

    /* Raw system calls: glibc's setuid family would broadcast the change to
     * every thread of the parent, whose memory we share. */
    if (a->set_groups && syscall(SYS_setgroups, a->ngroups, a->groups) != 0)
        child_fail(a, ST_SETGROUPS, 0);
    if (a->set_gid && syscall(SYS_setgid, a->gid) != 0) child_fail(a, ST_SETGID, 0);
    if (a->set_uid && syscall(SYS_setuid, a->uid) != 0) child_fail(a, ST_SETUID, 0);

    /* After the credential change, which clears the parent-death signal. The
     * parent may have died before prctl: then nobody would send the signal,
     * so check it is still there. Inside a new PID namespace getppid() is 0,
     * so look at the parent's pidfd instead. */
    if (a->pdeathsig) {
        if (prctl(PR_SET_PDEATHSIG, a->pdeathsig, 0, 0, 0) != 0) child_fail(a, ST_PDEATHSIG, 0);
        if (a->parent_pidfd >= 0) {
            struct pollfd pfd = {.fd = a->parent_pidfd, .events = POLLIN};
            if (poll(&pfd, 1, 0) != 0) { errno = ESRCH; child_fail(a, ST_PARENT, 0); }
        } else if (getppid() != a->parent_pid) {
            errno = ESRCH;
            child_fail(a, ST_PARENT, 0);
        }
    }
    if (a->no_new_privs && prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0)
        child_fail(a, ST_NO_NEW_PRIVS, 0);
    /* As the final user, so a directory that user cannot enter fails here. */
    if (a->cwd && chdir(a->cwd) != 0) child_fail(a, ST_CHDIR, 0);

    /* A source fd below 3 that is not its own target would be overwritten by
     * an earlier dup2: move such fds out of the way first. */
    int src[3] = {a->stdio[0], a->stdio[1], a->stdio[2]};
    for (int i = 0; i < 3; i++) {
        if (src[i] < 0 || src[i] >= 3 || src[i] == i) continue;
        int old = src[i];
        int moved = fcntl(old, F_DUPFD_CLOEXEC, 3);
        if (moved < 0) child_fail(a, ST_STDIO, i);
        for (int j = 0; j < 3; j++) {
            if (src[j] == old) src[j] = moved;
        }
    }
    for (int i = 0; i < 3; i++) {
        if (src[i] < 0) continue;
        if (src[i] == i) {
            if (fcntl(i, F_SETFD, 0) != 0) child_fail(a, ST_STDIO, i);
        } else if (dup2(src[i], i) != i) {
            child_fail(a, ST_STDIO, i);
        }
    }
    /* The status pipe goes to a number the init is told in its argv. */
    int exec_fd = a->exec_fd;
    if (a->status_fd >= 0) {
        if (exec_fd == 3 && (exec_fd = fcntl(3, F_DUPFD_CLOEXEC, 4)) < 0) child_fail(a, ST_STATUS_FD, 0);
        if (a->status_fd == 3 ? fcntl(3, F_SETFD, 0) != 0 : dup2(a->status_fd, 3) != 3)
            child_fail(a, ST_STATUS_FD, 0);
    }
    /* Nothing of ours beyond stdio reaches the program: listening sockets,
     * other instances' pipes, the database. */
    if (child_close_fds(a->status_fd >= 0 ? 4 : 3, exec_fd) != 0) child_fail(a, ST_CLOSE_FDS, 0);

    if (exec_fd >= 0) {
        /* Close-on-exec whatever the caller opened it with: exec closes it. */
        if (fcntl(exec_fd, F_SETFD, FD_CLOEXEC) != 0) child_fail(a, ST_EXEC, 0);
        syscall(SYS_execveat, exec_fd, "", a->argv, a->envp, AT_EMPTY_PATH);
    } else {
        execve(a->path, a->argv, a->envp);
    }
    child_fail(a, ST_EXEC, 0);
}

/* ---- pipes ------------------------------------------------------------- */

/* A pipe end of ours, to a child's stdin, stdout or stderr. Reading is done
 * by one consumer at a time through pipe_read_start: the Lua reader below,
 * and later the log capture, which keeps reading into a ring buffer. */
typedef struct proc_pipe proc_pipe;
typedef void (*pipe_data_fn)(proc_pipe *pp, ssize_t nread, const char *data, void *arg);

enum pipe_state { PIPE_NEW, PIPE_OPEN, PIPE_CLOSED };

struct proc_pipe {
    uv_pipe_t h;
    lua_State *L;            /* the main thread: anchors live in its registry */
    int refs;                /* the Lua handle, and the uv handle until closed */
    enum pipe_state state;
    int writable;
    int eof;
    int open_err;            /* uv_pipe_open failed: every operation reports it */
    const char *name;        /* "stdin", "stdout", "stderr" */
    pid_t pid;
    char *buf;
    pipe_data_fn on_data;
    void *on_data_arg;
    tn_task *reader;
    uint64_t reader_seq;
    int busy;                /* operations in flight; the handle is anchored meanwhile */
    int anchor_ref;
};

typedef struct { proc_pipe *pp; } pipe_box;

typedef struct {
    uv_write_t req;
    proc_pipe *pp;
    tn_task *task;
    uint64_t seq;
    char data[];
} pipe_write_req;

static void pipe_release(proc_pipe *pp) {
    if (--pp->refs > 0) return;
    free(pp->buf);
    free(pp);
}

static void pipe_close_cb(uv_handle_t *h) { pipe_release(h->data); }

static void pipe_anchor(proc_pipe *pp, lua_State *L, int idx) {
    if (pp->busy++ > 0) return;
    lua_pushvalue(L, idx);
    pp->anchor_ref = luaL_ref(L, LUA_REGISTRYINDEX);
}

static void pipe_unanchor(proc_pipe *pp) {
    if (--pp->busy > 0) return;
    luaL_unref(pp->L, LUA_REGISTRYINDEX, pp->anchor_ref);
    pp->anchor_ref = LUA_NOREF;
}

static void pipe_alloc_cb(uv_handle_t *h, size_t hint, uv_buf_t *buf) {
    (void)hint;
    proc_pipe *pp = h->data;
    if (!pp->buf) pp->buf = malloc(PIPE_READ_SIZE);
    *buf = uv_buf_init(pp->buf, pp->buf ? PIPE_READ_SIZE : 0);
}

static void pipe_read_cb(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf) {
    proc_pipe *pp = s->data;
    if (nread == 0) return; /* EAGAIN */
    if (nread == UV_EOF) pp->eof = 1;
    pp->on_data(pp, nread, buf->base, pp->on_data_arg);
}

/* Start delivering what the child writes to fn: chunks (nread > 0), then
 * UV_EOF, or an error (nread < 0). The data is valid only during the call. */
static int pipe_read_start(proc_pipe *pp, pipe_data_fn fn, void *arg) {
    pp->on_data = fn;
    pp->on_data_arg = arg;
    return uv_read_start((uv_stream_t *)&pp->h, pipe_alloc_cb, pipe_read_cb);
}

static void pipe_read_stop(proc_pipe *pp) {
    if (pp->state == PIPE_OPEN) uv_read_stop((uv_stream_t *)&pp->h);
    pp->on_data = NULL;
    pp->on_data_arg = NULL;
}

/* Close our end. A waiting reader gets nil, "closed" when resume is set;
 * from __gc (resume unset) there is none, since reading anchors the handle.
 * Queued writes are cancelled by libuv and answer their tasks themselves. */
static void pipe_close(proc_pipe *pp, int resume) {
    if (pp->state == PIPE_CLOSED) return;
    int was_open = pp->state == PIPE_OPEN;
    if (pp->reader) {
        tn_task *t = pp->reader;
        pp->reader = NULL;
        pipe_read_stop(pp);
        if (resume && tn_task_waiting_for(t, pp->reader_seq)) {
            lua_State *co = tn_task_thread(t);
            lua_pushnil(co);
            lua_pushliteral(co, "closed");
            tn_task_resume(t, 2);
        }
        tn_task_release(t);
        pipe_unanchor(pp);
    }
    pp->state = PIPE_CLOSED;
    if (was_open) uv_close((uv_handle_t *)&pp->h, pipe_close_cb);
}

static void lua_reader_data(proc_pipe *pp, ssize_t nread, const char *data, void *arg) {
    (void)arg;
    tn_task *t = pp->reader;
    pp->reader = NULL;
    pipe_read_stop(pp); /* one chunk per read: the child waits while nobody reads */
    if (tn_task_waiting_for(t, pp->reader_seq)) {
        lua_State *co = tn_task_thread(t);
        int n = 1;
        if (nread > 0) lua_pushlstring(co, data, (size_t)nread);
        else if (nread == UV_EOF) lua_pushnil(co);
        else n = tn_fail_uv(co, lua_pushfstring(co, "read %s of %d", pp->name, (int)pp->pid), (int)nread);
        tn_task_resume(t, n);
    }
    tn_task_release(t);
    pipe_unanchor(pp);
}

static void reader_cancel(void *arg) {
    proc_pipe *pp = arg;
    tn_task *t = pp->reader;
    if (!t) return;
    pp->reader = NULL;
    pipe_read_stop(pp);
    tn_task_release(t);
    pipe_unanchor(pp);
}

static proc_pipe *check_pipe(lua_State *L) {
    pipe_box *b = luaL_checkudata(L, 1, PIPE_MT);
    if (!b->pp || b->pp->state != PIPE_OPEN) luaL_error(L, "pipe is closed");
    return b->pp;
}

/* pipe:read([timeout_ms]) -> chunk | nil (end of file) | nil, err, code */
static int l_pipe_read(lua_State *L) {
    proc_pipe *pp = check_pipe(L);
    lua_Integer timeout = luaL_optinteger(L, 2, -1);
    if (pp->writable) return luaL_error(L, "%s is the child's input: write to it", pp->name);
    if (pp->eof) { lua_pushnil(L); return 1; }
    if (pp->open_err) return tn_fail_uv(L, lua_pushfstring(L, "read %s", pp->name), pp->open_err);
    if (pp->reader) return luaL_error(L, "another task is already reading %s", pp->name);
    if (pp->on_data) return luaL_error(L, "%s is captured: it cannot be read from Lua", pp->name);
    tn_task *t = tn_task_check(L);
    int rc = pipe_read_start(pp, lua_reader_data, NULL);
    if (rc) return tn_fail_uv(L, lua_pushfstring(L, "read %s", pp->name), rc);
    pp->reader = tn_task_hold(t);
    pp->reader_seq = tn_task_seq(t);
    pipe_anchor(pp, L, 1);
    lua_settop(L, 0);
    return tn_task_wait_cancel(L, t, timeout, reader_cancel, pp);
}

static void pipe_write_cb(uv_write_t *req, int status) {
    pipe_write_req *w = (pipe_write_req *)req;
    proc_pipe *pp = w->pp;
    if (tn_task_waiting_for(w->task, w->seq)) {
        lua_State *co = tn_task_thread(w->task);
        if (status == 0) {
            lua_pushboolean(co, 1);
            tn_task_resume(w->task, 1);
        } else {
            int n = tn_fail_uv(co, lua_pushfstring(co, "write %s of %d", pp->name, (int)pp->pid), status);
            tn_task_resume(w->task, n);
        }
    }
    tn_task_release(w->task);
    free(w);
    pipe_unanchor(pp);
}

/* libuv cannot take back one queued write: stopping it means closing. */
static void writer_cancel(void *arg) { pipe_close(arg, 0); }

/* pipe:write(data [, timeout_ms]) -> true | nil, err, code. Waits until the
 * child took all of data. On timeout the pipe is closed (how much of data
 * went through is unknown, so the stream is no longer usable). */
static int l_pipe_write(lua_State *L) {
    proc_pipe *pp = check_pipe(L);
    size_t len;
    const char *data = luaL_checklstring(L, 2, &len);
    lua_Integer timeout = luaL_optinteger(L, 3, -1);
    if (!pp->writable) return luaL_error(L, "%s is the child's output: read from it", pp->name);
    tn_task *t = tn_task_check(L);
    const char *what = lua_pushfstring(L, "write %s of %d", pp->name, (int)pp->pid);
    if (pp->open_err) return tn_fail_uv(L, what, pp->open_err);
    if (len == 0) { lua_pushboolean(L, 1); return 1; }
    /* Most writes fit in the pipe: no request, no yield. try_write refuses
     * (EAGAIN) while earlier writes are queued, so order is kept. */
    uv_buf_t buf = uv_buf_init((char *)data, (unsigned int)len);
    int n = uv_try_write((uv_stream_t *)&pp->h, &buf, 1);
    if (n < 0 && n != UV_EAGAIN) return tn_fail_uv(L, what, n);
    if (n < 0) n = 0;
    if ((size_t)n == len) { lua_pushboolean(L, 1); return 1; }
    size_t rest = len - (size_t)n;
    pipe_write_req *w = malloc(sizeof *w + rest);
    if (!w) return luaL_error(L, "out of memory");
    memcpy(w->data, data + n, rest);
    w->pp = pp;
    buf = uv_buf_init(w->data, (unsigned int)rest);
    int rc = uv_write(&w->req, (uv_stream_t *)&pp->h, &buf, 1, pipe_write_cb);
    if (rc) { free(w); return tn_fail_uv(L, what, rc); }
    w->task = tn_task_hold(t);
    w->seq = tn_task_seq(t);
    pipe_anchor(pp, L, 1);
    lua_settop(L, 0);
    return tn_task_wait_cancel(L, t, timeout, writer_cancel, pp);
}

/* pipe:close(): idempotent. Closing stdin is how the child sees end of input. */
static int l_pipe_close(lua_State *L) {
    pipe_box *b = luaL_checkudata(L, 1, PIPE_MT);
    if (b->pp) pipe_close(b->pp, 1);
    return 0;
}

static int l_pipe_gc(lua_State *L) {
    pipe_box *b = luaL_checkudata(L, 1, PIPE_MT);
    proc_pipe *pp = b->pp;
    if (!pp) return 0;
    b->pp = NULL;
    pipe_close(pp, 0);
    pipe_release(pp);
    return 0;
}

static int l_pipe_tostring(lua_State *L) {
    pipe_box *b = luaL_checkudata(L, 1, PIPE_MT);
    if (!b->pp) lua_pushliteral(L, "tenement.pipe (closed)");
    else lua_pushfstring(L, "tenement.pipe (%s of %d%s)", b->pp->name, (int)b->pp->pid,
                         b->pp->state == PIPE_OPEN ? "" : ", closed");
    return 1;
}

/* ---- processes --------------------------------------------------------- */

typedef struct proc_waiter {
    struct proc_waiter *next, *prev;
    struct tn_proc *p;
    tn_task *task;
    uint64_t seq;
    int detached;            /* taken off the process by the loop resuming them */
} proc_waiter;

typedef struct tn_proc {
    uv_poll_t poll;          /* on the pidfd: readable once the child exited */
    int refs;                /* the Lua handle, and the poll handle until closed */
    int watching;            /* poll handle initialized and not yet closed */
    int pidfd;
    int status_fd;           /* -1, or the read end of spec.status_pipe */
    pid_t pid;
    int exited;
    int lost;                /* someone else reaped it: no status */
    int kill_group_at_exit;  /* spec.kill_group_at_exit */
    int code, signum, core_dumped;
    proc_waiter *waiters;
    int nwaiters;
} tn_proc;

typedef struct { tn_proc *p; pid_t pid; } proc_box;

static void proc_release(tn_proc *p) {
    if (--p->refs == 0) free(p);
}

static void proc_poll_close_cb(uv_handle_t *h) { proc_release(h->data); }

static void push_status(lua_State *L, tn_proc *p) {
    char buf[32];
    lua_createtable(L, 0, 4);
    if (p->lost) {
        lua_pushboolean(L, 1);
        lua_setfield(L, -2, "lost");
    } else if (p->signum) {
        lua_pushstring(L, signal_name(p->signum, buf, sizeof buf));
        lua_setfield(L, -2, "signal");
        lua_pushinteger(L, p->signum);
        lua_setfield(L, -2, "signum");
    } else {
        lua_pushinteger(L, p->code);
        lua_setfield(L, -2, "code");
    }
    lua_pushboolean(L, p->core_dumped);
    lua_setfield(L, -2, "core_dumped");
}

/* The loop that resumes the detached waiters owns them: a resumed task may
 * core.wake another waiter of the list, whose cancel must then leave its
 * entry to the loop instead of unlinking and freeing it under it. */
static proc_waiter *detach_waiters(tn_proc *p) {
    proc_waiter *w = p->waiters;
    for (proc_waiter *d = w; d; d = d->next) d->detached = 1;
    p->waiters = NULL;
    p->nwaiters = 0;
    if (p->watching && !p->exited) uv_unref((uv_handle_t *)&p->poll);
    return w;
}

static void proc_exited(tn_proc *p) {
    p->exited = 1;
    uv_poll_stop(&p->poll);
    p->watching = 0;
    uv_close((uv_handle_t *)&p->poll, proc_poll_close_cb);
    close(p->pidfd);
    p->pidfd = -1;
    if (p->status_fd >= 0) close(p->status_fd);
    p->status_fd = -1;
    /* Resuming runs Lua, which may close or drop the handle: p stays valid
     * until the poll's close callback, which comes on a later loop turn. */
    proc_waiter *w = detach_waiters(p);
    while (w) {
        proc_waiter *next = w->next;
        if (tn_task_waiting_for(w->task, w->seq)) {
            push_status(tn_task_thread(w->task), p);
            tn_task_resume(w->task, 1);
        }
        tn_task_release(w->task);
        free(w);
        w = next;
    }
}

static void proc_poll_cb(uv_poll_t *h, int status, int events) {
    (void)status; (void)events;
    tn_proc *p = h->data;
    siginfo_t si;
    memset(&si, 0, sizeof si);
    int rc;
    do rc = waitid(P_PIDFD, (id_t)p->pidfd, &si, WEXITED | WNOHANG | (p->kill_group_at_exit ? WNOWAIT : 0));
    while (rc < 0 && errno == EINTR);
    /* Not yet (a spurious wakeup). libuv made the pidfd non-blocking, and
     * then waitid says EAGAIN where it would say "no child". */
    if ((rc == 0 && si.si_pid == 0) || (rc < 0 && errno == EAGAIN)) return;
    if (rc == 0 && p->kill_group_at_exit) {
        /* Now, while the leader is a zombie: its number cannot be handed to
         * another process until the reap below, so the group is still its
         * own (ESRCH: nothing was left in it). */
        kill(-p->pid, SIGKILL);
        do rc = waitid(P_PIDFD, (id_t)p->pidfd, &si, WEXITED | WNOHANG);
        while (rc < 0 && errno == EINTR);
    }
    if (rc < 0) {
        /* ECHILD: reaped by someone else (SIGCHLD set to SIG_IGN, or a
         * waitpid(-1) elsewhere). The status is gone; the exit is not. */
        p->lost = 1;
    } else if (si.si_code == CLD_EXITED) {
        p->code = si.si_status;
        /* An init as PID 1 cannot die of its app's signal: it exits and
         * leaves the app's wait status in the pipe instead. */
        int st;
        if (p->status_fd >= 0 && read(p->status_fd, &st, sizeof st) == (ssize_t)sizeof st) {
            if (WIFSIGNALED(st)) {
                p->code = 0;
                p->signum = WTERMSIG(st);
                p->core_dumped = WCOREDUMP(st) != 0;
            } else if (WIFEXITED(st)) {
                p->code = WEXITSTATUS(st);
            }
        }
    } else {
        p->signum = si.si_status;
        p->core_dumped = si.si_code == CLD_DUMPED;
    }
    proc_exited(p);
}

static void waiter_cancel(void *arg) {
    proc_waiter *w = arg;
    if (w->detached) return;
    tn_proc *p = w->p;
    if (w->prev) w->prev->next = w->next;
    else p->waiters = w->next;
    if (w->next) w->next->prev = w->prev;
    if (--p->nwaiters == 0 && p->watching) uv_unref((uv_handle_t *)&p->poll);
    tn_task_release(w->task);
    free(w);
}

static proc_box *check_proc(lua_State *L) {
    proc_box *b = luaL_checkudata(L, 1, PROC_MT);
    if (!b->p) luaL_error(L, "process handle (pid %d) is closed", (int)b->pid);
    return b;
}

/* p:wait([timeout_ms]) -> status | nil, "timeout". Any number of tasks may
 * wait; once the child ended, the stored status comes back at once.
 * core.wake(task, ...) ends the wait early with its values (a supervisor
 * waiting for the exit hears of a socket appearing meanwhile). */
static int l_proc_wait(lua_State *L) {
    tn_proc *p = check_proc(L)->p;
    lua_Integer timeout = luaL_optinteger(L, 2, -1);
    if (p->exited) { push_status(L, p); return 1; }
    tn_task *t = tn_task_check(L);
    proc_waiter *w = malloc(sizeof *w);
    if (!w) return luaL_error(L, "out of memory");
    w->p = p;
    w->task = tn_task_hold(t);
    w->seq = tn_task_seq(t);
    w->detached = 0;
    w->prev = NULL;
    w->next = p->waiters;
    if (p->waiters) p->waiters->prev = w;
    p->waiters = w;
    /* Somebody waits for this exit: it must keep the loop running. */
    if (p->nwaiters++ == 0) uv_ref((uv_handle_t *)&p->poll);
    lua_settop(L, 0);
    return tn_task_wait_wakeable(L, t, timeout, waiter_cancel, w);
}

/* p:status() -> "running" | status */
static int l_proc_status(lua_State *L) {
    tn_proc *p = check_proc(L)->p;
    if (p->exited) push_status(L, p);
    else lua_pushliteral(L, "running");
    return 1;
}

/* p:kill([sig="SIGTERM" [, group=false]]) -> true | nil, err, code.
 * The process itself is signalled through its pidfd, so a pid the kernel
 * reused after the reap is never hit. group=true signals the process group
 * (kill(-pgid)) while the leader has not been reaped. After the reap it is
 * refused like a kill of the process: once the group emptied, its number
 * is free, and a new process may lead a group of that number by now. What
 * the leader left behind is reached by spec.kill_group_at_exit instead,
 * before the reap. */
static int l_proc_kill(lua_State *L) {
    proc_box *b = check_proc(L);
    tn_proc *p = b->p;
    int sig = lua_isnoneornil(L, 2) ? SIGTERM : tn_check_signal(L, 2);
    int group = lua_toboolean(L, 3);
    if (p->exited) {
        lua_pushnil(L);
        lua_pushliteral(L, "process has exited");
        lua_pushliteral(L, "ESRCH");
        return 3;
    }
    if (group) {
        if (kill(-p->pid, sig) != 0)
            return tn_fail_errno(L, lua_pushfstring(L, "kill process group %d", (int)p->pid), errno);
    } else {
        if (syscall(SYS_pidfd_send_signal, p->pidfd, sig, NULL, 0) != 0)
            return tn_fail_errno(L, lua_pushfstring(L, "kill %d", (int)p->pid), errno);
    }
    lua_pushboolean(L, 1);
    return 1;
}

/* Detach the Lua side. The child is not signalled; if it still runs, C
 * keeps watching it (unref'd) to reap it, and frees p afterwards. */
static void proc_detach(proc_box *b, int resume) {
    tn_proc *p = b->p;
    b->p = NULL;
    if (resume && p->nwaiters) {
        proc_waiter *w = detach_waiters(p);
        while (w) {
            proc_waiter *next = w->next;
            if (tn_task_waiting_for(w->task, w->seq)) {
                lua_State *co = tn_task_thread(w->task);
                lua_pushnil(co);
                lua_pushliteral(co, "closed");
                /* its cancel finds w detached and leaves it to be freed here */
                tn_task_resume_later(w->task, 2);
            }
            tn_task_release(w->task);
            free(w);
            w = next;
        }
    }
    /* From __gc, waiters (if any) keep the watch ref'd and get the status. */
    proc_release(p);
}

/* p:close(): idempotent. Closes the pipes too; never kills the child. */
static int l_proc_close(lua_State *L) {
    proc_box *b = luaL_checkudata(L, 1, PROC_MT);
    if (!b->p) return 0;
    proc_detach(b, 1);
    lua_getiuservalue(L, 1, 1);
    static const char *const names[] = {"stdin", "stdout", "stderr"};
    for (int i = 0; i < 3; i++) {
        if (lua_getfield(L, -1, names[i]) == LUA_TUSERDATA) {
            pipe_box *pb = luaL_checkudata(L, -1, PIPE_MT);
            if (pb->pp) pipe_close(pb->pp, 1);
        }
        lua_pop(L, 1);
    }
    return 0;
}

static int l_proc_gc(lua_State *L) {
    proc_box *b = luaL_checkudata(L, 1, PROC_MT);
    if (b->p) proc_detach(b, 0);
    return 0;
}

static int l_proc_tostring(lua_State *L) {
    proc_box *b = luaL_checkudata(L, 1, PROC_MT);
    lua_pushfstring(L, "tenement.process (pid %d%s)", (int)b->pid, b->p ? "" : ", closed");
    return 1;
}

/* Methods first, then the fields: pid, stdin, stdout, stderr. */
static int l_proc_index(lua_State *L) {
    proc_box *b = luaL_checkudata(L, 1, PROC_MT);
    lua_settop(L, 2);
    lua_pushvalue(L, 2);
    if (lua_rawget(L, lua_upvalueindex(1)) != LUA_TNIL) return 1;
    const char *k = lua_tostring(L, 2);
    if (k && strcmp(k, "pid") == 0) {
        lua_pushinteger(L, b->pid);
        return 1;
    }
    lua_getiuservalue(L, 1, 1);
    lua_pushvalue(L, 2);
    lua_rawget(L, -2);
    return 1;
}

/* ---- spawn: reading the spec ------------------------------------------- */

/* Strings handed to the child live in an anchor table on the stack until
 * the spawn returns; arrays are userdata, collected with it. Reading the spec
 * may raise (misuse); nothing is held yet at that point. */
typedef struct {
    lua_State *L;
    int anchor;             /* stack index of the anchor table */
    lua_Integer nanchor;
} spec_reader;

static const char *anchor_top(spec_reader *r) {
    const char *s = lua_tostring(r->L, -1);
    lua_rawseti(r->L, r->anchor, ++r->nanchor);
    return s;
}

/* A C string for exec: no NUL inside, or it would be cut silently. */
static const char *checked_cstring(lua_State *L, int idx, const char *what) {
    size_t len;
    int t = lua_type(L, idx);
    if (t != LUA_TSTRING && t != LUA_TNUMBER)
        luaL_error(L, "spawn: %s must be a string, got %s", what, luaL_typename(L, idx));
    const char *s = lua_tolstring(L, idx, &len);
    if (strlen(s) != len) luaL_error(L, "spawn: %s contains a NUL byte", what);
    return s;
}

static const char *const spec_keys[] = {
    "argv", "env", "cwd", "stdin", "stdout", "stderr", "setsid", "pdeathsig", "cgroup_fds", "cgroup_into",
    "clone_flags", "uid", "gid", "groups", "no_new_privs", "rlimits", "mount_proc", "hostname",
    "loopback", "exec_fd", "netns_fd", "status_pipe", "sigmask", "kill_group_at_exit", "root", NULL,
};

static void check_spec_keys(lua_State *L) {
    lua_pushnil(L);
    while (lua_next(L, 1)) {
        lua_pop(L, 1);
        int ok = 0;
        if (lua_type(L, -1) == LUA_TSTRING) {
            const char *k = lua_tostring(L, -1);
            for (int i = 0; spec_keys[i] && !ok; i++) ok = strcmp(k, spec_keys[i]) == 0;
        }
        if (!ok) {
            lua_pushvalue(L, -1);
            luaL_error(L, "spawn: unknown field '%s' in the spec", luaL_tolstring(L, -1, NULL));
        }
    }
}

static char **read_argv(spec_reader *r) {
    lua_State *L = r->L;
    if (lua_getfield(L, 1, "argv") != LUA_TTABLE)
        luaL_error(L, "spawn: spec.argv must be a list of strings");
    lua_Integer n = luaL_len(L, -1);
    if (n < 1) luaL_error(L, "spawn: spec.argv is empty");
    char **argv = lua_newuserdatauv(L, (size_t)(n + 1) * sizeof *argv, 0);
    lua_rawseti(L, r->anchor, ++r->nanchor);
    for (lua_Integer i = 1; i <= n; i++) {
        lua_geti(L, -1, i);
        checked_cstring(L, -1, "spec.argv item");
        argv[i - 1] = (char *)anchor_top(r);
    }
    argv[n] = NULL;
    if (argv[0][0] == '\0') luaL_error(L, "spawn: spec.argv[1] is empty");
    lua_pop(L, 1);
    return argv;
}

static char **read_env(spec_reader *r) {
    lua_State *L = r->L;
    int t = lua_getfield(L, 1, "env");
    size_t n = 0;
    if (t != LUA_TNIL && t != LUA_TTABLE) luaL_error(L, "spawn: spec.env must be a table");
    if (t == LUA_TTABLE) {
        lua_pushnil(L);
        while (lua_next(L, -2)) { n++; lua_pop(L, 1); }
    }
    char **envp = lua_newuserdatauv(L, (n + 1) * sizeof *envp, 0);
    lua_rawseti(L, r->anchor, ++r->nanchor);
    size_t i = 0;
    if (t == LUA_TTABLE) {
        lua_pushnil(L);
        while (lua_next(L, -2)) {
            if (lua_type(L, -2) == LUA_TNUMBER) {
                const char *kv = checked_cstring(L, -1, "spec.env item");
                const char *eq = strchr(kv, '=');
                if (!eq || eq == kv) luaL_error(L, "spawn: spec.env item '%s' is not K=V", kv);
                envp[i++] = (char *)anchor_top(r);
            } else if (lua_type(L, -2) == LUA_TSTRING) {
                const char *k = lua_tostring(L, -2);
                if (k[0] == '\0' || strchr(k, '=') || strlen(k) != lua_rawlen(L, -2))
                    luaL_error(L, "spawn: spec.env name '%s' is not a valid variable name", k);
                lua_pushvalue(L, -1);
                const char *v = checked_cstring(L, -1, "spec.env value");
                lua_pushfstring(L, "%s=%s", k, v);
                envp[i++] = (char *)anchor_top(r);
                lua_pop(L, 2);
                continue;
            } else {
                luaL_error(L, "spawn: spec.env keys must be names or list positions");
            }
        }
    }
    envp[i] = NULL;
    lua_pop(L, 1);
    return envp;
}

enum stdio_kind { STDIO_NULL, STDIO_PIPE, STDIO_INHERIT, STDIO_FD };

static enum stdio_kind read_stdio(lua_State *L, const char *key, enum stdio_kind def, int *fd) {
    enum stdio_kind k = def;
    int t = lua_getfield(L, 1, key);
    if (t == LUA_TNUMBER) {
        lua_Integer n = lua_tointeger(L, -1);
        if (!lua_isinteger(L, -1) || n < 0 || n > INT_MAX)
            luaL_error(L, "spawn: spec.%s: not a file descriptor", key);
        *fd = (int)n;
        k = STDIO_FD;
    } else if (t == LUA_TSTRING) {
        const char *s = lua_tostring(L, -1);
        if (strcmp(s, "null") == 0) k = STDIO_NULL;
        else if (strcmp(s, "pipe") == 0) k = STDIO_PIPE;
        else if (strcmp(s, "inherit") == 0) k = STDIO_INHERIT;
        else luaL_error(L, "spawn: spec.%s must be \"null\", \"pipe\", \"inherit\" or an fd, got '%s'", key, s);
    } else if (t != LUA_TNIL) {
        luaL_error(L, "spawn: spec.%s must be \"null\", \"pipe\", \"inherit\" or an fd", key);
    }
    lua_pop(L, 1);
    return k;
}

static int opt_bool(lua_State *L, const char *key) {
    int t = lua_getfield(L, 1, key);
    if (t != LUA_TNIL && t != LUA_TBOOLEAN) luaL_error(L, "spawn: spec.%s must be a boolean", key);
    int v = lua_toboolean(L, -1);
    lua_pop(L, 1);
    return v;
}

static int opt_id(lua_State *L, const char *key, lua_Integer *out) {
    int t = lua_getfield(L, 1, key);
    int present = t != LUA_TNIL;
    if (present) {
        if (!lua_isinteger(L, -1) || lua_tointeger(L, -1) < 0 || lua_tointeger(L, -1) > UINT_MAX - 1)
            luaL_error(L, "spawn: spec.%s must be a non-negative integer", key);
        *out = lua_tointeger(L, -1);
    }
    lua_pop(L, 1);
    return present;
}

/* A list of non-negative integers as a userdata array (anchored). */
static void *read_int_list(spec_reader *r, const char *key, int gids, size_t *count) {
    lua_State *L = r->L;
    *count = 0;
    int t = lua_getfield(L, 1, key);
    if (t == LUA_TNIL) { lua_pop(L, 1); return NULL; }
    if (t != LUA_TTABLE) luaL_error(L, "spawn: spec.%s must be a list of integers", key);
    lua_Integer n = luaL_len(L, -1);
    size_t elem = gids ? sizeof(gid_t) : sizeof(int);
    void *arr = lua_newuserdatauv(L, (size_t)(n > 0 ? n : 1) * elem, 0);
    lua_rawseti(L, r->anchor, ++r->nanchor);
    for (lua_Integer i = 1; i <= n; i++) {
        lua_geti(L, -1, i);
        if (!lua_isinteger(L, -1) || lua_tointeger(L, -1) < 0 || lua_tointeger(L, -1) > INT_MAX)
            luaL_error(L, "spawn: spec.%s[%d] must be a non-negative integer", key, (int)i);
        if (!gids) ((int *)arr)[i - 1] = (int)lua_tointeger(L, -1);
        else ((gid_t *)arr)[i - 1] = (gid_t)lua_tointeger(L, -1);
        lua_pop(L, 1);
    }
    lua_pop(L, 1);
    *count = (size_t)n;
    return arr;
}

static int read_clone_flags(lua_State *L) {
    int flags = 0;
    int t = lua_getfield(L, 1, "clone_flags");
    if (t == LUA_TNIL) { lua_pop(L, 1); return 0; }
    if (t != LUA_TTABLE) luaL_error(L, "spawn: spec.clone_flags must be a list of names");
    lua_Integer n = luaL_len(L, -1);
    for (lua_Integer i = 1; i <= n; i++) {
        lua_geti(L, -1, i);
        const char *s = lua_tostring(L, -1);
        int found = 0;
        for (int j = 0; s && clone_flag_names[j].name; j++) {
            if (strcmp(s, clone_flag_names[j].name) == 0) { flags |= clone_flag_names[j].flag; found = 1; }
        }
        if (!found)
            luaL_error(L, "spawn: unknown clone flag '%s' (known: newpid, newns, newipc, newuts, newnet, newuser)",
                       s ? s : luaL_typename(L, -1));
        lua_pop(L, 1);
    }
    lua_pop(L, 1);
    return flags;
}

/* spec.sigmask: signals the program starts with blocked, none by default.
 * For a program that blocks them itself first thing: one sent before it
 * got there (a parent-death signal) waits for it instead of killing it. */
static void read_sigmask(lua_State *L, sigset_t *mask) {
    sigemptyset(mask);
    int t = lua_getfield(L, 1, "sigmask");
    if (t != LUA_TNIL) {
        if (t != LUA_TTABLE) luaL_error(L, "spawn: spec.sigmask must be a list of signals");
        lua_Integer n = luaL_len(L, -1);
        for (lua_Integer i = 1; i <= n; i++) {
            lua_geti(L, -1, i);
            sigaddset(mask, tn_check_signal(L, -1));
            lua_pop(L, 1);
        }
    }
    lua_pop(L, 1);
}

/* spec.root = { dir = "/abs/dir", mounts = { {"bind", SRC, DST, ro=, file=}, {"tmpfs", DST, OPTIONS},
 * {"symlink", TARGET, DST} } }: DST as the app sees it, absolute. */
static void read_root(lua_State *L, spec_reader *r, struct child_args *a, int ns_flags) {
    int t = lua_getfield(L, 1, "root");
    if (t == LUA_TNIL) { lua_pop(L, 1); return; }
    if (t != LUA_TTABLE) luaL_error(L, "spawn: spec.root must be a table");
    if (!(ns_flags & CLONE_NEWNS))
        luaL_error(L, "spawn: spec.root needs clone_flag newns (without it, it would cover this host's files)");
    if (lua_getfield(L, -1, "dir") == LUA_TNIL) luaL_error(L, "spawn: spec.root.dir is required");
    const char *dir = checked_cstring(L, -1, "spec.root.dir");
    lua_rawseti(L, r->anchor, ++r->nanchor);
    if (dir[0] != '/') luaL_error(L, "spawn: spec.root.dir must be an absolute path");
    a->root_dir = dir;
    a->root_old = lua_pushfstring(L, "%s/.oldroot", dir);
    lua_rawseti(L, r->anchor, ++r->nanchor);
    if (lua_getfield(L, -1, "mounts") != LUA_TTABLE) luaL_error(L, "spawn: spec.root.mounts must be a list");
    lua_Integer n = luaL_len(L, -1);
    if (n > 256) luaL_error(L, "spawn: spec.root.mounts has %d entries, at most 256", (int)n);
    struct root_op *ops = lua_newuserdatauv(L, (size_t)(n ? n : 1) * sizeof *ops, 0);
    lua_rawseti(L, r->anchor, ++r->nanchor);
    for (lua_Integer i = 1; i <= n; i++) {
        if (lua_geti(L, -1, i) != LUA_TTABLE) luaL_error(L, "spawn: spec.root.mounts[%d] must be a table", (int)i);
        struct root_op *op = &ops[i - 1];
        memset(op, 0, sizeof *op);
        lua_geti(L, -1, 1);
        const char *kind = lua_tostring(L, -1);
        lua_pop(L, 1);
        if (kind && strcmp(kind, "bind") == 0) op->kind = ROOT_BIND;
        else if (kind && strcmp(kind, "tmpfs") == 0) op->kind = ROOT_TMPFS;
        else if (kind && strcmp(kind, "symlink") == 0) op->kind = ROOT_SYMLINK;
        else return (void)luaL_error(L, "spawn: spec.root.mounts[%d]: unknown kind (bind, tmpfs, symlink)", (int)i);
        lua_geti(L, -1, op->kind == ROOT_TMPFS ? 2 : 3);
        const char *where = checked_cstring(L, -1, "spec.root.mounts destination");
        if (where[0] != '/') luaL_error(L, "spawn: spec.root.mounts[%d]: %s is not an absolute path", (int)i, where);
        op->where = where;
        lua_rawseti(L, r->anchor, ++r->nanchor);
        if (op->kind == ROOT_BIND || op->kind == ROOT_SYMLINK) {
            lua_geti(L, -1, 2);
            op->src = checked_cstring(L, -1, "spec.root.mounts source");
            lua_rawseti(L, r->anchor, ++r->nanchor);
        } else if (op->kind == ROOT_TMPFS) {
            lua_geti(L, -1, 3);
            op->data = lua_isnil(L, -1) ? NULL : checked_cstring(L, -1, "spec.root.mounts tmpfs options");
            lua_rawseti(L, r->anchor, ++r->nanchor);
        }
        lua_getfield(L, -1, "ro");
        op->ro = lua_toboolean(L, -1);
        lua_getfield(L, -2, "file");
        op->is_file = lua_toboolean(L, -1);
        lua_pop(L, 3);
    }
    lua_pop(L, 2);
    a->root_ops = ops;
    a->nroot_ops = (int)n;
}

/* mount_proc, hostname, loopback: each changes the namespace it names, so
 * each needs that namespace to be a new one, or it would change the host. */
static void read_namespace_setup(lua_State *L, spec_reader *r, struct child_args *a, int ns_flags) {
    a->mount_proc = opt_bool(L, "mount_proc");
    a->loopback = opt_bool(L, "loopback");
    if (lua_getfield(L, 1, "hostname") != LUA_TNIL) {
        a->hostname = checked_cstring(L, -1, "spec.hostname");
        a->hostname_len = strlen(a->hostname);
        if (a->hostname_len == 0 || a->hostname_len > HOST_NAME_MAX)
            luaL_error(L, "spawn: spec.hostname must be 1 to %d characters", HOST_NAME_MAX);
    }
    lua_rawseti(L, r->anchor, ++r->nanchor);
    if (a->mount_proc && (ns_flags & (CLONE_NEWNS | CLONE_NEWPID)) != (CLONE_NEWNS | CLONE_NEWPID))
        luaL_error(L, "spawn: spec.mount_proc needs clone_flags newns and newpid "
                      "(without them it would cover this host's /proc)");
    if (a->hostname && !(ns_flags & CLONE_NEWUTS))
        luaL_error(L, "spawn: spec.hostname needs clone_flag newuts (without it, it would rename this host)");
    read_root(L, r, a, ns_flags);
    if (a->loopback && !(ns_flags & CLONE_NEWNET))
        luaL_error(L, "spawn: spec.loopback needs clone_flag newnet");
    if (a->netns_fd >= 0 && (ns_flags & (CLONE_NEWNET | CLONE_NEWUSER)))
        luaL_error(L, "spawn: spec.netns_fd is a network namespace to join: it excludes clone_flags "
                      "newnet (a new one) and newuser (from there it may not be joined)");
    if (a->loopback) {
        memset(&a->ifr, 0, sizeof a->ifr);
        memcpy(a->ifr.ifr_name, "lo", 3);
    }
    if (ns_flags & CLONE_NEWUSER) {
        /* The one mapping a process may write for itself: its own ids
         * become root inside, which is what lets it mount and name. */
        if (a->groups)
            luaL_error(L, "spawn: spec.groups cannot be set in a new user namespace (setgroups is denied there)");
        a->set_groups = 0;
        a->userns = 1;
        a->uid_map_len = (size_t)snprintf(a->uid_map, sizeof a->uid_map, "0 %u 1\n", (unsigned)geteuid());
        a->gid_map_len = (size_t)snprintf(a->gid_map, sizeof a->gid_map, "0 %u 1\n", (unsigned)getegid());
    }
}

static rlim_t rlimit_value(lua_State *L, int idx, const char *name) {
    if (lua_type(L, idx) == LUA_TSTRING && strcmp(lua_tostring(L, idx), "unlimited") == 0)
        return RLIM_INFINITY;
    if (!lua_isinteger(L, idx) || lua_tointeger(L, idx) < 0)
        luaL_error(L, "spawn: spec.rlimits.%s must be a non-negative integer or \"unlimited\"", name);
    return (rlim_t)lua_tointeger(L, idx);
}

/* rlimits = { nofile = n | "unlimited" | { soft = n, hard = n }, ... } */
static void read_rlimits(lua_State *L, struct child_args *a) {
    int t = lua_getfield(L, 1, "rlimits");
    if (t == LUA_TNIL) { lua_pop(L, 1); return; }
    if (t != LUA_TTABLE) luaL_error(L, "spawn: spec.rlimits must be a table");
    lua_pushnil(L);
    while (lua_next(L, -2)) {
        const char *name = lua_type(L, -2) == LUA_TSTRING ? lua_tostring(L, -2) : "?";
        int j = 0;
        while (rlimit_names[j].name && strcmp(rlimit_names[j].name, name) != 0) j++;
        if (!rlimit_names[j].name) luaL_error(L, "spawn: unknown rlimit '%s'", name);
        struct rlimit lim;
        if (lua_type(L, -1) == LUA_TTABLE) {
            lua_getfield(L, -1, "soft");
            lua_getfield(L, -2, "hard");
            lim.rlim_cur = rlimit_value(L, -2, name);
            lim.rlim_max = rlimit_value(L, -1, name);
            lua_pop(L, 2);
        } else {
            lim.rlim_cur = lim.rlim_max = rlimit_value(L, -1, name);
        }
        if (lim.rlim_cur > lim.rlim_max)
            luaL_error(L, "spawn: spec.rlimits.%s: soft limit above the hard limit", name);
        if (a->nrlimits == MAX_RLIMITS) luaL_error(L, "spawn: too many rlimits");
        a->rlimits[a->nrlimits].resource = rlimit_names[j].resource;
        a->rlimits[a->nrlimits].lim = lim;
        a->nrlimits++;
        lua_pop(L, 1);
    }
    lua_pop(L, 1);
}

/* Resolve a name without "/" along PATH, as execvp would, but here in the
 * parent so the error is precise. Relative PATH entries are taken relative
 * to the child's cwd, where exec would look. Returns 0 or an errno; the path
 * is pushed and anchored on success. */
static int resolve_path(spec_reader *r, const char *name, const char *pathvar, const char *cwd,
                        const char **out) {
    lua_State *L = r->L;
    if (strchr(name, '/')) { *out = name; return 0; }
    int err = ENOENT;
    for (const char *p = pathvar;; ) {
        const char *end = strchr(p, ':');
        size_t dlen = end ? (size_t)(end - p) : strlen(p);
        char cand[PATH_MAX];
        int len;
        if (dlen == 0) len = snprintf(cand, sizeof cand, "%s%s%s", cwd ? cwd : "", cwd ? "/" : "", name);
        else if (p[0] != '/' && cwd) len = snprintf(cand, sizeof cand, "%s/%.*s/%s", cwd, (int)dlen, p, name);
        else len = snprintf(cand, sizeof cand, "%.*s/%s", (int)dlen, p, name);
        struct stat st;
        if (len > 0 && (size_t)len < sizeof cand && stat(cand, &st) == 0) {
            if (S_ISREG(st.st_mode) && access(cand, X_OK) == 0) {
                lua_pushstring(L, cand);
                *out = anchor_top(r);
                return 0;
            }
            err = EACCES; /* execvp's rule: found but not runnable wins over not found */
        }
        if (!end) break;
        p = end + 1;
    }
    return err;
}

/* ---- spawn ------------------------------------------------------------- */

static int above_stdio(int fd);

static void close_fd(int *fd) {
    if (*fd >= 0) close(*fd);
    *fd = -1;
}

static int fail_spawn(lua_State *L, const char *path, const char *stage, int err) {
    return tn_fail_errno(L, lua_pushfstring(L, "spawn %s: %s", path, stage), err);
}

/* exec said ENOENT of a program that was found: what is missing is what
 * the program names, its #! interpreter or its ELF loader, and a bare
 * "no such file" sends one looking for the program. Pushes the hint, or
 * nothing. -> 1 | 0 */
static int push_enoent_hint(lua_State *L, const char *path, int exec_fd) {
    char head[256];
    int fd = exec_fd >= 0 ? exec_fd : open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return 0;
    ssize_t n = pread(fd, head, sizeof head - 1, 0);
    if (fd != exec_fd) close(fd);
    if (n >= 4 && memcmp(head, "\x7f" "ELF", 4) == 0) {
        lua_pushliteral(L, "its ELF interpreter, the dynamic loader, is missing");
        return 1;
    }
    if (n < 3 || head[0] != '#' || head[1] != '!') return 0;
    head[n] = '\0';
    char *interp = head + 2;
    interp += strspn(interp, " \t");
    interp[strcspn(interp, " \t\n")] = '\0';
    if (!*interp) return 0;
    lua_pushfstring(L, "its interpreter %s is missing", interp);
    return 1;
}

/* Reap a child known to be exiting or killed. Blocks only for the moment
 * the kernel needs to finish the exit. */
static void reap_now(int pidfd) {
    siginfo_t si;
    for (;;) {
        if (waitid(P_PIDFD, (id_t)pidfd, &si, WEXITED) == 0) return;
        if (errno == EAGAIN) { /* a non-blocking pidfd */
            struct pollfd pfd = {.fd = pidfd, .events = POLLIN};
            poll(&pfd, 1, -1);
        } else if (errno != EINTR) {
            return;
        }
    }
}

/* The child's stack: mapped on a thread's first spawn and kept. One is
 * enough, since CLONE_VFORK holds the thread until the child has left our
 * memory (exec or exit); a fresh mapping each time cost an mmap, a munmap
 * (with a TLB shootdown of the CPU the child ran on) and the page faults of
 * the stack, at every spawn. */
static void *child_stack(void) {
    static _Thread_local void *stack;
    if (!stack) {
        void *m = mmap(NULL, CHILD_STACK_SIZE, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK | MAP_NORESERVE, -1, 0);
        if (m != MAP_FAILED) stack = m;
    }
    return stack;
}

/* clone3(CLONE_INTO_CGROUP): the child is born in its cgroup2 group. Moving
 * it there by a write to cgroup.procs (as cgroup v1 must) takes the
 * kernel's cgroup_threadgroup_rwsem for writing, which waits for an RCU
 * grace period unless one passed moments before: about 7 ms on a VM where
 * spawns are a second apart, with this thread frozen in vfork all along.
 * glibc has no clone3 wrapper that runs a function on a new stack, so the
 * child's side is a few instructions here: it calls child_main on the
 * stack given and exits with its value (child_main execs or _exits). */
#if defined(__x86_64__) && !defined(__ILP32__) && defined(SYS_clone3)
/* the kernel's struct clone_args as of 5.7 (linux/sched.h, whose macros
 * would clash with glibc's sched.h) */
#define TN_CLONE_INTO_CGROUP 0x200000000ULL
_Static_assert(CHILD_STACK_SIZE % 16 == 0, "the child's first call needs a 16-byte aligned stack");
struct tn_clone_args {
    uint64_t flags, pidfd, child_tid, parent_tid, exit_signal, stack, stack_size, tls;
    uint64_t set_tid, set_tid_size, cgroup;
};
static pid_t clone_into_cgroup(struct child_args *a, void *stack, unsigned long flags, int *pidfd) {
    struct tn_clone_args ca;
    memset(&ca, 0, sizeof ca);
    ca.flags = (uint64_t)(uint32_t)flags | TN_CLONE_INTO_CGROUP;
    ca.pidfd = (uint64_t)(uintptr_t)pidfd;
    ca.exit_signal = SIGCHLD;
    ca.stack = (uint64_t)(uintptr_t)stack;
    ca.stack_size = CHILD_STACK_SIZE;
    ca.cgroup = (uint64_t)a->cgroup_into;
    long ret;
    int (*fn)(void *) = child_main;
    __asm__ volatile(
        "mov %[fn], %%r12\n\t"
        "mov %[arg], %%r13\n\t"
        "syscall\n\t"
        "test %%rax, %%rax\n\t"
        "jnz 1f\n\t"
        /* the child, on its own stack: no frame of ours to return to */
        "xor %%ebp, %%ebp\n\t"
        "mov %%r13, %%rdi\n\t"
        "call *%%r12\n\t"
        "mov %%eax, %%edi\n\t"
        "mov %[exit_nr], %%eax\n\t"
        "syscall\n\t"
        "ud2\n\t"
        "1:\n\t"
        : "=a"(ret)
        : "a"((long)SYS_clone3), "D"(&ca), "S"(sizeof ca), [fn] "r"(fn), [arg] "r"(a),
          [exit_nr] "i"(SYS_exit)
        : "rcx", "r11", "r12", "r13", "memory");
    if (ret < 0) {
        errno = (int)-ret;
        return -1;
    }
    return (pid_t)ret;
}
#else
static pid_t clone_into_cgroup(struct child_args *a, void *stack, unsigned long flags, int *pidfd) {
    (void)a; (void)stack; (void)flags; (void)pidfd;
    errno = ENOSYS;
    return -1;
}
#endif

static int clone3_unusable;

/* spec.netns_fd is the spawn's to close, whatever happens (an error in the
 * spec included): a network namespace lives while an fd refers to it, so
 * one left open would keep a namespace per spawn. The fd is held in a
 * to-be-closed slot of the call until the clone no longer needs it. */
#define FD_HOLD_MT "tenement.proc.fd_hold"
typedef struct { int fd; } fd_hold;

static int fd_hold_close(lua_State *L) {
    fd_hold *h = luaL_checkudata(L, 1, FD_HOLD_MT);
    if (h->fd >= 0) close(h->fd);
    h->fd = -1;
    return 0;
}

/* spec[key]: an fd, or -1 when absent; above 2 unless any_fd (0 to 2 become
 * the child's stdio before exec) */
static int opt_fd(lua_State *L, const char *key, int any_fd) {
    int fd = -1;
    if (lua_getfield(L, 1, key) != LUA_TNIL) {
        lua_Integer v = lua_tointeger(L, -1);
        if (!lua_isinteger(L, -1) || v < (any_fd ? 0 : 3) || v > INT_MAX)
            luaL_error(L, "spawn: spec.%s must be a file descriptor%s", key, any_fd ? "" : " above 2");
        fd = (int)v;
    }
    lua_pop(L, 1);
    return fd;
}

static fd_hold *read_netns_fd(lua_State *L) {
    fd_hold *h = lua_newuserdatauv(L, sizeof *h, 0);
    h->fd = -1;
    luaL_setmetatable(L, FD_HOLD_MT);
    lua_toclose(L, -1);
    h->fd = opt_fd(L, "netns_fd", 0);
    return h;
}

/* proc.spawn(spec) -> process | nil, err, code */
static int l_proc_spawn(lua_State *L) {
    static const char *const stdio_names[] = {"stdin", "stdout", "stderr"};
    luaL_checktype(L, 1, LUA_TTABLE);
    lua_settop(L, 1);
    lua_newtable(L);
    spec_reader r = {L, 2, 0};
    fd_hold *netns = read_netns_fd(L); /* 3 */
    check_spec_keys(L);
    struct child_args a;
    memset(&a, 0, sizeof a);
    a.parent_pidfd = -1;
    a.exec_fd = -1;
    a.status_fd = -1;
    a.cgroup_into = -1;
    a.netns_fd = netns->fd;

    char **argv = read_argv(&r);
    char **envp = read_env(&r);
    a.argv = argv;
    a.envp = envp;
    if (lua_getfield(L, 1, "cwd") != LUA_TNIL) a.cwd = checked_cstring(L, -1, "spec.cwd");
    lua_rawseti(L, r.anchor, ++r.nanchor);

    enum stdio_kind kind[3];
    int user_fd[3] = {-1, -1, -1};
    kind[0] = read_stdio(L, "stdin", STDIO_NULL, &user_fd[0]);
    kind[1] = read_stdio(L, "stdout", STDIO_PIPE, &user_fd[1]);
    kind[2] = read_stdio(L, "stderr", STDIO_PIPE, &user_fd[2]);

    a.setsid = opt_bool(L, "setsid");
    read_sigmask(L, &a.mask);
    int status_pipe = opt_bool(L, "status_pipe");
    int kill_group_at_exit = opt_bool(L, "kill_group_at_exit");
    a.no_new_privs = opt_bool(L, "no_new_privs");
    int t = lua_getfield(L, 1, "pdeathsig");
    if (t == LUA_TNIL || (t == LUA_TBOOLEAN && lua_toboolean(L, -1))) a.pdeathsig = SIGKILL;
    else if (t == LUA_TBOOLEAN) a.pdeathsig = 0;
    else a.pdeathsig = tn_check_signal(L, -1);
    lua_pop(L, 1);

    size_t n;
    a.cgroup_fds = read_int_list(&r, "cgroup_fds", 0, &n);
    a.ncgroup_fds = (int)n;
    a.cgroup_into = opt_fd(L, "cgroup_into", 1);
    /* the same answer whichever way the child gets there: clone3 refuses
     * anything else, and the fallback's write would land in another
     * hierarchy */
    struct statfs into_fs;
    if (a.cgroup_into >= 0 && (fstatfs(a.cgroup_into, &into_fs) != 0 || into_fs.f_type != CGROUP2_SUPER_MAGIC))
        return tn_fail_errno(L, "spawn: spec.cgroup_into is not a cgroup2 directory", EBADF);
    a.groups = read_int_list(&r, "groups", 1, &a.ngroups);
    a.set_groups = a.groups != NULL;
    lua_Integer id;
    if ((a.set_uid = opt_id(L, "uid", &id))) a.uid = (uid_t)id;
    if ((a.set_gid = opt_id(L, "gid", &id))) a.gid = (gid_t)id;
    if (a.set_uid && !a.set_gid)
        luaL_error(L, "spawn: spec.uid needs spec.gid too (the group would stay the server's)");
    /* Changing identity without naming groups must not keep root's
     * supplementary groups. */
    if (!a.set_groups && (a.set_uid || a.set_gid) && geteuid() == 0) a.set_groups = 1;
    read_rlimits(L, &a);
    int ns_flags = read_clone_flags(L);
    read_namespace_setup(L, &r, &a, ns_flags);
    a.exec_fd = opt_fd(L, "exec_fd", 0);

    const char *pathvar = DEFAULT_PATH;
    for (char **e = envp; *e; e++) {
        if (strncmp(*e, "PATH=", 5) == 0) { pathvar = *e + 5; break; }
    }
    const char *name = argv[0];
    int err = 0;
    if (a.exec_fd >= 0) a.path = name;
    else err = resolve_path(&r, name, pathvar, a.cwd, &a.path);
    if (err) {
        lua_pushnil(L);
        lua_pushfstring(L, "spawn %s: exec: %s: %s (not found in PATH %s)", name,
                        uv_err_name(uv_translate_sys_error(err)),
                        uv_strerror(uv_translate_sys_error(err)), pathvar);
        lua_pushstring(L, uv_err_name(uv_translate_sys_error(err)));
        return 3;
    }

    /* The Lua objects first: nothing below may raise while fds are open. */
    tn_proc *p = calloc(1, sizeof *p);
    if (!p) return luaL_error(L, "out of memory");
    p->refs = 1;
    p->pidfd = -1;
    p->status_fd = -1;
    proc_box *box = lua_newuserdatauv(L, sizeof *box, 1);
    box->p = p;
    box->pid = 0;
    luaL_setmetatable(L, PROC_MT);
    int box_idx = lua_gettop(L);
    lua_createtable(L, 0, 3);
    proc_pipe *pipes[3] = {NULL, NULL, NULL};
    lua_State *main_L;
    lua_rawgeti(L, LUA_REGISTRYINDEX, LUA_RIDX_MAINTHREAD);
    main_L = lua_tothread(L, -1);
    lua_pop(L, 1);
    for (int i = 0; i < 3; i++) {
        if (kind[i] != STDIO_PIPE) continue;
        pipe_box *pb = lua_newuserdatauv(L, sizeof *pb, 0);
        pb->pp = NULL;
        luaL_setmetatable(L, PIPE_MT);
        proc_pipe *pp = calloc(1, sizeof *pp);
        if (!pp) return luaL_error(L, "out of memory");
        pb->pp = pp;
        pp->refs = 1;
        pp->L = main_L;
        pp->name = stdio_names[i];
        pp->writable = i == 0;
        pp->anchor_ref = LUA_NOREF;
        pipes[i] = pp;
        lua_setfield(L, -2, stdio_names[i]);
    }
    lua_setiuservalue(L, box_idx, 1);
    uv_loop_t *loop = tn_loop(L);

    /* Resources: from here on, failures clean up and return. */
    int ours[3] = {-1, -1, -1};     /* our ends of the pipes */
    int theirs[3] = {-1, -1, -1};   /* the child's ends */
    int devnull = -1;
    const char *fail_stage = NULL;
    int fail_err = 0;
    void *stack = NULL;
    for (int i = 0; i < 3 && !fail_stage; i++) {
        switch (kind[i]) {
        case STDIO_PIPE: {
            int fds[2];
            if (pipe2(fds, O_CLOEXEC) != 0) { fail_stage = "pipe"; fail_err = errno; break; }
            ours[i] = i == 0 ? fds[1] : fds[0];
            theirs[i] = i == 0 ? fds[0] : fds[1];
            a.stdio[i] = theirs[i];
            break;
        }
        case STDIO_NULL:
            if (devnull < 0) devnull = open("/dev/null", O_RDWR | O_CLOEXEC);
            if (devnull < 0) { fail_stage = "open /dev/null"; fail_err = errno; break; }
            a.stdio[i] = devnull;
            break;
        case STDIO_INHERIT: a.stdio[i] = -1; break;
        case STDIO_FD: a.stdio[i] = user_fd[i]; break;
        }
    }
    int status_r = -1;
    if (!fail_stage && status_pipe) {
        int fds[2];
        if (pipe2(fds, O_CLOEXEC | O_NONBLOCK) != 0) { fail_stage = "status pipe"; fail_err = errno; }
        else {
            /* 0 to 2 are what the child's dup2s overwrite */
            status_r = above_stdio(fds[0]);
            a.status_fd = above_stdio(fds[1]);
            if (status_r < 0 || a.status_fd < 0) { fail_stage = "status pipe"; fail_err = errno; }
        }
    }
    a.parent_pid = getpid();
    if (!fail_stage && a.pdeathsig && (ns_flags & CLONE_NEWPID)) {
        a.parent_pidfd = (int)syscall(SYS_pidfd_open, a.parent_pid, 0);
        if (a.parent_pidfd < 0) { fail_stage = "pidfd_open"; fail_err = errno; }
    }
    if (!fail_stage) {
        stack = child_stack();
        if (!stack) { fail_stage = "mmap"; fail_err = errno; }
    }

    int pidfd = -1;
    pid_t pid = -1;
    if (!fail_stage) {
        sigset_t all, old;
        sigfillset(&all);
        pthread_sigmask(SIG_BLOCK, &all, &old);
        pid = -1;
        int e = 0, tried = a.cgroup_into >= 0 && !clone3_unusable;
        if (tried) {
            /* set before: the child reads it while this thread waits */
            a.into_done = 1;
            pid = clone_into_cgroup(&a, stack, CLONE_VM | CLONE_VFORK | CLONE_PIDFD | ns_flags, &pidfd);
            e = errno;
            if (pid < 0) a.into_done = 0;
            /* no clone3 here (before 5.7, another architecture, a seccomp
             * filter saying EPERM): not worth a try at every spawn */
            if (pid < 0 && (e == ENOSYS || e == E2BIG || (e == EPERM && !ns_flags))) clone3_unusable = 1;
        }
        /* The group itself refusing the child is final; anything else is
         * tried again the old way, the child moving itself (as for v1),
         * which fails the spawn if the group will not have it. */
        int group_refused = tried && pid < 0 &&
            (e == EBADF || e == ENOENT || e == ENODEV || e == EACCES || e == EBUSY || e == EOPNOTSUPP);
        if (pid < 0 && !group_refused) {
            pid = clone(child_main, (char *)stack + CHILD_STACK_SIZE,
                        CLONE_VM | CLONE_VFORK | CLONE_PIDFD | ns_flags | SIGCHLD, &a, &pidfd);
            e = errno;
        }
        pthread_sigmask(SIG_SETMASK, &old, NULL);
        if (pid < 0) {
            fail_stage = group_refused ? "clone3 into spec.cgroup_into" : "clone";
            fail_err = e;
        }
    }
    for (int i = 0; i < 3; i++) close_fd(&theirs[i]);
    close_fd(&devnull);
    close_fd(&a.parent_pidfd);
    close_fd(&netns->fd);
    close_fd(&a.status_fd);

    if (fail_stage || a.stage != ST_NONE) close_fd(&status_r);
    if (!fail_stage && a.stage != ST_NONE) {
        /* The child failed before exec and is exiting: vfork let us go at
         * its mm release, moments before it becomes a zombie. */
        reap_now(pidfd);
        close_fd(&pidfd);
        for (int i = 0; i < 3; i++) close_fd(&ours[i]);
        const char *stage = stage_names[a.stage];
        if (a.stage == ST_CHDIR) stage = lua_pushfstring(L, "chdir %s", a.cwd);
        else if (a.stage == ST_STDIO) stage = lua_pushfstring(L, "dup2 %s", stdio_names[a.stage_arg]);
        else if (a.stage == ST_USERNS) {
            static const char *const files[] = {"setgroups", "uid_map", "gid_map"};
            stage = lua_pushfstring(L, "user namespace: write /proc/self/%s", files[a.stage_arg]);
        } else if (a.stage == ST_CGROUP) {
            stage = a.stage_arg < a.ncgroup_fds ? lua_pushfstring(L, "cgroup (cgroup_fds[%d])", a.stage_arg + 1)
                                                 : "cgroup (cgroup_into)";
        }
        else if (a.stage == ST_ROOT) {
            if (a.stage_arg >= 0) {
                const struct root_op *op = &a.root_ops[a.stage_arg];
                static const char *const kinds[] = {"bind", "tmpfs", "symlink"};
                stage = lua_pushfstring(L, "file system wall: %s%s%s %s%s", kinds[op->kind], op->src ? " " : "",
                                        op->src ? op->src : "", op->where, op->ro ? " (read-only)" : "");
            } else {
                static const char *const steps[] = {"", "mount a tmpfs as the new root", "mount proc",
                                                    "pivot_root", "make the new root read-only"};
                stage = lua_pushfstring(L, "file system wall: %s on %s", steps[-a.stage_arg], a.root_dir);
            }
        }
        else if (a.stage == ST_SETUID) stage = lua_pushfstring(L, "setuid %d", (int)a.uid);
        else if (a.stage == ST_SETGID) stage = lua_pushfstring(L, "setgid %d", (int)a.gid);
        else if (a.stage == ST_RLIMIT) {
            int j = 0;
            while (rlimit_names[j].name && rlimit_names[j].resource != a.rlimits[a.stage_arg].resource) j++;
            stage = lua_pushfstring(L, "setrlimit %s", rlimit_names[j].name ? rlimit_names[j].name : "?");
        }
        int nret = fail_spawn(L, a.path, stage, a.err);
        if (a.stage == ST_EXEC && a.err == ENOENT && push_enoent_hint(L, a.path, a.exec_fd)) {
            lua_pushfstring(L, "%s (%s)", lua_tostring(L, -3), lua_tostring(L, -1));
            lua_replace(L, -4);
            lua_pop(L, 1);
        }
        return nret;
    }
    if (fail_stage) {
        for (int i = 0; i < 3; i++) close_fd(&ours[i]);
        return fail_spawn(L, a.path, fail_stage, fail_err);
    }

    int rc = uv_poll_init(loop, &p->poll, pidfd);
    if (rc) {
        /* Cannot watch it, so it must not run unwatched. */
        syscall(SYS_pidfd_send_signal, pidfd, SIGKILL, NULL, 0);
        reap_now(pidfd);
        close_fd(&pidfd);
        close_fd(&status_r);
        for (int i = 0; i < 3; i++) close_fd(&ours[i]);
        return tn_fail_uv(L, lua_pushfstring(L, "spawn %s: watch pidfd", a.path), rc);
    }
    p->poll.data = p;
    p->pid = pid;
    p->pidfd = pidfd;
    p->status_fd = status_r;
    p->kill_group_at_exit = kill_group_at_exit;
    p->watching = 1;
    p->refs++;
    box->pid = pid;
    uv_poll_start(&p->poll, UV_READABLE, proc_poll_cb);
    uv_unref((uv_handle_t *)&p->poll);

    for (int i = 0; i < 3; i++) {
        proc_pipe *pp = pipes[i];
        if (!pp) continue;
        pp->pid = pid;
        uv_pipe_init(loop, &pp->h, 0);
        pp->h.data = pp;
        pp->refs++;
        pp->state = PIPE_OPEN;
        rc = uv_pipe_open(&pp->h, ours[i]);
        if (rc) { pp->open_err = rc; close_fd(&ours[i]); }
    }
    lua_pushvalue(L, box_idx);
    return 1;
}

/* ---- module functions -------------------------------------------------- */

/* proc.environ() -> { K = V }: the server's own environment, for Lua policy
 * to pick an allow-list from. */
static int l_proc_environ(lua_State *L) {
    lua_newtable(L);
    for (char **e = environ; e && *e; e++) {
        const char *eq = strchr(*e, '=');
        if (!eq || eq == *e) continue;
        lua_pushlstring(L, *e, (size_t)(eq - *e));
        lua_pushstring(L, eq + 1);
        lua_rawset(L, -3);
    }
    return 1;
}

/* An fd kept for spawns, moved above 2 if it is not (a server started
 * with stdio closed): 0 to 2 are what a spawn overwrites. Takes fd; -> the
 * fd to keep | -1 (errno), fd closed. */
static int above_stdio(int fd) {
    if (fd < 0 || fd > 2) return fd;
    int moved = fcntl(fd, F_DUPFD_CLOEXEC, 3);
    int e = errno;
    close(fd);
    errno = e;
    return moved;
}

/* proc.init_fd() -> fd | nil, err, code: the init of namespaced instances
 * (c/init.c built alone, embedded at build time) in a memfd, for
 * spec.exec_fd. Made on the first call and kept open for the life of the
 * process: one copy in memory for every instance. Sealed against any write,
 * growth or shrinking, so nothing can change what later instances run as
 * PID 1; close-on-exec, so no child keeps it. */
static int init_fd = -1;

static int l_proc_init_fd(lua_State *L) {
    if (init_fd >= 0) {
        lua_pushinteger(L, init_fd);
        return 1;
    }
    int fd = memfd_create("tenement-init", MFD_CLOEXEC | MFD_ALLOW_SEALING | MFD_EXEC);
    /* Before 6.3 the kernel knows no MFD_EXEC, and every memfd may be run. */
    if (fd < 0 && errno == EINVAL) fd = memfd_create("tenement-init", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (fd < 0) return tn_fail_errno(L, "init: memfd_create", errno);
    const char *stage = NULL;
    int err = 0;
    for (size_t off = 0; off < tn_init_image_size && !stage; ) {
        ssize_t n = write(fd, tn_init_image + off, tn_init_image_size - off);
        if (n > 0) off += (size_t)n;
        else if (n < 0 && errno != EINTR) { stage = "init: write the memfd"; err = errno; }
    }
    if (!stage && fcntl(fd, F_ADD_SEALS, F_SEAL_WRITE | F_SEAL_GROW | F_SEAL_SHRINK | F_SEAL_SEAL) != 0) {
        stage = "init: seal the memfd";
        err = errno;
    }
    if (!stage && (fd = above_stdio(fd)) < 0) { stage = "init: move the memfd above 2"; err = errno; }
    if (stage) {
        if (fd >= 0) close(fd);
        return tn_fail_errno(L, stage, err);
    }
    init_fd = fd;
    lua_pushinteger(L, init_fd);
    return 1;
}

/* proc.netns_new() -> fd | nil, err, code: a new network namespace with lo
 * up, for spec.netns_fd. Making one takes the kernel about a millisecond,
 * and inside a clone(CLONE_NEWNET) that millisecond is the loop's, frozen
 * in vfork: made ahead by a thread, it is the thread's. A thread of its own
 * (unshare moves only the calling thread), which ends with it: no thread of
 * the pool is ever left in another namespace. */
typedef struct {
    tn_work req;
    tn_task *task;
    uint64_t seq;
    int fd, err;
    const char *stage;
} netns_op;

static void *netns_thread(void *arg) {
    netns_op *op = arg;
    if (unshare(CLONE_NEWNET) != 0) { op->stage = "unshare(CLONE_NEWNET)"; op->err = errno; return NULL; }
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    memcpy(ifr.ifr_name, "lo", 3);
    if (lo_up(&ifr) != 0) { op->stage = "bring up lo"; op->err = errno; return NULL; }
    int fd = above_stdio(open("/proc/thread-self/ns/net", O_RDONLY | O_CLOEXEC));
    if (fd < 0) { op->stage = "open /proc/thread-self/ns/net"; op->err = errno; return NULL; }
    op->fd = fd;
    return NULL;
}

static void netns_work(tn_work *req) {
    netns_op *op = req->data;
    pthread_t t;
    int rc = pthread_create(&t, NULL, netns_thread, op);
    if (rc != 0) { op->stage = "pthread_create"; op->err = rc; return; }
    pthread_join(t, NULL);
}

static void netns_done(tn_work *req) {
    netns_op *op = req->data;
    if (tn_task_waiting_for(op->task, op->seq)) {
        lua_State *co = tn_task_thread(op->task);
        if (op->fd >= 0) {
            lua_pushinteger(co, op->fd);
            op->fd = -1;
            tn_task_resume(op->task, 1);
        } else {
            tn_fail_errno(co, lua_pushfstring(co, "netns: %s", op->stage), op->err);
            lua_remove(co, -4); /* the message pushed for tn_fail_errno */
            tn_task_resume(op->task, 3);
        }
    }
    if (op->fd >= 0) close(op->fd);
    tn_task_release(op->task);
    free(op);
}

static int l_proc_netns_new(lua_State *L) {
    tn_task *t = tn_task_check(L);
    netns_op *op = calloc(1, sizeof *op);
    if (!op) return luaL_error(L, "out of memory");
    op->fd = -1;
    op->req.data = op;
    op->task = tn_task_hold(t);
    op->seq = tn_task_seq(t);
    tn_work_queue(tn_loop(L), &op->req, netns_work, netns_done);
    lua_settop(L, 0);
    return tn_task_wait(L, t, -1);
}

static int l_proc_getpid(lua_State *L) {
    lua_pushinteger(L, getpid());
    return 1;
}

/* proc.geteuid() -> the uid whose rights this process has */
static int l_proc_geteuid(lua_State *L) {
    lua_pushinteger(L, (lua_Integer)geteuid());
    return 1;
}

/* proc.pid_namespace([pid]) -> the inode of the process's PID namespace
 * (this process's without pid) | nil, err. Two processes share a PID
 * namespace when the numbers are equal. */
static int l_proc_pid_namespace(lua_State *L) {
    char path[64];
    if (lua_isnoneornil(L, 1)) snprintf(path, sizeof path, "/proc/self/ns/pid");
    else snprintf(path, sizeof path, "/proc/%lld/ns/pid", (long long)luaL_checkinteger(L, 1));
    struct stat st;
    if (stat(path, &st) != 0) return tn_fail_errno(L, path, errno);
    lua_pushinteger(L, (lua_Integer)st.st_ino);
    return 1;
}

/* proc.kill(pid, [sig="SIGTERM"]) -> true | nil, err, code. A raw pid (a
 * negative one is a process group): no protection against reuse. */
static int l_proc_rawkill(lua_State *L) {
    lua_Integer pid = luaL_checkinteger(L, 1);
    int sig = lua_isnoneornil(L, 2) ? SIGTERM : tn_check_signal(L, 2);
    if (pid == 0 || pid == -1 || pid < INT_MIN || pid > INT_MAX)
        return luaL_argerror(L, 1, "refusing to signal our own group or every process");
    if (kill((pid_t)pid, sig) != 0)
        return tn_fail_errno(L, lua_pushfstring(L, "kill %d", (int)pid), errno);
    lua_pushboolean(L, 1);
    return 1;
}

/* proc.signal_name(n) -> "SIGKILL" | nil */
static int l_proc_signal_name(lua_State *L) {
    char buf[32];
    lua_Integer n = luaL_checkinteger(L, 1);
    const char *s = n > 0 && n < NSIG ? signal_name((int)n, buf, sizeof buf) : NULL;
    if (s) lua_pushstring(L, s);
    else lua_pushnil(L);
    return 1;
}

int tn_open_proc(lua_State *L) {
    static const luaL_Reg proc_methods[] = {
        {"wait", l_proc_wait}, {"kill", l_proc_kill}, {"status", l_proc_status},
        {"close", l_proc_close}, {NULL, NULL},
    };
    static const luaL_Reg pipe_methods[] = {
        {"read", l_pipe_read}, {"write", l_pipe_write}, {"close", l_pipe_close},
        {"__gc", l_pipe_gc}, {"__close", l_pipe_close}, {"__tostring", l_pipe_tostring},
        {NULL, NULL},
    };
    static const luaL_Reg fns[] = {
        {"spawn", l_proc_spawn}, {"environ", l_proc_environ}, {"getpid", l_proc_getpid}, {"geteuid", l_proc_geteuid},
        {"pid_namespace", l_proc_pid_namespace},
        {"rlimit", l_proc_rlimit},
        {"init_fd", l_proc_init_fd}, {"netns_new", l_proc_netns_new},
        {"kill", l_proc_rawkill}, {"signal_name", l_proc_signal_name}, {NULL, NULL},
    };
    /* SIGPIPE is ignored by the module's open (module.c); children get it
     * back at its default (child_main). */
    luaL_newmetatable(L, FD_HOLD_MT);
    lua_pushcfunction(L, fd_hold_close);
    lua_setfield(L, -2, "__close");
    lua_pop(L, 1);
    luaL_newmetatable(L, PROC_MT);
    lua_pushcfunction(L, l_proc_gc);
    lua_setfield(L, -2, "__gc");
    lua_pushcfunction(L, l_proc_close);
    lua_setfield(L, -2, "__close");
    lua_pushcfunction(L, l_proc_tostring);
    lua_setfield(L, -2, "__tostring");
    luaL_newlib(L, proc_methods);
    lua_pushcclosure(L, l_proc_index, 1);
    lua_setfield(L, -2, "__index");
    lua_pop(L, 1);
    tn_new_class(L, PIPE_MT, pipe_methods);
    luaL_newlib(L, fns);
    return 1;
}
