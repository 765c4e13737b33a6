/*
 * The private interface between net.c and http.c: socket addresses, the
 * TCP/Unix handle union, and listeners that a C owner (the HTTP server) can
 * take over from Lua. Nothing else includes this file.
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
