/* stall-probe: sleeps 1 ms at a time on one CPU until SIGTERM, then prints
 * how often a sleep ended late and by how much. Run beside a measurement, it
 * tells how often the machine itself stopped this CPU for milliseconds (a
 * busy host preempting the VM, say): a latency tail no program on it can
 * remove. Nothing else runs on its CPU's behalf, so what it sees is the
 * machine's, not a peer's. */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

static volatile sig_atomic_t stop;

static void on_term(int sig) {
    (void)sig;
    stop = 1;
}

static double now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec * 1e3 + (double)t.tv_nsec / 1e6;
}

int main(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_term; /* no SA_RESTART: the sleep under way ends at once */
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    const struct timespec period = { 0, 1000000 };
    long sleeps = 0, over1 = 0, over2 = 0, over5 = 0, over10 = 0;
    double worst = 0, t_start = now_ms();
    while (!stop) {
        double t0 = now_ms();
        if (nanosleep(&period, NULL) != 0 && errno == EINTR) break;
        double late = now_ms() - t0 - 1.0;
        sleeps++;
        if (late > worst) worst = late;
        over1 += late > 1;
        over2 += late > 2;
        over5 += late > 5;
        over10 += late > 10;
    }
    printf("seconds %.2f sleeps %ld over_1ms %ld over_2ms %ld over_5ms %ld over_10ms %ld max_ms %.2f\n",
           (now_ms() - t_start) / 1e3, sleeps, over1, over2, over5, over10, worst);
    return 0;
}
