/*
 * The private interface between net.c, sockio.c and http.c: socket
 * addresses, the TCP/Unix handle union, listeners that a C owner (the HTTP
 * server) can take over from Lua, and the server's socket I/O. Nothing else
 * includes this file.
 */
#ifndef TN_NET_H
#define TN_NET_H

#include "tn.h"

#include <sys/socket.h>
#include <sys/un.h>

/* One stream handle, TCP or Unix; which one is recorded beside it. */
typedef union tn_sock {
    uv_handle_t handle;
    uv_stream_t stream;
    uv_tcp_t tcp;
    uv_pipe_t pipe;
} tn_sock;

/* Where to listen or connect. Hosts are numeric (IPv4 or IPv6) or
 * "localhost"; resolving names would block or need the thread pool, and
 * every peer of tenement is local. */
typedef struct tn_addr {
    int is_pipe;
    char path[sizeof(((struct sockaddr_un *)0)->sun_path)];
    struct sockaddr_storage ss;
    char text[160];           /* "127.0.0.1:8080", "[::1]:80" or the path */
} tn_addr;

/* Read {host=, port=} or {path=} from the table at idx into a. Raises on
 * misuse (wrong types, both or neither given); returns 0, or pushes
 * nil, err, code and returns 3 when the address itself is unusable. */
int tn_addr_from_table(lua_State *L, int idx, tn_addr *a, const char *verb);

/* Initialise h as the kind a asks for. */
int tn_sock_init(uv_loop_t *loop, tn_sock *h, int is_pipe);
/* Start connecting h to a; cb gets the status, unless this returns an error. */
int tn_sock_connect(uv_connect_t *req, tn_sock *h, const tn_addr *a, uv_connect_cb cb);
/* "ip:port" of the peer, or "unix:<path>" for Unix sockets. */
void tn_sock_peer(tn_sock *h, int is_pipe, char *buf, size_t n);

/* A listening socket. Lua owns it (userdata "tenement.listener") unless a C
 * owner installs on_conn, which then gets every incoming connection. */
typedef struct tn_listener tn_listener;
typedef void (*tn_listener_fn)(tn_listener *l, int status);
struct tn_listener {
    tn_sock sock;
    int is_pipe;
    int closed;
    int pending;              /* connections libuv holds for uv_accept */
    int port;
    tn_task *waiter;          /* a task in accept() */
    uint64_t wseq;
    tn_listener_fn on_conn;   /* set by a C owner */
    tn_listener_fn on_close;  /* told when the listener closes */
    void *owner;
    int refs;                 /* the Lua handle, and the open libuv handle */
    char text[160];
};

#define TN_LISTENER_MT "tenement.listener"

/* Socket I/O for the HTTP server's connections and the proxy's upstream
 * connections (sockio.c), the hot path of every proxied byte. The libuv
 * handle in sock still owns the fd (accept, connect, close), but once
 * tn_io_open has run, libuv never reads or writes it: the fd sits in the
 * edge-triggered epoll set that tn_io_run blocks in, and is read with recv
 * and written with send. That saves what a libuv stream costs per request
 * on Linux: the level-triggered epoll's second look at every socket it
 * reported, read/write through the VFS, and a turn of libuv's loop.
 *
 * The calls mirror the libuv stream calls they replace, and keep their
 * promises: callbacks of writes and shutdowns never run inside the call
 * that queued them; a close calls back what is still queued (completed
 * ones with their status, the rest with UV_ECANCELED) before close_cb; a
 * stream keeps the loop alive while it reads or has bytes to write,
 * unless tn_io_ref(io, 0). */
typedef struct tn_io tn_io;
typedef struct tn_io_req tn_io_req;
typedef void (*tn_io_cb)(tn_io_req *req, int status);

struct tn_io_req {
    tn_io_req *next;
    const char *base;         /* what is still to be written */
    size_t len;
    tn_io_cb cb;
    void *data;
    int status;
};

struct tn_io {
    tn_sock sock;             /* first: a handle's close callback finds its tn_io */
    int fd;
    unsigned opened : 1, closing : 1, reading : 1, readable : 1, hup : 1, urgent : 1, want_out : 1, shut_done : 1, unref : 1, active : 1, pending : 1;
    uv_alloc_cb alloc_cb;
    uv_read_cb read_cb;
    tn_io_req *wq_head, *wq_tail;     /* not yet written, in order */
    tn_io_req *done_head, *done_tail; /* finished, not yet called back */
    tn_io_req *shut;                  /* FIN once the queue is written */
    size_t queued;                    /* bytes in wq */
    uint64_t sent;                    /* bytes the kernel took, ever */
    tn_io *pend_prev, *pend_next;     /* reads or callbacks owed outside epoll */
    uv_close_cb close_cb;
};

/* Take over sock's fd (connected or accepted). 0 or a libuv error. */
int tn_io_open(tn_io *io);
void tn_io_read_start(tn_io *io, uv_alloc_cb alloc_cb, uv_read_cb read_cb);
void tn_io_read_stop(tn_io *io);
/* Bytes the kernel took now; UV_EAGAIN when none or writes are queued. */
int tn_io_try_write(tn_io *io, const uv_buf_t *bufs, unsigned n);
/* Queue len bytes at base (kept by the caller until cb). 0 or an error. */
int tn_io_write(tn_io *io, tn_io_req *req, const char *base, size_t len, tn_io_cb cb);
/* FIN once everything queued is written. 0 or an error. */
int tn_io_shutdown(tn_io *io, tn_io_req *req, tn_io_cb cb);
size_t tn_io_queued(const tn_io *io);
/* Bytes the peer took off the socket, ever: grows while a slow reader
 * reads, even when no queued write completes. */
uint64_t tn_io_delivered(const tn_io *io);
void tn_io_ref(tn_io *io, int ref);
/* Stop and close; close_cb gets &io->sock.handle once libuv is done. */
void tn_io_close(tn_io *io, uv_close_cb close_cb);

/* The listener at idx (raises if it is not one or is closed). */
tn_listener *tn_listener_check(lua_State *L, int idx);
/* Accept the pending connection into h (initialised by the caller with
 * tn_sock_init); UV_EAGAIN when none is pending. */
int tn_listener_accept(tn_listener *l, tn_sock *h);
/* Keep l's memory for a C owner that points at it (the Lua handle and the
 * open socket hold their own references). */
void tn_listener_hold(tn_listener *l);
void tn_listener_release(tn_listener *l);
/* Close the listening socket (idempotent). A task in accept() gets
 * nil, "closed" and on_close is told. The memory goes once the libuv handle
 * is closed and the Lua handle collected, so both may point at it. */
void tn_listener_close(tn_listener *l);

#endif
