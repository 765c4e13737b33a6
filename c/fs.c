/*
 * core.fs: the file operations the supervisor needs (instance directories,
 * stale sockets, atomic state files). They are metadata operations on local
 * disks, short enough to run on the loop thread; bulk data goes elsewhere.
 */
#include "tn.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <unistd.h>

/* fs.mkdir(path [, mode=0755 [, parents=true]]) -> true | nil, err, code */
static int l_mkdir(lua_State *L) {
    const char *path = luaL_checkstring(L, 1);
    mode_t mode = (mode_t)luaL_optinteger(L, 2, 0755);
    int parents = lua_isnoneornil(L, 3) ? 1 : lua_toboolean(L, 3);
    char buf[PATH_MAX];
    if (strlen(path) >= sizeof buf) return tn_fail(L, "mkdir %s: path too long", path);
    strcpy(buf, path);
    if (parents) {
        for (char *p = buf + 1; *p; p++) {
            if (*p != '/') continue;
            *p = '\0';
            if (mkdir(buf, 0755) != 0 && errno != EEXIST) {
                int e = errno;
                *p = '/';
                return tn_fail_errno(L, lua_pushfstring(L, "mkdir %s", buf), e);
            }
            *p = '/';
        }
    }
    if (mkdir(buf, mode) != 0) {
        struct stat st;
        if (!(errno == EEXIST && parents && stat(buf, &st) == 0 && S_ISDIR(st.st_mode)))
            return tn_fail_errno(L, lua_pushfstring(L, "mkdir %s", path), errno);
    }
    lua_pushboolean(L, 1);
    return 1;
}

static int rm_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw) {
    (void)st; (void)ftw;
    int rc = (flag == FTW_DP) ? rmdir(path) : unlink(path);
    return (rc != 0 && errno != ENOENT) ? errno : 0;
}

/* fs.rmtree(path) -> true | nil, err, code. Symlinks are removed, never
 * followed, so a link planted in an instance directory cannot aim the
 * removal elsewhere. A missing path is success. */
static int l_rmtree(lua_State *L) {
    const char *path = luaL_checkstring(L, 1);
    if (path[0] == '\0' || strcmp(path, "/") == 0)
        return luaL_argerror(L, 1, "refusing to remove the root or an empty path");
    struct stat st;
    if (lstat(path, &st) != 0) {
        if (errno == ENOENT) { lua_pushboolean(L, 1); return 1; }
        return tn_fail_errno(L, lua_pushfstring(L, "rmtree %s", path), errno);
    }
    int rc = S_ISDIR(st.st_mode) ? nftw(path, rm_entry, 32, FTW_DEPTH | FTW_PHYS | FTW_MOUNT)
                                 : (unlink(path) == 0 ? 0 : errno);
    if (rc != 0) return tn_fail_errno(L, lua_pushfstring(L, "rmtree %s", path), rc > 0 ? rc : errno);
    lua_pushboolean(L, 1);
    return 1;
}

/* fs.unlink(path) -> true | nil, err, code */
static int l_unlink(lua_State *L) {
    const char *path = luaL_checkstring(L, 1);
    if (unlink(path) != 0) return tn_fail_errno(L, lua_pushfstring(L, "unlink %s", path), errno);
    lua_pushboolean(L, 1);
    return 1;
}

static const char *type_name(mode_t m) {
    if (S_ISREG(m)) return "file";
    if (S_ISDIR(m)) return "directory";
    if (S_ISLNK(m)) return "link";
    if (S_ISSOCK(m)) return "socket";
    if (S_ISFIFO(m)) return "fifo";
    if (S_ISCHR(m)) return "char";
    if (S_ISBLK(m)) return "block";
    return "unknown";
}

/* fs.stat(path [, follow=true]) -> {type, size, mode, uid, gid, mtime, allocated, dev, ino}
 * | nil, err, code (dev and ino: which file it is, whatever its name) */
static int l_stat(lua_State *L) {
    const char *path = luaL_checkstring(L, 1);
    int follow = lua_isnoneornil(L, 2) ? 1 : lua_toboolean(L, 2);
    struct stat st;
    if ((follow ? stat(path, &st) : lstat(path, &st)) != 0)
        return tn_fail_errno(L, lua_pushfstring(L, "stat %s", path), errno);
    lua_createtable(L, 0, 9);
    lua_pushstring(L, type_name(st.st_mode)); lua_setfield(L, -2, "type");
    lua_pushinteger(L, (lua_Integer)st.st_size); lua_setfield(L, -2, "size");
    lua_pushinteger(L, (lua_Integer)(st.st_mode & 07777)); lua_setfield(L, -2, "mode");
    lua_pushinteger(L, (lua_Integer)st.st_uid); lua_setfield(L, -2, "uid");
    lua_pushinteger(L, (lua_Integer)st.st_gid); lua_setfield(L, -2, "gid");
    lua_pushnumber(L, (lua_Number)st.st_mtim.tv_sec + st.st_mtim.tv_nsec / 1e9);
    lua_setfield(L, -2, "mtime");
    lua_pushinteger(L, (lua_Integer)st.st_blocks * 512); lua_setfield(L, -2, "allocated");
    lua_pushinteger(L, (lua_Integer)st.st_dev); lua_setfield(L, -2, "dev");
    lua_pushinteger(L, (lua_Integer)st.st_ino); lua_setfield(L, -2, "ino");
    return 1;
}

/* fs.read(path) -> contents | nil, err, code */
static int l_read(lua_State *L) {
    const char *path = luaL_checkstring(L, 1);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return tn_fail_errno(L, lua_pushfstring(L, "open %s", path), errno);
    luaL_Buffer b;
    luaL_buffinit(L, &b);
    for (;;) {
        char *p = luaL_prepbuffer(&b);
        ssize_t n = read(fd, p, LUAL_BUFFERSIZE);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) {
            int e = errno;
            close(fd);
            return tn_fail_errno(L, lua_pushfstring(L, "read %s", path), e);
        }
        if (n == 0) break;
        luaL_addsize(&b, (size_t)n);
    }
    close(fd);
    luaL_pushresult(&b);
    return 1;
}

static int write_all(int fd, const char *p, size_t n) {
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0 && errno == EINTR) continue;
        if (w < 0) return -1;
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

/* fs.write(path, data [, mode=0644]) -> true | nil, err, code.
 * Atomic and durable: a temporary file beside the target, fsync, rename,
 * fsync of the directory. A crash leaves the old file or the new one. */
static int l_write(lua_State *L) {
    size_t len;
    const char *path = luaL_checkstring(L, 1);
    const char *data = luaL_checklstring(L, 2, &len);
    mode_t mode = (mode_t)luaL_optinteger(L, 3, 0644);
    const char *tmp = lua_pushfstring(L, "%s.tmp.%d", path, (int)getpid());
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, mode);
    if (fd < 0) return tn_fail_errno(L, lua_pushfstring(L, "create %s", tmp), errno);
    if (fchmod(fd, mode) != 0 || write_all(fd, data, len) != 0 || fsync(fd) != 0) {
        int e = errno;
        close(fd);
        unlink(tmp);
        return tn_fail_errno(L, lua_pushfstring(L, "write %s", path), e);
    }
    close(fd);
    if (rename(tmp, path) != 0) {
        int e = errno;
        unlink(tmp);
        return tn_fail_errno(L, lua_pushfstring(L, "rename to %s", path), e);
    }
    char dir[PATH_MAX];
    const char *slash = strrchr(path, '/');
    if (slash && (size_t)(slash - path) < sizeof dir) {
        size_t n = slash == path ? 1 : (size_t)(slash - path);
        memcpy(dir, path, n);
        dir[n] = '\0';
    } else {
        strcpy(dir, ".");
    }
    int dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd >= 0) { fsync(dfd); close(dfd); }
    lua_pushboolean(L, 1);
    return 1;
}

/* fs.readdir(path) -> { names sorted } | nil, err, code */
static int l_readdir(lua_State *L) {
    const char *path = luaL_checkstring(L, 1);
    DIR *d = opendir(path);
    if (!d) return tn_fail_errno(L, lua_pushfstring(L, "opendir %s", path), errno);
    lua_newtable(L);
    lua_Integer i = 0;
    struct dirent *e;
    while ((e = readdir(d))) {
        if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0) continue;
        lua_pushstring(L, e->d_name);
        lua_rawseti(L, -2, ++i);
    }
    closedir(d);
    lua_getglobal(L, "table");
    lua_getfield(L, -1, "sort");
    lua_pushvalue(L, -3);
    lua_call(L, 1, 0);
    lua_pop(L, 1);
    return 1;
}

/* fs.realpath(path) -> absolute path | nil, err, code */
static int l_realpath(lua_State *L) {
    const char *path = luaL_checkstring(L, 1);
    char buf[PATH_MAX];
    if (!realpath(path, buf)) return tn_fail_errno(L, lua_pushfstring(L, "realpath %s", path), errno);
    lua_pushstring(L, buf);
    return 1;
}

/* fs.chmod(path, mode) -> true | nil, err, code */
static int l_chmod(lua_State *L) {
    const char *path = luaL_checkstring(L, 1);
    mode_t mode = (mode_t)luaL_checkinteger(L, 2);
    if (chmod(path, mode) != 0) return tn_fail_errno(L, lua_pushfstring(L, "chmod %s", path), errno);
    lua_pushboolean(L, 1);
    return 1;
}

/* fs.chown(path, uid, gid) -> true | nil, err, code (never follows a link) */
static int l_chown(lua_State *L) {
    const char *path = luaL_checkstring(L, 1);
    uid_t uid = (uid_t)luaL_checkinteger(L, 2);
    gid_t gid = (gid_t)luaL_checkinteger(L, 3);
    if (lchown(path, uid, gid) != 0) return tn_fail_errno(L, lua_pushfstring(L, "chown %s", path), errno);
    lua_pushboolean(L, 1);
    return 1;
}

/* fs.cwd() -> the current directory */
static int l_cwd(lua_State *L) {
    char buf[PATH_MAX];
    if (!getcwd(buf, sizeof buf)) return tn_fail_errno(L, "getcwd", errno);
    lua_pushstring(L, buf);
    return 1;
}

/* fs.isatty(fd) -> whether fd is a terminal */
static int l_isatty(lua_State *L) {
    lua_Integer fd = luaL_checkinteger(L, 1);
    lua_pushboolean(L, fd >= 0 && fd <= INT32_MAX && isatty((int)fd));
    return 1;
}

/* fs.access(path, "rwx") -> true | nil, err, code: may this process do it? */
static int l_access(lua_State *L) {
    const char *path = luaL_checkstring(L, 1);
    const char *how = luaL_optstring(L, 2, "");
    int mode = F_OK;
    if (strchr(how, 'r')) mode |= R_OK;
    if (strchr(how, 'w')) mode |= W_OK;
    if (strchr(how, 'x')) mode |= X_OK;
    if (access(path, mode) != 0) return tn_fail_errno(L, lua_pushfstring(L, "access %s", path), errno);
    lua_pushboolean(L, 1);
    return 1;
}

/* fs.open_fd(path, how) -> fd | nil, err, code. how is "r" (O_RDONLY) or
 * "w" (O_WRONLY, never creating or truncating): a raw descriptor, always
 * O_CLOEXEC, for spawn's cgroup_fds and stdio. The caller closes it with
 * fs.close_fd; Lua's garbage collector knows nothing of it. */
static int l_open_fd(lua_State *L) {
    const char *path = luaL_checkstring(L, 1);
    const char *how = luaL_checkstring(L, 2);
    int flags;
    if (strcmp(how, "r") == 0) flags = O_RDONLY;
    else if (strcmp(how, "w") == 0) flags = O_WRONLY;
    else return luaL_argerror(L, 2, "expected \"r\" or \"w\"");
    int fd = open(path, flags | O_CLOEXEC | O_NOCTTY);
    if (fd < 0) return tn_fail_errno(L, lua_pushfstring(L, "open %s", path), errno);
    lua_pushinteger(L, fd);
    return 1;
}

/* fs.lock(path) -> fd | nil, err, code: an exclusive flock on path (made,
 * mode 0600, if missing), without waiting: "EAGAIN" while another
 * open file holds it. The lock lasts as long as the descriptor, in this
 * process and in any child it is handed to (close_fd releases it). */
static int l_lock(lua_State *L) {
    const char *path = luaL_checkstring(L, 1);
    int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC | O_NOCTTY, 0600);
    if (fd < 0) return tn_fail_errno(L, lua_pushfstring(L, "open %s", path), errno);
    if (flock(fd, LOCK_EX | LOCK_NB) != 0) {
        int e = errno;
        close(fd);
        return tn_fail_errno(L, lua_pushfstring(L, "lock %s", path), e);
    }
    lua_pushinteger(L, fd);
    return 1;
}

/* fs.close_fd(fd) -> true | nil, err, code */
static int l_close_fd(lua_State *L) {
    lua_Integer fd = luaL_checkinteger(L, 1);
    if (fd < 0 || fd > INT_MAX) return luaL_argerror(L, 1, "not a file descriptor");
    if (close((int)fd) != 0 && errno != EINTR)
        return tn_fail_errno(L, lua_pushfstring(L, "close fd %d", (int)fd), errno);
    lua_pushboolean(L, 1);
    return 1;
}

/* fs.put(path, data) -> true | nil, err, code. Writes data into an existing
 * file in place, in one write(2): for kernel control files (cgroupfs, /proc,
 * /sys), which take a value per write and cannot be replaced by rename the
 * way fs.write replaces a file. The kernel's verdict on the value (EINVAL,
 * EBUSY, ...) comes back as the error. */
static int l_put(lua_State *L) {
    size_t len;
    const char *path = luaL_checkstring(L, 1);
    const char *data = luaL_checklstring(L, 2, &len);
    int fd = open(path, O_WRONLY | O_CLOEXEC | O_NOCTTY);
    if (fd < 0) return tn_fail_errno(L, lua_pushfstring(L, "open %s", path), errno);
    ssize_t w;
    do w = write(fd, data, len);
    while (w < 0 && errno == EINTR);
    int e = errno;
    close(fd);
    if (w < 0) return tn_fail_errno(L, lua_pushfstring(L, "write %s", path), e);
    if ((size_t)w != len) return tn_fail(L, "write %s: short write (%d of %d bytes)", path, (int)w, (int)len);
    lua_pushboolean(L, 1);
    return 1;
}

/* fs.rmdir(path) -> true | nil, err, code: one empty directory (on cgroupfs,
 * a cgroup with no processes and no children). */
static int l_rmdir(lua_State *L) {
    const char *path = luaL_checkstring(L, 1);
    if (rmdir(path) != 0) return tn_fail_errno(L, lua_pushfstring(L, "rmdir %s", path), errno);
    lua_pushboolean(L, 1);
    return 1;
}

/* fs.truncate(path, size [, mode=0600]) -> true | nil, err, code. Sets the
 * file's length, creating it if missing; growing makes a hole, not writes. */
static int l_truncate(lua_State *L) {
    const char *path = luaL_checkstring(L, 1);
    lua_Integer size = luaL_checkinteger(L, 2);
    mode_t mode = (mode_t)luaL_optinteger(L, 3, 0600);
    if (size < 0) return luaL_argerror(L, 2, "negative size");
    int fd = open(path, O_WRONLY | O_CREAT | O_CLOEXEC | O_NOCTTY, mode);
    if (fd < 0) return tn_fail_errno(L, lua_pushfstring(L, "open %s", path), errno);
    int rc = ftruncate(fd, (off_t)size);
    int e = errno;
    close(fd);
    if (rc != 0) return tn_fail_errno(L, lua_pushfstring(L, "truncate %s", path), e);
    lua_pushboolean(L, 1);
    return 1;
}

/* fs.statfs(path) -> { size, free, avail, files, files_free, bsize, type }
 * | nil, err, code. Sizes in bytes: avail is what an unprivileged writer may
 * still use; type is the file system's magic number (0xEF53 for ext4). */
static int l_statfs(lua_State *L) {
    const char *path = luaL_checkstring(L, 1);
    struct statfs sf;
    if (statfs(path, &sf) != 0) return tn_fail_errno(L, lua_pushfstring(L, "statfs %s", path), errno);
    lua_Integer unit = sf.f_frsize ? (lua_Integer)sf.f_frsize : (lua_Integer)sf.f_bsize;
    lua_createtable(L, 0, 7);
    lua_pushinteger(L, (lua_Integer)sf.f_blocks * unit); lua_setfield(L, -2, "size");
    lua_pushinteger(L, (lua_Integer)sf.f_bfree * unit); lua_setfield(L, -2, "free");
    lua_pushinteger(L, (lua_Integer)sf.f_bavail * unit); lua_setfield(L, -2, "avail");
    lua_pushinteger(L, (lua_Integer)sf.f_files); lua_setfield(L, -2, "files");
    lua_pushinteger(L, (lua_Integer)sf.f_ffree); lua_setfield(L, -2, "files_free");
    lua_pushinteger(L, (lua_Integer)sf.f_bsize); lua_setfield(L, -2, "bsize");
    lua_pushinteger(L, (lua_Integer)(unsigned long)sf.f_type); lua_setfield(L, -2, "type");
    return 1;
}

/* ---- watching a directory ----------------------------------------------
 * fs.watch(dir) -> watcher: names in dir that appear or change (inotify,
 * through libuv) wake the tasks waiting for them. A supervisor waiting for a
 * started app's socket then waits for the event instead of polling, and
 * probes the moment the app binds.
 *   w:wake_on(name, task)  on the next event for name, tn_task_wake(task)
 *                          (core.park, or a wakeable wait such as p:wait);
 *                          a later registration of name replaces it
 *   w:take(task) -> true if an event woke (or would have woken) task since
 *                   its last take
 *   w:forget(name, task)   ends task's registration, if it is still its
 *   w:moved() -> true once the directory itself moved or went away (its
 *                events stopped: a new watch of the path is needed)
 *   w:close()
 * The news is kept per task: when a task registers a name another still
 * holds (a restart while the last start's watcher finishes), the other
 * keeps what it was told but is woken no more (it polls), and takes none of
 * the new holder's news. */
#define WATCH_MT "tenement.fs.watch"

typedef struct {
    uv_fs_event_t ev;
    lua_State *L;   /* the main thread: callbacks run outside any task */
    int names_ref;  /* name -> task handle */
    int fired_ref;  /* task handle -> true */
    int closed, moved;
    dev_t dev;               /* the directory watched, as it was */
    ino_t ino;
    char base[NAME_MAX + 1]; /* its own name */
    char path[PATH_MAX];
} fs_watch;

/* Is path no longer the directory the watch was made on? */
static int watch_dir_gone(const fs_watch *w) {
    struct stat st;
    return stat(w->path, &st) != 0 || st.st_dev != w->dev || st.st_ino != w->ino;
}

typedef struct { fs_watch *w; } watch_box;

static void watch_fire(lua_State *L, int fired, int task) {
    lua_pushvalue(L, task);
    lua_pushboolean(L, 1);
    lua_rawset(L, fired);
    tn_task_wake(tn_task_arg(L, task));
}

/* In a protected call: the table work may raise (out of memory). */
static int watch_event(lua_State *L) {
    fs_watch *w = lua_touserdata(L, 1);
    const char *name = lua_tostring(L, 2);
    lua_rawgeti(L, LUA_REGISTRYINDEX, w->names_ref);
    lua_rawgeti(L, LUA_REGISTRYINDEX, w->fired_ref);
    int names = lua_gettop(L) - 1, fired = names + 1;
    /* libuv names an event of the directory itself by the directory's own
     * name, and tells it apart from a file of that name inside by nothing
     * reliable: so the path is looked at. Moved or removed, every waiter
     * looks again and the watch is known to be stale; a chmod of it is no
     * more than a file's event. */
    if (!name || !*name || (strcmp(name, w->base) == 0 && watch_dir_gone(w))) {
        w->moved = 1;
        lua_pushnil(L);
        while (lua_next(L, names)) {
            watch_fire(L, fired, lua_gettop(L));
            lua_pop(L, 1);
        }
    } else if (lua_getfield(L, names, name) != LUA_TNIL) {
        watch_fire(L, fired, lua_gettop(L));
    }
    return 0;
}

static void watch_cb(uv_fs_event_t *h, const char *name, int events, int status) {
    (void)events;
    fs_watch *w = h->data;
    lua_State *L = w->L;
    if (w->closed || !lua_checkstack(L, 8)) return;
    lua_pushcfunction(L, watch_event);
    lua_pushlightuserdata(L, w);
    if (status < 0 || !name) lua_pushnil(L);
    else lua_pushstring(L, name);
    if (lua_pcall(L, 2, 0, 0) != LUA_OK) lua_pop(L, 1); /* out of memory: the waiters poll */
}

static fs_watch *check_watch(lua_State *L) {
    watch_box *b = luaL_checkudata(L, 1, WATCH_MT);
    if (!b->w) luaL_error(L, "the watch is closed");
    return b->w;
}

static void watch_close_cb(uv_handle_t *h) { free(h->data); }

static int l_watch_close(lua_State *L) {
    watch_box *b = luaL_checkudata(L, 1, WATCH_MT);
    fs_watch *w = b->w;
    if (!w) return 0;
    b->w = NULL;
    w->closed = 1;
    luaL_unref(L, LUA_REGISTRYINDEX, w->names_ref);
    luaL_unref(L, LUA_REGISTRYINDEX, w->fired_ref);
    uv_close((uv_handle_t *)&w->ev, watch_close_cb);
    return 0;
}

static int l_watch(lua_State *L) {
    const char *dir = luaL_checkstring(L, 1);
    uv_loop_t *loop = tn_loop(L);
    watch_box *b = lua_newuserdatauv(L, sizeof *b, 0);
    b->w = NULL;
    luaL_setmetatable(L, WATCH_MT);
    fs_watch *w = calloc(1, sizeof *w);
    if (!w) return luaL_error(L, "out of memory");
    const char *slash = strrchr(dir, '/');
    snprintf(w->base, sizeof w->base, "%s", slash ? slash + 1 : dir);
    struct stat st;
    int e = snprintf(w->path, sizeof w->path, "%s", dir) >= (int)sizeof w->path ? ENAMETOOLONG
          : stat(dir, &st) != 0 ? errno : 0;
    if (e) {
        free(w);
        return tn_fail_errno(L, dir, e);
    }
    w->dev = st.st_dev;
    w->ino = st.st_ino;
    int rc = uv_fs_event_init(loop, &w->ev);
    if (rc == 0) {
        w->ev.data = w;
        rc = uv_fs_event_start(&w->ev, watch_cb, dir, 0);
        if (rc != 0) { uv_close((uv_handle_t *)&w->ev, watch_close_cb); w = NULL; }
    } else {
        free(w);
        w = NULL;
    }
    if (!w) return tn_fail_uv(L, dir, rc);
    /* an idle watch must not keep the loop alive: it only ever wakes tasks
     * that wait for something else as well */
    uv_unref((uv_handle_t *)&w->ev);
    lua_rawgeti(L, LUA_REGISTRYINDEX, LUA_RIDX_MAINTHREAD);
    w->L = lua_tothread(L, -1);
    lua_pop(L, 1);
    lua_newtable(L);
    w->names_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    lua_newtable(L);
    w->fired_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    b->w = w;
    return 1;
}

static int l_watch_wake_on(lua_State *L) {
    fs_watch *w = check_watch(L);
    const char *name = luaL_checkstring(L, 2);
    tn_task_arg(L, 3);
    lua_rawgeti(L, LUA_REGISTRYINDEX, w->names_ref);
    lua_pushvalue(L, 3);
    lua_setfield(L, -2, name);
    return 0;
}

static int l_watch_forget(lua_State *L) {
    fs_watch *w = check_watch(L);
    const char *name = luaL_checkstring(L, 2);
    tn_task_arg(L, 3);
    lua_rawgeti(L, LUA_REGISTRYINDEX, w->names_ref);
    lua_getfield(L, -1, name);
    if (lua_rawequal(L, -1, 3)) {
        lua_pushnil(L);
        lua_setfield(L, -3, name);
    }
    lua_rawgeti(L, LUA_REGISTRYINDEX, w->fired_ref);
    lua_pushvalue(L, 3);
    lua_pushnil(L);
    lua_rawset(L, -3);
    return 0;
}

static int l_watch_take(lua_State *L) {
    fs_watch *w = check_watch(L);
    tn_task_arg(L, 2);
    lua_rawgeti(L, LUA_REGISTRYINDEX, w->fired_ref);
    lua_pushvalue(L, 2);
    int fired = lua_rawget(L, -2) != LUA_TNIL;
    lua_pop(L, 1);
    if (fired) {
        lua_pushvalue(L, 2);
        lua_pushnil(L);
        lua_rawset(L, -3);
    }
    lua_pushboolean(L, fired);
    return 1;
}

static int l_watch_moved(lua_State *L) {
    lua_pushboolean(L, check_watch(L)->moved);
    return 1;
}

int tn_open_fs(lua_State *L) {
    static const luaL_Reg watch_methods[] = {
        {"wake_on", l_watch_wake_on}, {"forget", l_watch_forget}, {"take", l_watch_take},
        {"moved", l_watch_moved}, {"close", l_watch_close},
        {"__gc", l_watch_close}, {"__close", l_watch_close}, {NULL, NULL},
    };
    tn_new_class(L, WATCH_MT, watch_methods);
    static const luaL_Reg fns[] = {
        {"mkdir", l_mkdir}, {"rmtree", l_rmtree}, {"unlink", l_unlink}, {"stat", l_stat},
        {"read", l_read}, {"write", l_write}, {"readdir", l_readdir}, {"realpath", l_realpath},
        {"chmod", l_chmod}, {"chown", l_chown}, {"cwd", l_cwd}, {"access", l_access}, {"isatty", l_isatty},
        {"open_fd", l_open_fd}, {"close_fd", l_close_fd}, {"lock", l_lock}, {"put", l_put}, {"rmdir", l_rmdir},
        {"truncate", l_truncate}, {"statfs", l_statfs}, {"watch", l_watch}, {NULL, NULL},
    };
    luaL_newlib(L, fns);
    return 1;
}
