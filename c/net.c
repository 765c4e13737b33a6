/*
 * core.net: TCP and Unix-socket streams on libuv, coroutine style.
 *
 * A stream starts reading as soon as it is connected or accepted, so EOF and
 * errors are seen even while no task reads; what arrives meanwhile is
 * buffered up to READ_HIGH_WATER, past which the socket is no longer read
 * (the kernel's window then pushes back on the peer) until a task drains it.
 * A write returns once the kernel took all of it, which is the backpressure a
 * writing task needs.
 *
 * Lifetime: each libuv handle lives in heap memory freed only in its close
 * callback. A stream's Lua handle points at it until close(); a listener's is
 * reference counted (the Lua handle and the open libuv handle) because the
 * HTTP server keeps a pointer to it too. Requests in flight (connect, write,
 * shutdown) are called back by libuv before the close callback, so they
 * never see freed memory.
 */
#include "net.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#define STREAM_MT "tenement.stream"
#define READ_HIGH_WATER (64 * 1024)
#define SCRATCH_SIZE (64 * 1024)

/* libuv calls alloc_cb, read(2) and read_cb back to back on the loop thread,
 * so one buffer serves every stream; read_cb copies out what it keeps. */
static _Thread_local char scratch[SCRATCH_SIZE];

static void scratch_alloc(uv_handle_t *h, size_t hint, uv_buf_t *buf) {
    (void)h; (void)hint;
    buf->base = scratch;
    buf->len = sizeof scratch;
}

/* ---- addresses --------------------------------------------------------- */

static int addr_fail(lua_State *L, const char *verb, const char *what, const char *code,
                     const char *msg) {
    lua_pushnil(L);
    lua_pushfstring(L, "%s %s: %s: %s", verb, what, code, msg);
    lua_pushstring(L, code);
    return 3;
}

int tn_addr_from_table(lua_State *L, int idx, tn_addr *a, const char *verb) {
    luaL_checktype(L, idx, LUA_TTABLE);
    memset(a, 0, sizeof *a);
    int path_t = lua_getfield(L, idx, "path");
    int host_t = lua_getfield(L, idx, "host");
    int port_t = lua_getfield(L, idx, "port");
    if (path_t != LUA_TNIL) {
        if (path_t != LUA_TSTRING) return luaL_error(L, "%s: path must be a string", verb);
        if (host_t != LUA_TNIL || port_t != LUA_TNIL)
            return luaL_error(L, "%s: give either path or host and port, not both", verb);
        size_t n;
        const char *p = lua_tolstring(L, -3, &n);
        if (n == 0) return luaL_error(L, "%s: path is empty", verb);
        lua_pop(L, 3);
        if (n >= sizeof a->path) {
            char shown[64];
            snprintf(shown, sizeof shown, "%.40s...", p);
            return addr_fail(L, verb, shown, "ENAMETOOLONG",
                             "a Unix socket path must be shorter than 108 bytes");
        }
        a->is_pipe = 1;
        memcpy(a->path, p, n + 1);
        snprintf(a->text, sizeof a->text, "%s", p);
        return 0;
    }
    if (port_t == LUA_TNIL) return luaL_error(L, "%s: give path, or host and port", verb);
    if (!lua_isinteger(L, -1)) return luaL_error(L, "%s: port must be an integer", verb);
    lua_Integer port = lua_tointeger(L, -1);
    if (port < 0 || port > 65535) return luaL_error(L, "%s: port %d out of range", verb, (int)port);
    const char *host = "127.0.0.1";
    if (host_t != LUA_TNIL) {
        if (host_t != LUA_TSTRING) return luaL_error(L, "%s: host must be a string", verb);
        host = lua_tostring(L, -2);
    }
    const char *numeric = strcmp(host, "localhost") == 0 ? "127.0.0.1" : host;
    struct sockaddr_in *v4 = (struct sockaddr_in *)&a->ss;
    struct sockaddr_in6 *v6 = (struct sockaddr_in6 *)&a->ss;
    if (uv_ip4_addr(numeric, (int)port, v4) == 0) {
        snprintf(a->text, sizeof a->text, "%s:%d", numeric, (int)port);
    } else if (uv_ip6_addr(numeric, (int)port, v6) == 0) {
        snprintf(a->text, sizeof a->text, "[%s]:%d", numeric, (int)port);
    } else {
        char what[300];
        snprintf(what, sizeof what, "%.255s:%d", host, (int)port);
        lua_pop(L, 3);
        return addr_fail(L, verb, what, "EINVAL",
                         "host must be a numeric IPv4 or IPv6 address or localhost");
    }
    lua_pop(L, 3);
    return 0;
}

int tn_sock_init(uv_loop_t *loop, tn_sock *h, int is_pipe) {
    return is_pipe ? uv_pipe_init(loop, &h->pipe, 0) : uv_tcp_init(loop, &h->tcp);
}

int tn_sock_connect(uv_connect_t *req, tn_sock *h, const tn_addr *a, uv_connect_cb cb) {
    if (a->is_pipe) {
        uv_pipe_connect(req, &h->pipe, a->path, cb);
        return 0;
    }
    return uv_tcp_connect(req, &h->tcp, (const struct sockaddr *)&a->ss, cb);
}

static void format_sockaddr(const struct sockaddr_storage *ss, char *buf, size_t n) {
    char ip[INET6_ADDRSTRLEN] = "?";
    if (ss->ss_family == AF_INET) {
        const struct sockaddr_in *v4 = (const struct sockaddr_in *)ss;
        uv_ip4_name(v4, ip, sizeof ip);
        snprintf(buf, n, "%s:%d", ip, ntohs(v4->sin_port));
    } else if (ss->ss_family == AF_INET6) {
        const struct sockaddr_in6 *v6 = (const struct sockaddr_in6 *)ss;
        uv_ip6_name(v6, ip, sizeof ip);
        snprintf(buf, n, "[%s]:%d", ip, ntohs(v6->sin6_port));
    } else {
        snprintf(buf, n, "?");
    }
}

void tn_sock_peer(tn_sock *h, int is_pipe, char *buf, size_t n) {
    if (is_pipe) {
        /* A connecting client rarely binds a name: show the socket's own
         * path then, which is the listening path on the accepting side. */
        char path[sizeof(((struct sockaddr_un *)0)->sun_path) + 1];
        size_t len = sizeof path;
        if (uv_pipe_getpeername(&h->pipe, path, &len) != 0 || len == 0) {
            len = sizeof path;
            if (uv_pipe_getsockname(&h->pipe, path, &len) != 0) len = 0;
        }
        snprintf(buf, n, "unix:%.*s", (int)len, path);
        return;
    }
    struct sockaddr_storage ss;
    int len = sizeof ss;
    if (uv_tcp_getpeername(&h->tcp, (struct sockaddr *)&ss, &len) != 0) {
        snprintf(buf, n, "?");
        return;
    }
    format_sockaddr(&ss, buf, n);
}

/* ---- streams ----------------------------------------------------------- */

typedef struct net_stream {
    tn_sock sock;
    int is_pipe;
    int reading;        /* uv_read_start is in effect */
    int eof;
    int err;            /* a read error, kept: every later read reports it */
    int closing;
    char *buf;          /* unread bytes are buf[off, len) */
    size_t off, len, cap;
    tn_task *reader;
    uint64_t rseq;
    lua_State *L;       /* the main thread: registry access from callbacks */
    char peer[160];
} net_stream;

typedef struct { net_stream *s; } stream_box;

static void stream_read_cb(uv_stream_t *h, ssize_t nread, const uv_buf_t *buf);

static net_stream *check_stream(lua_State *L, int idx) {
    stream_box *b = luaL_checkudata(L, idx, STREAM_MT);
    if (!b->s) luaL_error(L, "stream is closed");
    return b->s;
}

static void stream_free_cb(uv_handle_t *h) {
    net_stream *s = h->data;
    free(s->buf);
    free(s);
}

static net_stream *stream_new(lua_State *L, int is_pipe) {
    net_stream *s = calloc(1, sizeof *s);
    if (!s) return NULL;
    s->is_pipe = is_pipe;
    lua_rawgeti(L, LUA_REGISTRYINDEX, LUA_RIDX_MAINTHREAD);
    s->L = lua_tothread(L, -1);
    lua_pop(L, 1);
    int rc = tn_sock_init(tn_loop(L), &s->sock, is_pipe);
    if (rc) { free(s); return NULL; }
    s->sock.handle.data = s;
    return s;
}

static int stream_start_reading(net_stream *s) {
    if (s->reading || s->eof || s->err || s->closing) return 0;
    int rc = uv_read_start(&s->sock.stream, scratch_alloc, stream_read_cb);
    if (rc == 0) s->reading = 1;
    return rc;
}

static void stream_stop_reading(net_stream *s) {
    if (!s->reading) return;
    uv_read_stop(&s->sock.stream);
    s->reading = 0;
}

/* Hand the reader its result: push on its coroutine with push(co, s, ctx),
 * resume it, and drop the hold. */
static void reader_wake(net_stream *s, int (*push)(lua_State *, net_stream *, void *), void *ctx) {
    tn_task *t = s->reader;
    if (!t) return;
    s->reader = NULL;
    if (tn_task_waiting_for(t, s->rseq)) {
        lua_State *co = tn_task_thread(t);
        int n = push(co, s, ctx);
        tn_task_resume(t, n);
    }
    tn_task_release(t);
}

static int push_closed(lua_State *co, net_stream *s, void *ctx) {
    (void)s; (void)ctx;
    lua_pushnil(co);
    lua_pushliteral(co, "closed");
    return 2;
}

static int push_end(lua_State *co, net_stream *s, void *ctx) {
    (void)ctx;
    if (s->err) return tn_fail_uv(co, "read", s->err);
    lua_pushnil(co);
    return 1;
}

typedef struct { const char *p; size_t n; } chunk;

static int push_chunk(lua_State *co, net_stream *s, void *ctx) {
    (void)s;
    chunk *c = ctx;
    lua_pushlstring(co, c->p, c->n);
    return 1;
}

static void stream_close(net_stream *s, int wake) {
    if (s->closing) return;
    s->closing = 1;
    s->reading = 0;
    uv_close(&s->sock.handle, stream_free_cb);
    if (s->reader) {
        if (wake) {
            reader_wake(s, push_closed, NULL);
        } else {
            tn_task_release(s->reader);
            s->reader = NULL;
        }
    }
}

static int buffer_append(net_stream *s, const char *p, size_t n) {
    if (s->off > 0 && s->off == s->len) s->off = s->len = 0;
    if (s->cap - s->len < n) {
        if (s->off > 0) {
            memmove(s->buf, s->buf + s->off, s->len - s->off);
            s->len -= s->off;
            s->off = 0;
        }
        if (s->cap - s->len < n) {
            size_t cap = s->cap ? s->cap : 4096;
            while (cap - s->len < n) cap *= 2;
            char *nb = realloc(s->buf, cap);
            if (!nb) return UV_ENOMEM;
            s->buf = nb;
            s->cap = cap;
        }
    }
    memcpy(s->buf + s->len, p, n);
    s->len += n;
    return 0;
}

static void stream_read_cb(uv_stream_t *h, ssize_t nread, const uv_buf_t *buf) {
    net_stream *s = h->data;
    if (nread == 0 || s->closing) return;
    if (nread < 0) {
        stream_stop_reading(s);
        if (nread == UV_EOF) s->eof = 1;
        else s->err = (int)nread;
        /* A reader waits only while the buffer is empty. */
        reader_wake(s, push_end, NULL);
        return;
    }
    if (s->reader && s->off == s->len) {
        chunk c = { buf->base, (size_t)nread };
        reader_wake(s, push_chunk, &c);
        return;
    }
    int rc = buffer_append(s, buf->base, (size_t)nread);
    if (rc) {
        stream_stop_reading(s);
        s->err = rc;
        return;
    }
    if (s->len - s->off >= READ_HIGH_WATER) stream_stop_reading(s);
}

static void read_cancel(void *arg) {
    net_stream *s = arg;
    if (s->reader) {
        tn_task_release(s->reader);
        s->reader = NULL;
    }
}

/* stream:read([timeout_ms]) -> chunk | nil (EOF) | nil, err, code */
static int l_stream_read(lua_State *L) {
    net_stream *s = check_stream(L, 1);
    lua_Integer timeout = luaL_optinteger(L, 2, -1);
    if (s->len > s->off) {
        lua_pushlstring(L, s->buf + s->off, s->len - s->off);
        s->off = s->len = 0;
        /* Drained: give the memory back if a burst made it large. */
        if (s->cap > 2 * READ_HIGH_WATER) {
            free(s->buf);
            s->buf = NULL;
            s->cap = 0;
        }
        stream_start_reading(s);
        return 1;
    }
    if (s->err) return tn_fail_uv(L, "read", s->err);
    if (s->eof) { lua_pushnil(L); return 1; }
    if (s->reader) return luaL_error(L, "another task is already reading this stream");
    tn_task *t = tn_task_check(L);
    int rc = stream_start_reading(s);
    if (rc) return tn_fail_uv(L, "read", rc);
    s->reader = tn_task_hold(t);
    s->rseq = tn_task_seq(t);
    /* The stream stays on this frame's stack, so it cannot be collected
     * while the task waits. */
    return tn_task_wait_cancel(L, t, timeout, read_cancel, s);
}

typedef struct {
    uv_write_t req;
    tn_task *t;
    uint64_t seq;
} write_op;

static void write_cb(uv_write_t *req, int status) {
    write_op *w = req->data;
    if (tn_task_waiting_for(w->t, w->seq)) {
        lua_State *co = tn_task_thread(w->t);
        int n;
        if (status == 0) { lua_pushboolean(co, 1); n = 1; }
        else if (status == UV_ECANCELED) n = push_closed(co, NULL, NULL);
        else n = tn_fail_uv(co, "write", status);
        tn_task_resume(w->t, n);
    }
    tn_task_release(w->t);
    free(w);
}

/* stream:write(data) -> true | nil, err, code. Returns once the kernel has
 * all of it; the string stays on this task's suspended frame until then,
 * which is what keeps the bytes libuv points at alive. */
static int l_stream_write(lua_State *L) {
    net_stream *s = check_stream(L, 1);
    size_t len;
    const char *data = luaL_checklstring(L, 2, &len);
    tn_task *t = tn_task_check(L);
    if (len == 0) { lua_pushboolean(L, 1); return 1; }
    if (len > 0x7fffffff) return luaL_argerror(L, 2, "more than 2 GiB in one write");
    uv_buf_t b = uv_buf_init((char *)data, (unsigned)len);
    int n = uv_try_write(&s->sock.stream, &b, 1);
    if (n >= 0 && (size_t)n == len) { lua_pushboolean(L, 1); return 1; }
    if (n < 0 && n != UV_EAGAIN) return tn_fail_uv(L, "write", n);
    if (n < 0) n = 0;
    write_op *w = malloc(sizeof *w);
    if (!w) return luaL_error(L, "out of memory");
    w->t = tn_task_hold(t);
    w->seq = tn_task_seq(t);
    w->req.data = w;
    b = uv_buf_init((char *)data + n, (unsigned)(len - (size_t)n));
    int rc = uv_write(&w->req, &s->sock.stream, &b, 1, write_cb);
    if (rc) {
        tn_task_release(t);
        free(w);
        return tn_fail_uv(L, "write", rc);
    }
    return tn_task_wait(L, t, -1);
}

typedef struct {
    uv_shutdown_t req;
    tn_task *t;
    uint64_t seq;
} shutdown_op;

static void shutdown_cb(uv_shutdown_t *req, int status) {
    shutdown_op *op = req->data;
    if (tn_task_waiting_for(op->t, op->seq)) {
        lua_State *co = tn_task_thread(op->t);
        int n;
        if (status == 0) { lua_pushboolean(co, 1); n = 1; }
        else if (status == UV_ECANCELED) n = push_closed(co, NULL, NULL);
        else n = tn_fail_uv(co, "shutdown", status);
        tn_task_resume(op->t, n);
    }
    tn_task_release(op->t);
    free(op);
}

/* stream:shutdown() -> true | nil, err, code: after pending writes, send
 * FIN; reading goes on until the peer closes its side. */
static int l_stream_shutdown(lua_State *L) {
    net_stream *s = check_stream(L, 1);
    tn_task *t = tn_task_check(L);
    shutdown_op *op = malloc(sizeof *op);
    if (!op) return luaL_error(L, "out of memory");
    op->t = tn_task_hold(t);
    op->seq = tn_task_seq(t);
    op->req.data = op;
    int rc = uv_shutdown(&op->req, &s->sock.stream, shutdown_cb);
    if (rc) {
        tn_task_release(t);
        free(op);
        return tn_fail_uv(L, "shutdown", rc);
    }
    return tn_task_wait(L, t, -1);
}

static int l_stream_close(lua_State *L) {
    stream_box *b = luaL_checkudata(L, 1, STREAM_MT);
    net_stream *s = b->s;
    if (!s) return 0;
    b->s = NULL;
    stream_close(s, 1);
    return 0;
}

/* Collected: nobody can be waiting on it (a waiting task keeps it on its
 * stack), and no Lua may run from a finaliser, so close without waking. */
static int l_stream_gc(lua_State *L) {
    stream_box *b = luaL_checkudata(L, 1, STREAM_MT);
    net_stream *s = b->s;
    if (!s) return 0;
    b->s = NULL;
    stream_close(s, 0);
    return 0;
}

static int l_stream_peer(lua_State *L) {
    lua_pushstring(L, check_stream(L, 1)->peer);
    return 1;
}

/* s:credentials() -> { pid, uid, gid } of the process that listened on the
 * Unix socket this stream connected to (SO_PEERCRED, taken by the kernel
 * at listen time) | nil, err. Whoever can create a file at a socket path
 * can answer there: this says who actually does. */
static int l_stream_credentials(lua_State *L) {
    net_stream *s = check_stream(L, 1);
    if (!s->is_pipe) return tn_fail(L, "credentials: not a Unix socket");
    uv_os_fd_t fd;
    struct ucred cred;
    socklen_t len = sizeof cred;
    int rc = uv_fileno(&s->sock.handle, &fd);
    if (rc != 0) return tn_fail_uv(L, "credentials", rc);
    if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0) return tn_fail_errno(L, "credentials", errno);
    lua_createtable(L, 0, 3);
    lua_pushinteger(L, cred.pid);
    lua_setfield(L, -2, "pid");
    lua_pushinteger(L, cred.uid);
    lua_setfield(L, -2, "uid");
    lua_pushinteger(L, cred.gid);
    lua_setfield(L, -2, "gid");
    return 1;
}

static int l_stream_tostring(lua_State *L) {
    stream_box *b = luaL_checkudata(L, 1, STREAM_MT);
    if (b->s) lua_pushfstring(L, "tenement.stream (%s)", b->s->peer);
    else lua_pushliteral(L, "tenement.stream (closed)");
    return 1;
}

/* A connected handle becomes a stream handle on L's stack. */
static void stream_push(lua_State *L, net_stream *s) {
    stream_box *b = lua_newuserdatauv(L, sizeof *b, 0);
    b->s = s;
    luaL_setmetatable(L, STREAM_MT);
}

typedef struct {
    uv_connect_t req;
    tn_task *t;
    uint64_t seq;
    net_stream *s;
    char what[200];
} connect_op;

static void connect_cb(uv_connect_t *req, int status) {
    connect_op *c = req->data;
    net_stream *s = c->s;
    if (tn_task_waiting_for(c->t, c->seq)) {
        lua_State *co = tn_task_thread(c->t);
        int n;
        if (status == 0) {
            tn_sock_peer(&s->sock, s->is_pipe, s->peer, sizeof s->peer);
            int rc = stream_start_reading(s);
            if (rc) {
                stream_close(s, 0);
                n = tn_fail_uv(co, c->what, rc);
            } else {
                stream_push(co, s);
                n = 1;
            }
        } else {
            stream_close(s, 0);
            n = tn_fail_uv(co, c->what, status);
        }
        tn_task_resume(c->t, n);
    } else if (!s->closing) {
        stream_close(s, 0);
    }
    tn_task_release(c->t);
    free(c);
}

/* A timeout closes the half-open handle; connect_cb then sees ECANCELED
 * and frees the op. */
static void connect_cancel(void *arg) {
    connect_op *c = arg;
    stream_close(c->s, 0);
}

/* net.connect{ host=, port= | path=, timeout= } -> stream | nil, err, code */
static int l_connect(lua_State *L) {
    tn_addr a;
    int n = tn_addr_from_table(L, 1, &a, "connect");
    if (n) return n;
    lua_getfield(L, 1, "timeout");
    lua_Integer timeout = luaL_optinteger(L, -1, -1);
    lua_pop(L, 1);
    tn_task *t = tn_task_check(L);
    net_stream *s = stream_new(L, a.is_pipe);
    connect_op *c = malloc(sizeof *c);
    if (!s || !c) {
        if (s) stream_close(s, 0);
        free(c);
        return luaL_error(L, "out of memory");
    }
    c->s = s;
    c->req.data = c;
    snprintf(c->what, sizeof c->what, "connect %s", a.text);
    int rc = tn_sock_connect(&c->req, &s->sock, &a, connect_cb);
    if (rc) {
        stream_close(s, 0);
        n = tn_fail_uv(L, c->what, rc);
        free(c);
        return n;
    }
    c->t = tn_task_hold(t);
    c->seq = tn_task_seq(t);
    return tn_task_wait_cancel(L, t, timeout, connect_cancel, c);
}

/* ---- listeners --------------------------------------------------------- */

typedef struct { tn_listener *l; } listener_box;

static void listener_unref(tn_listener *l) {
    if (--l->refs == 0) free(l);
}

void tn_listener_hold(tn_listener *l) { l->refs++; }
void tn_listener_release(tn_listener *l) { listener_unref(l); }

static void listener_free_cb(uv_handle_t *h) { listener_unref(h->data); }

tn_listener *tn_listener_check(lua_State *L, int idx) {
    listener_box *b = luaL_checkudata(L, idx, TN_LISTENER_MT);
    if (!b->l || b->l->closed) luaL_error(L, "listener is closed");
    return b->l;
}

int tn_listener_accept(tn_listener *l, tn_sock *h) {
    if (!l->pending) return UV_EAGAIN;
    l->pending = 0;
    /* Accepting also makes libuv watch the listening socket again. */
    return uv_accept(&l->sock.stream, &h->stream);
}

/* Accept into a new stream and push it (or nil, err, code) on L. */
static int accept_push(lua_State *L, tn_listener *l) {
    net_stream *s = stream_new(L, l->is_pipe);
    if (!s) return tn_fail_uv(L, "accept", UV_ENOMEM);
    int rc = tn_listener_accept(l, &s->sock);
    if (!rc) {
        tn_sock_peer(&s->sock, s->is_pipe, s->peer, sizeof s->peer);
        rc = stream_start_reading(s);
    }
    if (rc) {
        stream_close(s, 0);
        return tn_fail_uv(L, "accept", rc);
    }
    stream_push(L, s);
    return 1;
}

static void listener_wake(tn_listener *l, int status) {
    tn_task *t = l->waiter;
    l->waiter = NULL;
    if (tn_task_waiting_for(t, l->wseq)) {
        lua_State *co = tn_task_thread(t);
        int n;
        if (status == UV_ECANCELED) {
            lua_pushnil(co);
            lua_pushliteral(co, "closed");
            n = 2;
        } else if (status < 0) {
            n = tn_fail_uv(co, "accept", status);
        } else {
            n = accept_push(co, l);
        }
        tn_task_resume(t, n);
    }
    tn_task_release(t);
}

static void on_connection(uv_stream_t *server, int status) {
    tn_listener *l = server->data;
    if (l->closed) return;
    if (status == 0) l->pending = 1;
    if (l->on_conn) { l->on_conn(l, status); return; }
    if (l->waiter) listener_wake(l, status);
}

void tn_listener_close(tn_listener *l) {
    if (l->closed) return;
    l->closed = 1;
    uv_close(&l->sock.handle, listener_free_cb);
    if (l->waiter) listener_wake(l, UV_ECANCELED);
    if (l->on_close) l->on_close(l, UV_ECANCELED);
}

/* net.listen{ host=, port= | path=, mode=, backlog= } -> listener | nil, err, code */
static int l_listen(lua_State *L) {
    tn_addr a;
    int n = tn_addr_from_table(L, 1, &a, "listen");
    if (n) return n;
    lua_getfield(L, 1, "backlog");
    lua_Integer backlog = luaL_optinteger(L, -1, 511);
    lua_getfield(L, 1, "mode");
    int has_mode = !lua_isnil(L, -1);
    lua_Integer mode = luaL_optinteger(L, -1, 0);
    lua_pop(L, 2);
    if (backlog < 1 || backlog > 65535) return luaL_error(L, "listen: backlog out of range");
    if (has_mode && !a.is_pipe) return luaL_error(L, "listen: mode applies to Unix sockets only");
    if (has_mode && (mode < 0 || mode > 07777)) return luaL_error(L, "listen: mode out of range");

    tn_listener *l = calloc(1, sizeof *l);
    if (!l) return luaL_error(L, "out of memory");
    l->is_pipe = a.is_pipe;
    l->refs = 1; /* the libuv handle */
    snprintf(l->text, sizeof l->text, "%s", a.text);
    int rc = tn_sock_init(tn_loop(L), &l->sock, a.is_pipe);
    if (rc) { free(l); return tn_fail_uv(L, "listen", rc); }
    l->sock.handle.data = l;
    int bound = 0;
    if (a.is_pipe) {
        rc = uv_pipe_bind(&l->sock.pipe, a.path);
        bound = rc == 0;
        if (!rc && has_mode && chmod(a.path, (mode_t)mode) != 0) rc = uv_translate_sys_error(errno);
    } else {
        rc = uv_tcp_bind(&l->sock.tcp, (const struct sockaddr *)&a.ss, 0);
    }
    if (!rc) rc = uv_listen(&l->sock.stream, (int)backlog, on_connection);
    if (rc) {
        /* Only a socket file this call created is removed. */
        if (bound) unlink(a.path);
        l->closed = 1;
        uv_close(&l->sock.handle, listener_free_cb);
        if (rc == UV_EADDRINUSE) {
            lua_pushnil(L);
            lua_pushfstring(L, "listen %s: EADDRINUSE: address already in use%s", a.text,
                            a.is_pipe ? " (if no server owns that socket any more, remove the "
                                        "stale file first)" : "");
            lua_pushliteral(L, "EADDRINUSE");
            return 3;
        }
        char what[200];
        snprintf(what, sizeof what, "listen %s", a.text);
        return tn_fail_uv(L, what, rc);
    }
    if (!a.is_pipe) {
        struct sockaddr_storage ss;
        int len = sizeof ss;
        if (uv_tcp_getsockname(&l->sock.tcp, (struct sockaddr *)&ss, &len) == 0) {
            l->port = ntohs(ss.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&ss)->sin6_port
                                                     : ((struct sockaddr_in *)&ss)->sin_port);
            format_sockaddr(&ss, l->text, sizeof l->text);
        }
    }
    listener_box *b = lua_newuserdatauv(L, sizeof *b, 0);
    b->l = l;
    l->refs++;
    luaL_setmetatable(L, TN_LISTENER_MT);
    return 1;
}

static void accept_cancel(void *arg) {
    tn_listener *l = arg;
    if (l->waiter) {
        tn_task_release(l->waiter);
        l->waiter = NULL;
    }
}

/* listener:accept([timeout_ms]) -> stream | nil, err, code */
static int l_listener_accept(lua_State *L) {
    tn_listener *l = tn_listener_check(L, 1);
    lua_Integer timeout = luaL_optinteger(L, 2, -1);
    if (l->on_conn) return luaL_error(L, "listener is owned by a server; it accepts by itself");
    if (l->pending) return accept_push(L, l);
    if (l->waiter) return luaL_error(L, "another task is already accepting on this listener");
    tn_task *t = tn_task_check(L);
    l->waiter = tn_task_hold(t);
    l->wseq = tn_task_seq(t);
    return tn_task_wait_cancel(L, t, timeout, accept_cancel, l);
}

static int l_listener_port(lua_State *L) {
    tn_listener *l = tn_listener_check(L, 1);
    if (l->is_pipe) lua_pushnil(L);
    else lua_pushinteger(L, l->port);
    return 1;
}

static int l_listener_address(lua_State *L) {
    lua_pushstring(L, tn_listener_check(L, 1)->text);
    return 1;
}

static int l_listener_close(lua_State *L) {
    listener_box *b = luaL_checkudata(L, 1, TN_LISTENER_MT);
    if (b->l) tn_listener_close(b->l);
    return 0;
}

static int l_listener_gc(lua_State *L) {
    listener_box *b = luaL_checkudata(L, 1, TN_LISTENER_MT);
    tn_listener *l = b->l;
    if (!l) return 0;
    b->l = NULL;
    if (l->waiter) { tn_task_release(l->waiter); l->waiter = NULL; }
    if (!l->closed) {
        l->closed = 1;
        uv_close(&l->sock.handle, listener_free_cb);
    }
    listener_unref(l);
    return 0;
}

static int l_listener_tostring(lua_State *L) {
    listener_box *b = luaL_checkudata(L, 1, TN_LISTENER_MT);
    if (b->l && !b->l->closed) lua_pushfstring(L, "tenement.listener (%s)", b->l->text);
    else lua_pushliteral(L, "tenement.listener (closed)");
    return 1;
}

int tn_open_net(lua_State *L) {
    static const luaL_Reg stream_methods[] = {
        {"read", l_stream_read}, {"write", l_stream_write}, {"shutdown", l_stream_shutdown},
        {"close", l_stream_close}, {"peer", l_stream_peer}, {"credentials", l_stream_credentials},
        {"__gc", l_stream_gc},
        {"__close", l_stream_close}, {"__tostring", l_stream_tostring}, {NULL, NULL},
    };
    static const luaL_Reg listener_methods[] = {
        {"accept", l_listener_accept}, {"port", l_listener_port},
        {"address", l_listener_address}, {"close", l_listener_close},
        {"__gc", l_listener_gc}, {"__close", l_listener_close},
        {"__tostring", l_listener_tostring}, {NULL, NULL},
    };
    static const luaL_Reg fns[] = {
        {"listen", l_listen}, {"connect", l_connect}, {NULL, NULL},
    };
    /* A peer that hangs up must give EPIPE on write, never kill the process. */
    struct sigaction sa;
    if (sigaction(SIGPIPE, NULL, &sa) == 0 && sa.sa_handler == SIG_DFL) signal(SIGPIPE, SIG_IGN);
    tn_new_class(L, STREAM_MT, stream_methods);
    tn_new_class(L, TN_LISTENER_MT, listener_methods);
    luaL_newlib(L, fns);
    return 1;
}
