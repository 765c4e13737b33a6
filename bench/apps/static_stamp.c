/* static-stamp: the child of the spawn benchmark. Statically linked, so no
 * dynamic loading is counted; it writes the CLOCK_MONOTONIC time at which its
 * main began (nanoseconds, decimal) to stdout and exits 0. The benchmark
 * takes that time as "the app runs": CLOCK_MONOTONIC is one clock for the
 * whole machine, PID namespaces included (no time namespace is used). */
#include <stdio.h>
#include <time.h>
#include <unistd.h>

int main(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    char line[32];
    int n = snprintf(line, sizeof line, "%lld\n", (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec);
    return write(1, line, (size_t)n) == n ? 0 : 1;
}
