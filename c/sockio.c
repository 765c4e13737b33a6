/*
 * Socket I/O for the HTTP server and the proxy, and the loop that runs
 * it (see net.h for the contract).
 *
 * Why not libuv streams: libuv's epoll is level-triggered, so every socket
 * it reports is polled again on the next wait just to learn it went quiet,
 * and it reads and writes with read(2)/write(2), which go through the VFS
 * layer before reaching the socket. Per proxied request that is two extra
 * socket polls and four trips through the VFS, a measurable share of a
 * request that costs a few microseconds.
 *
 * The loop (tn_io_run) blocks in this set's epoll_wait, with libuv's own
 * epoll fd inside the set: libuv is run (one non-blocking iteration) only
 * when one of its fds is ready, a timer is due or it has callbacks queued.
 * A proxied request through a direct route needs none of that, so it costs
 * one epoll_wait per batch of events and never enters libuv at all.
 *
 * Edges: an event says "something changed", so a socket that is readable
 * stays marked readable until a read finds it drained (a short read or
 * EAGAIN; only EAGAIN once TCP urgent data was seen, for a read stops short
 * at its mark with bytes left behind it). Reading stopped with bytes left,
 * or a read burst cut short for fairness, leaves the stream on the pending
 * list, served from an idle handle before the loop blocks again. Callbacks
 * of queued writes go the same way, so none runs inside the call that
 * queued it.
 */
#include "net.h"

#include <errno.h>
#include <stdlib.h>
#include <linux/sockios.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <unistd.h>

#define IO_EVENTS 256      /* epoll events taken per wakeup */
#define IO_READS 32        /* reads of one stream before the others' turn */
#define IO_READ_HINT (64 * 1024)
#define IO_SKIPS 8         /* libuv turns in a row before the set is looked at, */
#define IO_SKIP_NS 200000  /* and for at most this long: a Lua task that works
                            * in slices (yielding) must not hold the sockets
                            * back for eight of its slices */
#define IO_IN (EPOLLIN | EPOLLPRI | EPOLLRDHUP | EPOLLET)

/* From 1.44, uv_backend_timeout is 0 while watchers wait to be registered
 * with the kernel; the loop relies on it when a socket callback starts a
 * libuv watcher (a proxy connect, an accept) outside uv_run. */
#if UV_VERSION_HEX < 0x012c00
#error "tenement needs libuv 1.44 or newer"
#endif

/* Per loop, in its data pointer (nothing else uses it): made by the first
 * tn_io_run or tn_io_open, kept as long as the loop. */
typedef struct io_loop {
    int ep;
    int tfd;               /* libuv's next timer, as a timerfd in the set */
    uint64_t armed;        /* its deadline in loop time (ms), 0 when not set */
    uint64_t fired;        /* the deadline the timerfd last fired for */
    uv_async_t keep;       /* referenced while streams are active: libuv
                            * then counts as alive, so its turns run its
                            * unreferenced handles (signals) and timers */
    int stop;              /* tn_io_stop was called */
    int active;            /* streams keeping the loop alive */
    int npend;
    tn_io *pend_head, *pend_tail;
} io_loop;

/* The data of libuv's epoll fd and of the timerfd in the set: no stream
 * has these addresses. */
#define IO_LIBUV ((void *)&io_of)
#define IO_TIMER ((void *)&io_loop_of)
static io_loop *io_loop_of(const tn_io *io);

static int io_unavailable; /* the set could not be made: no stream either */

static io_loop *io_of(uv_loop_t *loop) {
    if (loop->data) return loop->data;
    if (io_unavailable) return NULL;
    io_loop *il = calloc(1, sizeof *il);
    if (!il) { io_unavailable = 1; return NULL; }
    il->ep = epoll_create1(EPOLL_CLOEXEC);
    il->tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
    struct epoll_event ev = { .events = EPOLLIN, .data.ptr = IO_LIBUV };
    struct epoll_event tev = { .events = EPOLLIN, .data.ptr = IO_TIMER };
    if (il->ep < 0 || il->tfd < 0 || epoll_ctl(il->ep, EPOLL_CTL_ADD, uv_backend_fd(loop), &ev) != 0 ||
        epoll_ctl(il->ep, EPOLL_CTL_ADD, il->tfd, &tev) != 0 || uv_async_init(loop, &il->keep, NULL) != 0) {
        if (il->ep >= 0) close(il->ep);
        if (il->tfd >= 0) close(il->tfd);
        free(il);
        io_unavailable = 1;
        return NULL;
    }
    uv_unref((uv_handle_t *)&il->keep);
    loop->data = il;
    return il;
}

static io_loop *io_loop_of(const tn_io *io) { return io->sock.handle.loop->data; }

/* A stream keeps the loop alive while it waits for bytes or owes some, as a
 * libuv stream does. */
static void io_activity(tn_io *io) {
    int active = !io->closing && !io->unref && (io->reading || io->wq_head || io->shut);
    if (active == (int)io->active) return;
    io->active = (unsigned)active;
    io_loop *il = io_loop_of(io);
    il->active += active ? 1 : -1;
    if (active && il->active == 1) uv_ref((uv_handle_t *)&il->keep);
    if (!active && il->active == 0) uv_unref((uv_handle_t *)&il->keep);
}

static void io_pend(tn_io *io) {
    if (io->pending || io->closing) return;
    io_loop *il = io_loop_of(io);
    io->pending = 1;
    io->pend_next = NULL;
    io->pend_prev = il->pend_tail;
    if (il->pend_tail) il->pend_tail->pend_next = io;
    else il->pend_head = io;
    il->pend_tail = io;
    il->npend++;
}

static void io_unpend(tn_io *io) {
    if (!io->pending) return;
    io_loop *il = io_loop_of(io);
    io->pending = 0;
    if (io->pend_prev) io->pend_prev->pend_next = io->pend_next;
    else il->pend_head = io->pend_next;
    if (io->pend_next) io->pend_next->pend_prev = io->pend_prev;
    else il->pend_tail = io->pend_prev;
    io->pend_prev = io->pend_next = NULL;
    il->npend--;
}

/* EPOLLOUT only while bytes wait: a Unix socket signals write space each
 * time its peer reads, which would wake the loop once more per request. */
static void io_want_out(tn_io *io, int want) {
    if (!io->opened || (int)io->want_out == want) return;
    struct epoll_event ev = { .events = IO_IN | (want ? EPOLLOUT : 0), .data.ptr = io };
    if (epoll_ctl(io_loop_of(io)->ep, EPOLL_CTL_MOD, io->fd, &ev) == 0) io->want_out = (unsigned)want;
}

static void io_done(tn_io *io, tn_io_req *r, int status) {
    r->status = status;
    r->next = NULL;
    if (io->done_tail) io->done_tail->next = r;
    else io->done_head = r;
    io->done_tail = r;
    io_pend(io);
}

static void io_do_shutdown(tn_io *io) {
    tn_io_req *r = io->shut;
    io->shut = NULL;
    io->shut_done = 1;
    io_done(io, r, shutdown(io->fd, SHUT_WR) == 0 ? 0 : -errno);
    io_activity(io);
}

/* Write what is queued, in order, until the kernel is full. */
static void io_flush(tn_io *io) {
    while (io->wq_head) {
        tn_io_req *r = io->wq_head;
        ssize_t n = send(io->fd, r->base, r->len, MSG_DONTWAIT | MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) { io_want_out(io, 1); return; }
            int err = -errno;
            /* the connection is broken: every write fails as libuv's do */
            while ((r = io->wq_head)) {
                io->wq_head = r->next;
                io_done(io, r, err);
            }
            io->wq_tail = NULL;
            io->queued = 0;
            io_want_out(io, 0);
            if (io->shut) {
                tn_io_req *s = io->shut;
                io->shut = NULL;
                io->shut_done = 1;
                io_done(io, s, err);
            }
            io_activity(io);
            return;
        }
        r->base += n;
        r->len -= (size_t)n;
        io->queued -= (size_t)n;
        io->sent += (uint64_t)n;
        if (r->len > 0) { io_want_out(io, 1); return; } /* the kernel is full */
        io->wq_head = r->next;
        if (!io->wq_head) io->wq_tail = NULL;
        io_done(io, r, 0);
    }
    io_want_out(io, 0);
    if (io->shut) io_do_shutdown(io);
    io_activity(io);
}

static void io_read(tn_io *io) {
    uv_stream_t *s = &io->sock.stream;
    for (int i = 0; i < IO_READS; i++) {
        if (!io->reading || io->closing || !io->readable) return;
        uv_buf_t b = uv_buf_init(NULL, 0);
        io->alloc_cb(&io->sock.handle, IO_READ_HINT, &b);
        if (!b.base || b.len == 0) {
            io->reading = 0;
            io_activity(io);
            io->read_cb(s, UV_ENOBUFS, &b);
            return;
        }
        ssize_t n = recv(io->fd, b.base, b.len, MSG_DONTWAIT);
        if (n > 0) {
            /* a short read drained the socket, and the next bytes raise a
             * new edge; but a FIN already reported raises none, and urgent
             * data may have stopped the read at its mark: read on */
            if ((size_t)n < b.len && !io->hup && !io->urgent) io->readable = 0;
            io->read_cb(s, n, &b);
            continue;
        }
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            io->readable = 0;
            return;
        }
        int status = n == 0 ? UV_EOF : -errno;
        io->readable = 0;
        io->reading = 0;
        io_activity(io);
        io->read_cb(s, status, &b);
        return;
    }
    io_pend(io); /* more may be waiting: after the other streams */
}

/* Callbacks owed and reads left over, for the streams pending now; those
 * that pend again meanwhile go to the back and wait for the next turn. */
static void io_run_pending(io_loop *il) {
    for (int n = il->npend; n > 0 && il->pend_head; n--) {
        tn_io *io = il->pend_head;
        io_unpend(io);
        while (io->done_head && !io->closing) {
            tn_io_req *r = io->done_head;
            io->done_head = r->next;
            if (!io->done_head) io->done_tail = NULL;
            r->cb(r, r->status);
        }
        if (!io->closing && io->reading && io->readable) io_read(io);
    }
}

static void io_event(tn_io *io, uint32_t e) {
    if (io->closing) return;
    if ((e & (EPOLLOUT | EPOLLERR | EPOLLHUP)) && io->wq_head) io_flush(io);
    if (io->closing) return;
    if (e & (EPOLLIN | EPOLLPRI | EPOLLRDHUP | EPOLLERR | EPOLLHUP)) {
        io->readable = 1;
        if (e & EPOLLPRI) io->urgent = 1;
        if (e & (EPOLLRDHUP | EPOLLERR | EPOLLHUP)) io->hup = 1;
        io_read(io);
    }
}

int tn_io_run(uv_loop_t *loop) {
    io_loop *il = io_of(loop);
    if (!il) return uv_run(loop, UV_RUN_DEFAULT);
    struct epoll_event ev[IO_EVENTS];
    il->stop = 0;
    int skipped = 0;
    uint64_t skipping_since = 0;
    for (;;) {
        int uv_alive = uv_loop_alive(loop);
        if (!uv_alive && il->active == 0 && !il->pend_head) return 0;
        /* libuv's own timeout: its next timer, or 0 with callbacks queued */
        int timeout = il->pend_head ? 0 : uv_alive ? uv_backend_timeout(loop) : -1;
        if (timeout == 0 && !il->pend_head && skipped < IO_SKIPS &&
            (skipped == 0 || uv_hrtime() - skipping_since < IO_SKIP_NS)) {
            /* libuv has callbacks queued (a task to resume, a handle to
             * close): its turn at once, as its own loop would, without a
             * look at the set first; the set waits a few short turns at most */
            if (skipped++ == 0) skipping_since = uv_hrtime();
            uv_run(loop, UV_RUN_NOWAIT);
            if (il->stop) break;
            continue;
        }
        skipped = 0;
        if (timeout > 0) {
            /* The timerfd is set only when the next timer changes: a wait
             * with a timeout would arm and cancel a kernel timer on every
             * wakeup, twice per proxied request at one connection. When it
             * fired and libuv's clock (which may be the coarse one, a tick
             * behind) does not see the deadline yet, a plain wait of the
             * remaining time follows instead of a timerfd already due. */
            uint64_t due = uv_now(loop) + (uint64_t)timeout;
            if (due <= il->fired) {
                /* keep the plain timeout */
            } else if (due != il->armed) {
                struct itimerspec its = { .it_value = { .tv_sec = (time_t)(due / 1000),
                                                        .tv_nsec = (long)(due % 1000) * 1000000 } };
                if (timerfd_settime(il->tfd, TFD_TIMER_ABSTIME, &its, NULL) == 0) il->armed = due;
            }
            if (il->armed == due && due > il->fired) timeout = -1;
        }
        int n = epoll_wait(il->ep, ev, IO_EVENTS, timeout);
        if (n < 0) n = 0; /* EINTR: a signal, which libuv sees through its own fd */
        uv_update_time(loop);
        int run_uv = n == 0 && timeout != 0;
        /* A stream closed by an earlier event's callback is still in
         * memory: it is freed in its close callback, which libuv runs
         * after this batch. */
        for (int i = 0; i < n; i++) {
            if (ev[i].data.ptr == IO_LIBUV) {
                run_uv = 1;
            } else if (ev[i].data.ptr == IO_TIMER) {
                uint64_t expirations;
                if (read(il->tfd, &expirations, sizeof expirations) < 0) { /* raced a re-arm */ }
                il->fired = il->armed;
                il->armed = 0;
                run_uv = 1;
            } else {
                io_event(ev[i].data.ptr, ev[i].events);
            }
        }
        if (il->pend_head) io_run_pending(il);
        if (il->stop) break;
        if (run_uv || (uv_loop_alive(loop) && uv_backend_timeout(loop) == 0)) uv_run(loop, UV_RUN_NOWAIT);
        if (il->stop) break;
    }
    il->stop = 0;
    return 1;
}

void tn_io_stop(uv_loop_t *loop) {
    io_loop *il = loop->data;
    if (il) il->stop = 1;
    uv_stop(loop);
}

int tn_io_open(tn_io *io) {
    io_loop *il = io_of(io->sock.handle.loop);
    if (!il) return UV_ENOMEM;
    uv_os_fd_t fd;
    int rc = uv_fileno(&io->sock.handle, &fd);
    if (rc) return rc;
    io->fd = fd;
    /* registering reports what is already there, so nothing is missed */
    struct epoll_event ev = { .events = IO_IN, .data.ptr = io };
    if (epoll_ctl(il->ep, EPOLL_CTL_ADD, fd, &ev) != 0) return -errno;
    io->opened = 1;
    if (io->wq_head || io->shut) io_flush(io); /* queued while connecting */
    return 0;
}

void tn_io_read_start(tn_io *io, uv_alloc_cb alloc_cb, uv_read_cb read_cb) {
    if (io->closing) return;
    io->alloc_cb = alloc_cb;
    io->read_cb = read_cb;
    io->reading = 1;
    io_activity(io);
    if (io->readable) io_pend(io); /* bytes came while not reading */
}

void tn_io_read_stop(tn_io *io) {
    io->reading = 0;
    io_activity(io);
}

int tn_io_try_write(tn_io *io, const uv_buf_t *bufs, unsigned n) {
    if (io->closing) return UV_EBADF;
    if (!io->opened || io->wq_head || io->shut) return UV_EAGAIN; /* still connecting, or behind the queue */
    ssize_t w;
    if (n == 1) {
        do w = send(io->fd, bufs[0].base, bufs[0].len, MSG_DONTWAIT | MSG_NOSIGNAL);
        while (w < 0 && errno == EINTR);
    } else {
        struct msghdr m = { .msg_iov = (struct iovec *)bufs, .msg_iovlen = n };
        do w = sendmsg(io->fd, &m, MSG_DONTWAIT | MSG_NOSIGNAL);
        while (w < 0 && errno == EINTR);
    }
    if (w < 0) return errno == EAGAIN || errno == EWOULDBLOCK ? UV_EAGAIN : -errno;
    io->sent += (uint64_t)w;
    return w == 0 ? UV_EAGAIN : (int)w;
}

int tn_io_write(tn_io *io, tn_io_req *req, const char *base, size_t len, tn_io_cb cb) {
    if (io->closing) return UV_EBADF;
    if (!io_of(io->sock.handle.loop)) return UV_ENOMEM; /* queued while connecting */
    if (io->shut || io->shut_done) return UV_EPIPE;
    req->next = NULL;
    req->base = base;
    req->len = len;
    req->cb = cb;
    req->status = 0;
    int was_empty = io->wq_head == NULL;
    if (io->wq_tail) io->wq_tail->next = req;
    else io->wq_head = req;
    io->wq_tail = req;
    io->queued += len;
    /* when the queue was empty the socket may be writable with no edge
     * to come: write now (the callback still waits for the pending turn) */
    if (was_empty && io->opened) io_flush(io);
    io_activity(io);
    return 0;
}

int tn_io_shutdown(tn_io *io, tn_io_req *req, tn_io_cb cb) {
    if (io->closing) return UV_EBADF;
    if (!io_of(io->sock.handle.loop)) return UV_ENOMEM;
    if (io->shut || io->shut_done) return UV_EALREADY;
    req->next = NULL;
    req->base = NULL;
    req->len = 0;
    req->cb = cb;
    req->status = 0;
    io->shut = req;
    if (io->opened && !io->wq_head) io_do_shutdown(io);
    io_activity(io);
    return 0;
}

size_t tn_io_queued(const tn_io *io) { return io->queued; }

uint64_t tn_io_delivered(const tn_io *io) {
    int unread = 0;
    if (!io->opened || io->closing || ioctl(io->fd, SIOCOUTQ, &unread) != 0 || unread < 0) unread = 0;
    return io->sent - ((uint64_t)unread < io->sent ? (uint64_t)unread : io->sent);
}

void tn_io_ref(tn_io *io, int ref) {
    io->unref = !ref;
    io_activity(io);
}

/* libuv is done with the handle: what was queued is called back, completed
 * writes with their status, the rest cancelled, then the owner's close_cb. */
static void io_closed(uv_handle_t *h) {
    tn_io *io = (tn_io *)h;
    tn_io_req *r;
    while ((r = io->done_head)) {
        io->done_head = r->next;
        r->cb(r, r->status);
    }
    io->done_tail = NULL;
    while ((r = io->wq_head)) {
        io->wq_head = r->next;
        r->cb(r, UV_ECANCELED);
    }
    io->wq_tail = NULL;
    io->queued = 0;
    if ((r = io->shut)) {
        io->shut = NULL;
        r->cb(r, UV_ECANCELED);
    }
    io->close_cb(h);
}

void tn_io_close(tn_io *io, uv_close_cb close_cb) {
    if (io->closing) return;
    /* out of the set before the fd closes: a child between fork and exec
     * may hold a copy of it, which would keep it registered */
    if (io->opened) epoll_ctl(io_loop_of(io)->ep, EPOLL_CTL_DEL, io->fd, NULL);
    io->reading = 0;
    io->closing = 1;
    io_activity(io);
    io_unpend(io);
    io->close_cb = close_cb;
    uv_close(&io->sock.handle, io_closed);
}
