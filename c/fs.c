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
#include <sys/stat.h>
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

/* fs.stat(path [, follow=true]) -> {type, size, mode, uid, gid, mtime} | nil, err, code */
static int l_stat(lua_State *L) {
    const char *path = luaL_checkstring(L, 1);
    int follow = lua_isnoneornil(L, 2) ? 1 : lua_toboolean(L, 2);
    struct stat st;
    if ((follow ? stat(path, &st) : lstat(path, &st)) != 0)
        return tn_fail_errno(L, lua_pushfstring(L, "stat %s", path), errno);
    lua_createtable(L, 0, 6);
    lua_pushstring(L, type_name(st.st_mode)); lua_setfield(L, -2, "type");
    lua_pushinteger(L, (lua_Integer)st.st_size); lua_setfield(L, -2, "size");
    lua_pushinteger(L, (lua_Integer)(st.st_mode & 07777)); lua_setfield(L, -2, "mode");
    lua_pushinteger(L, (lua_Integer)st.st_uid); lua_setfield(L, -2, "uid");
    lua_pushinteger(L, (lua_Integer)st.st_gid); lua_setfield(L, -2, "gid");
    lua_pushnumber(L, (lua_Number)st.st_mtim.tv_sec + st.st_mtim.tv_nsec / 1e9);
    lua_setfield(L, -2, "mtime");
    lua_pushinteger(L, (lua_Integer)st.st_blocks * 512); lua_setfield(L, -2, "allocated");
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

/* fs.cwd() -> the current directory */
static int l_cwd(lua_State *L) {
    char buf[PATH_MAX];
    if (!getcwd(buf, sizeof buf)) return tn_fail_errno(L, "getcwd", errno);
    lua_pushstring(L, buf);
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

int tn_open_fs(lua_State *L) {
    static const luaL_Reg fns[] = {
        {"mkdir", l_mkdir}, {"rmtree", l_rmtree}, {"unlink", l_unlink}, {"stat", l_stat},
        {"read", l_read}, {"write", l_write}, {"readdir", l_readdir}, {"realpath", l_realpath},
        {"chmod", l_chmod}, {"cwd", l_cwd}, {"access", l_access}, {NULL, NULL},
    };
    luaL_newlib(L, fns);
    return 1;
}
