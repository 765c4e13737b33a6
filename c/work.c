/*
 * Work off the loop thread (tn_work_queue, see tn.h): a thread pool whose
 * threads leave after WORK_IDLE_MS without work.
 *
 * Why not libuv's pool: its threads, once the first database operation has
 * started them, live as long as the process, and while a process has more
 * than one thread its file table is shared, so the kernel takes and drops a
 * reference on the file in every system call on a descriptor (fdget: the
 * light path is only for a table nobody else uses). That is about 65 ns a
 * call on the machines measured, and a proxied request makes four or five
 * such calls: a server at work on HTTP and idle on SQLite should not pay it.
 *
 * Completions come back to the loop through one uv_async per loop, which is
 * referenced only while work is out, as libuv's own requests keep a loop
 * alive. Workers block every signal: they stay with the loop thread, as
 * under libuv's pool. Where no thread can be started at all (the process or
 * its cgroup at its limit of tasks), the work runs on the loop thread
 * instead, which blocks the loop for its length but loses nothing: done
 * still comes later, from the loop, as callers rely on.
 */
#include "tn.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <signal.h>
#include <stdlib.h>
#include <time.h>

#define WORK_THREADS 4
#define WORK_IDLE_MS 2000

struct work_loop {
    work_loop *next;
    uv_loop_t *loop;
    uv_async_t async;
    tn_work *done_head, *done_tail; /* under mu */
    int out;                        /* queued and not yet called back (loop thread) */
};

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t wake;
static pthread_once_t wake_once = PTHREAD_ONCE_INIT;
static tn_work *todo_head, *todo_tail; /* under mu */
static int ntodo, nthreads, nidle;     /* under mu */
static work_loop *loops;               /* loop threads only */

static void wake_init(void) {
    pthread_condattr_t a;
    pthread_condattr_init(&a);
    pthread_condattr_setclock(&a, CLOCK_MONOTONIC);
    pthread_cond_init(&wake, &a);
    pthread_condattr_destroy(&a);
}

/* Under mu: w goes back to its loop. */
static void work_finished(tn_work *w) {
    work_loop *wl = w->wl;
    w->next = NULL;
    if (wl->done_tail) wl->done_tail->next = w;
    else wl->done_head = w;
    wl->done_tail = w;
    uv_async_send(&wl->async);
}

static void *work_thread(void *arg) {
    (void)arg;
    pthread_mutex_lock(&mu);
    for (;;) {
        while (!todo_head) {
            struct timespec until;
            clock_gettime(CLOCK_MONOTONIC, &until);
            until.tv_sec += WORK_IDLE_MS / 1000;
            until.tv_nsec += (long)(WORK_IDLE_MS % 1000) * 1000000;
            if (until.tv_nsec >= 1000000000) { until.tv_sec++; until.tv_nsec -= 1000000000; }
            nidle++;
            int rc = pthread_cond_timedwait(&wake, &mu, &until);
            nidle--;
            if (rc == ETIMEDOUT && !todo_head) {
                nthreads--;
                pthread_mutex_unlock(&mu);
                return NULL;
            }
        }
        tn_work *w = todo_head;
        todo_head = w->next;
        if (!todo_head) todo_tail = NULL;
        ntodo--;
        pthread_mutex_unlock(&mu);
        w->work(w);
        pthread_mutex_lock(&mu);
        work_finished(w);
    }
}

static int work_thread_start(void) {
    pthread_attr_t attr;
    sigset_t all, old;
    pthread_t t;
    int rc = pthread_attr_init(&attr);
    if (rc) return rc;
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    rc = pthread_create(&t, &attr, work_thread, NULL);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    pthread_attr_destroy(&attr);
    return rc;
}

static void work_done(uv_async_t *a) {
    work_loop *wl = a->data;
    pthread_mutex_lock(&mu);
    tn_work *w = wl->done_head;
    wl->done_head = wl->done_tail = NULL;
    pthread_mutex_unlock(&mu);
    while (w) {
        tn_work *next = w->next; /* done may free w, or queue it again */
        if (--wl->out == 0) uv_unref((uv_handle_t *)&wl->async);
        w->done(w);
        w = next;
    }
}

static work_loop *work_loop_of(uv_loop_t *loop) {
    for (work_loop *wl = loops; wl; wl = wl->next)
        if (wl->loop == loop) return wl;
    return NULL;
}

int tn_work_init(uv_loop_t *loop) {
    pthread_once(&wake_once, wake_init);
    if (work_loop_of(loop)) return 0;
    work_loop *wl = calloc(1, sizeof *wl);
    if (!wl) return UV_ENOMEM;
    int rc = uv_async_init(loop, &wl->async, work_done);
    if (rc != 0) {
        free(wl);
        return rc;
    }
    uv_unref((uv_handle_t *)&wl->async);
    wl->async.data = wl;
    wl->loop = loop;
    wl->next = loops;
    loops = wl;
    return 0;
}

void tn_work_queue(uv_loop_t *loop, tn_work *w, tn_work_cb work, tn_work_cb done) {
    work_loop *wl = work_loop_of(loop);
    if (!wl) {
        fprintf(stderr, "tn_work_queue: a loop without tn_work_init\n");
        abort();
    }
    w->wl = wl;
    w->work = work;
    w->done = done;
    w->next = NULL;
    if (wl->out++ == 0) uv_ref((uv_handle_t *)&wl->async);
    pthread_mutex_lock(&mu);
    /* a thread more when this item would wait for one, up to the cap */
    if (ntodo + 1 > nidle && nthreads < WORK_THREADS) {
        if (work_thread_start() == 0) {
            nthreads++;
        } else if (nthreads == 0) {
            pthread_mutex_unlock(&mu);
            work(w);
            pthread_mutex_lock(&mu);
            work_finished(w);
            pthread_mutex_unlock(&mu);
            return;
        }
    }
    if (todo_tail) todo_tail->next = w;
    else todo_head = w;
    todo_tail = w;
    ntodo++;
    if (nidle) pthread_cond_signal(&wake);
    pthread_mutex_unlock(&mu);
}
