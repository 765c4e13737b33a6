/*
 * The floor under every proxy in the proxy benchmark: a byte relay with no
 * HTTP at all. Each TCP client gets its own connection to the Unix socket,
 * and bytes go across as they come, through one edge-triggered epoll set
 * with recv and send: the fewest system calls and the least user-space work
 * a proxy on these sockets can do. It adds no headers and parses nothing,
 * so it is not a peer to compare features with; its requests per CPU-second
 * show how much of a proxy's cost is the kernel's.
 *
 * usage: relay PORT UNIX_SOCKET_PATH
 */
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#define MAX_FDS 65536
#define PENDING_MAX (256 * 1024)

/* what could not be sent to fd yet, sent when it is writable again */
struct side {
    int used, peer;
    size_t len;
    char *pending;
};

static struct side sides[MAX_FDS];
static int ep;

/* EPOLLOUT only while bytes wait: a Unix socket reports write space each
 * time its peer reads, one more wakeup per request otherwise */
static int watch(int fd, int op, int want_out) {
    struct epoll_event ev = { .events = EPOLLIN | EPOLLRDHUP | EPOLLET | (want_out ? EPOLLOUT : 0), .data.fd = fd };
    return epoll_ctl(ep, op, fd, &ev);
}

static void drop(int fd) {
    int peer = sides[fd].peer;
    free(sides[fd].pending);
    free(sides[peer].pending);
    memset(&sides[fd], 0, sizeof sides[fd]);
    memset(&sides[peer], 0, sizeof sides[peer]);
    close(fd);
    close(peer);
}

/* 0, or -1 when the connection pair is gone */
static int send_all(int fd, const char *p, size_t n) {
    struct side *s = &sides[fd];
    if (s->len > 0) goto queue; /* keep the order */
    while (n > 0) {
        ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
        if (w < 0 && errno == EINTR) continue;
        if (w < 0 && errno == EAGAIN) break;
        if (w < 0) return -1;
        p += w;
        n -= (size_t)w;
    }
    if (n == 0) return 0;
queue:
    if (s->len + n > PENDING_MAX) return -1;
    char *grown = realloc(s->pending, s->len + n);
    if (!grown) return -1;
    memcpy(grown + s->len, p, n);
    s->pending = grown;
    if (s->len == 0) watch(fd, EPOLL_CTL_MOD, 1);
    s->len += n;
    return 0;
}

static int flush_pending(int fd) {
    struct side *s = &sides[fd];
    size_t len = s->len;
    char *p = s->pending;
    s->len = 0;
    s->pending = NULL;
    int rc = send_all(fd, p, len);
    free(p);
    if (rc == 0 && s->len == 0) watch(fd, EPOLL_CTL_MOD, 0);
    return rc;
}

static void accept_all(int lfd, const struct sockaddr_un *up) {
    for (;;) {
        int c = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (c < 0) return;
        int u = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        int one = 1;
        setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        if (c >= MAX_FDS || u < 0 || u >= MAX_FDS || connect(u, (const void *)up, sizeof *up) != 0) {
            close(c);
            if (u >= 0) close(u);
            continue;
        }
        sides[c] = (struct side){ .used = 1, .peer = u };
        sides[u] = (struct side){ .used = 1, .peer = c };
        if (watch(c, EPOLL_CTL_ADD, 0) != 0 || watch(u, EPOLL_CTL_ADD, 0) != 0) drop(c);
    }
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: relay PORT UNIX_SOCKET_PATH\n");
        return 2;
    }
    struct sockaddr_un up = { .sun_family = AF_UNIX };
    snprintf(up.sun_path, sizeof up.sun_path, "%s", argv[2]);
    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0), one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons((uint16_t)atoi(argv[1])),
                             .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
    if (bind(lfd, (const void *)&a, sizeof a) != 0 || listen(lfd, 4096) != 0) {
        perror("relay: listen");
        return 1;
    }
    ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event lev = { .events = EPOLLIN, .data.fd = lfd };
    epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &lev);
    static char buf[64 * 1024];
    struct epoll_event evs[512];
    for (;;) {
        int n = epoll_wait(ep, evs, 512, -1);
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            if (fd == lfd) { accept_all(lfd, &up); continue; }
            if (!sides[fd].used) continue; /* dropped earlier in this batch */
            if ((evs[i].events & EPOLLOUT) && sides[fd].len > 0 && flush_pending(fd) != 0) { drop(fd); continue; }
            if (!(evs[i].events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR))) continue;
            for (;;) {
                ssize_t r = recv(fd, buf, sizeof buf, 0);
                if (r > 0) {
                    if (send_all(sides[fd].peer, buf, (size_t)r) != 0) { drop(fd); break; }
                    if ((size_t)r < sizeof buf && !(evs[i].events & (EPOLLRDHUP | EPOLLHUP))) break;
                    continue;
                }
                if (r < 0 && errno == EINTR) continue;
                if (r < 0 && errno == EAGAIN) break;
                drop(fd); /* EOF or an error: both sides go */
                break;
            }
        }
    }
}
