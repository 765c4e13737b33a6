/*
 * The floor again, through io_uring instead of epoll: the same byte relay
 * as relay.c (one Unix-socket connection per TCP client, bytes across as
 * they come, no HTTP), with the system calls a proxy cannot batch under
 * epoll batched. Every received chunk goes out as a send linked to the next
 * recv on the same side, posting no completion when it succeeds, and one
 * io_uring_enter both submits them and waits: two system calls per
 * request at one connection where epoll needs six. The ring defers its
 * completion work to that wait (DEFER_TASKRUN), so no other task runs it.
 * Its requests per CPU-second against relay.c's say whether a proxy
 * rewritten on io_uring would spend less, on this kernel and machine.
 *
 * usage: relay-uring PORT UNIX_SOCKET_PATH
 * exits 3 when the kernel refuses io_uring (disabled, or filtered by seccomp)
 */
#include <errno.h>
#include <liburing.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#define MAX_FDS 65536
#define BUF_SIZE (64 * 1024)

enum { OP_ACCEPT, OP_RECV, OP_SEND };

/* one direction of a pair: what fd receives goes to peer from buf */
struct side {
    int peer;
    char *buf;
};

static struct side *sides[MAX_FDS];
/* a completion names its pair's generation: one that comes after its pair
 * was dropped must not end a new pair given the same fd numbers */
static uint64_t gens[MAX_FDS], next_gen = 1;
static struct io_uring ring;
static int lfd;

static uint64_t tag(int fd, int op) { return gens[fd] << 24 | (uint64_t)(uint32_t)fd << 8 | (uint64_t)op; }

static struct io_uring_sqe *next_sqe(void) {
    struct io_uring_sqe *sqe = io_uring_get_sqe(&ring);
    if (!sqe) { /* the queue is full: hand what is there to the kernel */
        io_uring_submit(&ring);
        sqe = io_uring_get_sqe(&ring);
    }
    if (!sqe) {
        fprintf(stderr, "relay-uring: the submission queue stays full\n");
        exit(1);
    }
    return sqe;
}

static void arm_accept(void) {
    struct io_uring_sqe *sqe = next_sqe();
    io_uring_prep_multishot_accept(sqe, lfd, NULL, NULL, SOCK_CLOEXEC);
    io_uring_sqe_set_data64(sqe, (uint64_t)lfd << 8 | OP_ACCEPT);
}

static void arm_recv(int fd) {
    struct io_uring_sqe *sqe = next_sqe();
    io_uring_prep_recv(sqe, fd, sides[fd]->buf, BUF_SIZE, 0);
    io_uring_sqe_set_data64(sqe, tag(fd, OP_RECV));
}

/* MSG_WAITALL: the kernel finishes a short send itself before the linked
 * recv may reuse the buffer; a failed send cancels that recv */
static void forward(int fd, unsigned len) {
    struct io_uring_sqe *sqe = next_sqe();
    io_uring_prep_send(sqe, sides[fd]->peer, sides[fd]->buf, len, MSG_WAITALL | MSG_NOSIGNAL);
    sqe->flags |= IOSQE_IO_LINK | IOSQE_CQE_SKIP_SUCCESS;
    io_uring_sqe_set_data64(sqe, tag(fd, OP_SEND));
    arm_recv(fd);
}

static void free_side(int fd) {
    if (!sides[fd]) return;
    free(sides[fd]->buf);
    free(sides[fd]);
    sides[fd] = NULL;
}

/* both sides go; operations still queued on them end with errors that find
 * no side and are ignored. Closing does not cancel what the ring holds, so
 * each fd is shut down first, which ends its pending recv */
static void drop(int fd) {
    if (!sides[fd]) return;
    int peer = sides[fd]->peer;
    shutdown(fd, SHUT_RDWR);
    shutdown(peer, SHUT_RDWR);
    close(fd);
    close(peer);
    free_side(fd);
    free_side(peer);
}

static void pair_up(int client, const struct sockaddr_un *up) {
    int one = 1;
    setsockopt(client, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    int u = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (client >= MAX_FDS || u < 0 || u >= MAX_FDS || connect(u, (const void *)up, sizeof *up) != 0) {
        close(client);
        if (u >= 0) close(u);
        return;
    }
    struct side *c = malloc(sizeof *c), *s = malloc(sizeof *s);
    char *cb = malloc(BUF_SIZE), *sb = malloc(BUF_SIZE);
    if (!c || !s || !cb || !sb) {
        free(c), free(s), free(cb), free(sb);
        close(client);
        close(u);
        return;
    }
    *c = (struct side){ .peer = u, .buf = cb };
    *s = (struct side){ .peer = client, .buf = sb };
    sides[client] = c;
    sides[u] = s;
    gens[client] = gens[u] = next_gen++;
    arm_recv(client);
    arm_recv(u);
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: relay-uring PORT UNIX_SOCKET_PATH\n");
        return 2;
    }
    struct sockaddr_un up = { .sun_family = AF_UNIX };
    snprintf(up.sun_path, sizeof up.sun_path, "%s", argv[2]);
    struct io_uring_params params = { .flags = IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN };
    int rc = io_uring_queue_init_params(4096, &ring, &params);
    if (rc < 0) {
        fprintf(stderr, "relay-uring: io_uring: %s\n", strerror(-rc));
        return 3;
    }
    lfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    int one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons((uint16_t)atoi(argv[1])),
                             .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
    if (bind(lfd, (const void *)&a, sizeof a) != 0 || listen(lfd, 4096) != 0) {
        perror("relay-uring: listen");
        return 1;
    }
    arm_accept();
    for (;;) {
        rc = io_uring_submit_and_wait(&ring, 1);
        if (rc < 0 && rc != -EINTR) {
            fprintf(stderr, "relay-uring: io_uring_enter: %s\n", strerror(-rc));
            return 1;
        }
        struct io_uring_cqe *cqe;
        unsigned head, seen = 0;
        io_uring_for_each_cqe(&ring, head, cqe) {
            seen++;
            int fd = (int)(cqe->user_data >> 8 & 0xffff), op = (int)(cqe->user_data & 0xff);
            if (op != OP_ACCEPT && (cqe->user_data >> 24 != gens[fd] || !sides[fd])) continue; /* a dropped pair's */
            if (op == OP_ACCEPT) {
                if (!(cqe->flags & IORING_CQE_F_MORE)) arm_accept();
                if (cqe->res >= 0) pair_up(cqe->res, &up);
            } else if (op == OP_RECV) {
                if (cqe->res > 0) forward(fd, (unsigned)cqe->res);
                else drop(fd); /* end of file, an error, or cancelled behind a failed send */
            } else {
                drop(fd); /* only a failed send posts a completion */
            }
        }
        io_uring_cq_advance(&ring, seen);
    }
}
