/*
 * forkspawn MB N PATH: the reference the spawn benchmark compares against.
 * Holds MB MiB of touched memory, then runs PATH (static-stamp, which writes
 * the CLOCK_MONOTONIC time its main began to stdout) N times with a plain
 * fork() + execve() + waitpid(), and prints the p50 and p99 in microseconds
 * of start to the child's main and of start to the child reaped:
 * "main_p50_us A main_p99_us B p50_us P p99_us Q". A plain fork copies the page
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
    double *t = calloc((size_t)n, sizeof *t), *m = calloc((size_t)n, sizeof *m);
    char *args[] = { argv[3], NULL };
    char *envp[] = { NULL };
    for (int i = 0; i < n; i++) {
        int out[2];
        if (pipe(out) != 0) { perror("pipe"); return 1; }
        double t0 = now_us();
        pid_t pid = fork();
        if (pid == 0) { dup2(out[1], 1); execve(argv[3], args, envp); _exit(127); }
        if (pid < 0) { perror("fork"); return 1; }
        int st;
        waitpid(pid, &st, 0);
        t[i] = now_us() - t0;
        close(out[1]);
        char line[32] = {0};
        ssize_t got = read(out[0], line, sizeof line - 1);
        close(out[0]);
        if (got <= 0 || !WIFEXITED(st) || WEXITSTATUS(st) != 0) { fprintf(stderr, "forkspawn: %s failed\n", argv[3]); return 1; }
        m[i] = strtoll(line, NULL, 10) / 1e3 - t0;
    }
    qsort(t, (size_t)n, sizeof *t, cmp);
    qsort(m, (size_t)n, sizeof *m, cmp);
    size_t p50 = (size_t)(n - 1) / 2, p99 = (size_t)(n * 99 + 99) / 100 - 1;
    printf("main_p50_us %.0f main_p99_us %.0f p50_us %.0f p99_us %.0f\n", m[p50], m[p99], t[p50], t[p99]);
    free(hog);
    return 0;
}
