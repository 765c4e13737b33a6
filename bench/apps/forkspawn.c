/*
 * forkspawn MB N PATH: the reference the spawn benchmark compares against.
 * Holds MB MiB of touched memory, then runs PATH N times with a plain fork()
 * + execve() + waitpid(), and prints the p50 and p99 of each start-to-reaped
 * time in microseconds: "p50_us P p99_us Q". A plain fork copies the page
 * tables of the whole parent, so it slows down as the parent grows; a
 * CLONE_VFORK spawn (what tenement does) does not.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double now_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e6 + ts.tv_nsec / 1e3;
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

int main(int argc, char **argv) {
    if (argc < 4) { fprintf(stderr, "usage: forkspawn MB N PATH\n"); return 2; }
    size_t mb = strtoul(argv[1], NULL, 10);
    int n = atoi(argv[2]);
    if (n < 1) n = 1;
    char *hog = NULL;
    if (mb) {
        hog = malloc(mb << 20);
        if (!hog) { perror("malloc"); return 1; }
        memset(hog, 1, mb << 20);
    }
    double *t = calloc((size_t)n, sizeof *t);
    char *args[] = { argv[3], NULL };
    char *envp[] = { NULL };
    for (int i = 0; i < n; i++) {
        double t0 = now_us();
        pid_t pid = fork();
        if (pid == 0) { execve(argv[3], args, envp); _exit(127); }
        if (pid < 0) { perror("fork"); return 1; }
        int st;
        waitpid(pid, &st, 0);
        t[i] = now_us() - t0;
    }
    qsort(t, (size_t)n, sizeof *t, cmp);
    printf("p50_us %.0f p99_us %.0f\n", t[(n - 1) / 2], t[(n * 99 + 99) / 100 - 1]);
    return hog ? 0 : 0;
}
