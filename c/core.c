/*
 * The scheduler: Lua tasks (coroutines) driven by one libuv loop.
 *
 * A task is a coroutine started by core.spawn. When it calls an operation
 * that waits, the C function starts the libuv request and yields; the
 * request's callback resumes the coroutine with the results. Lua code stays
 * straight-line and nothing blocks the loop.
 *
 * Lifetime: a tn_task is plain heap memory with a reference count. Holders
 * are the task's Lua handle (released by __gc), the task being alive (released
 * when it ends), and each operation in flight (tn_task_hold/release). The
 * embedded timer is closed on the last release and the memory freed in its
 * close callback, the only place libuv allows it.
 */
#include "tn.h"

#include <dlfcn.h>
#include <errno.h>
#include <stdint.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

enum task_state { TASK_READY, TASK_RUNNING, TASK_WAITING, TASK_DONE, TASK_FAILED };

struct tn_task {
    struct tn_ctx *ctx;
    lua_State *co;
    int co_ref;          /* the coroutine, while the task is alive */
    int ud_ref;          /* the task's Lua handle, while the task is alive */
    int result_ref;      /* results table or error object, once ended */
    int joiners_ref;     /* table of tasks waiting in join, or LUA_NOREF */
    int refs;
    enum task_state state;
    int nresume;         /* values on co's stack for the next resume */
    uint64_t seq;        /* number of the current (or next) wait */
    int parked;          /* waiting in core.park or join: core.wake may resume it */
    int wakeable;        /* in a wait core.wake may cut short (cancel first) */
    int wait_keep;       /* slots of co's stack a wake leaves to the waiting
                          * function (join's task handle, which keeps the
                          * joined task alive until join_cont reads it) */
    tn_cancel_fn cancel;
    void *cancel_arg;
    int timer_active;
    int timer_ready;     /* the timer is initialised only when a wait needs it */
    uv_timer_t timer;    /* waits with a timeout, and sleep */
    struct tn_task *next_ready;
};

typedef struct tn_ctx {
    lua_State *L;        /* the main thread */
    uv_loop_t loop;
    uv_idle_t ready_idle; /* keeps the loop spinning while tasks are ready */
    tn_task *ready_head, *ready_tail;
    int error_handler_ref;
    int closing;
    int live_tasks;
    tn_task *main_task;  /* the task core.run waits for */
    /* Coroutines of tasks that ended well, kept for the next core.spawn:
     * a server spawns a task per request, and a fresh coroutine each time
     * is most of what a request costs Lua (allocation, then collection). */
    int spare[64];
    int nspare;
} tn_ctx;

static char ctx_key;
static char tasks_key;

static void ready_run(uv_idle_t *h);

static int ctx_gc(lua_State *L) {
    tn_ctx **box = lua_touserdata(L, 1);
    tn_ctx *ctx = *box;
    if (!ctx) return 0;
    /* The state is going away: nothing may call back into it. Close what is
     * still open and let libuv finish; memory of tasks still held by pending
     * operations is reclaimed by the process exit, never touched again. */
    ctx->closing = 1;
    return 0;
}

static tn_ctx *ctx_get(lua_State *L) {
    tn_ctx *ctx;
    lua_rawgetp(L, LUA_REGISTRYINDEX, &ctx_key);
    ctx = lua_isuserdata(L, -1) ? *(tn_ctx **)lua_touserdata(L, -1) : NULL;
    lua_pop(L, 1);
    if (ctx) return ctx;

    ctx = calloc(1, sizeof *ctx);
    if (!ctx) luaL_error(L, "out of memory");
    int rc = uv_loop_init(&ctx->loop);
    if (rc) { free(ctx); luaL_error(L, "uv_loop_init: %s", uv_strerror(rc)); }
    rc = tn_work_init(&ctx->loop);
    if (rc) {
        uv_loop_close(&ctx->loop);
        free(ctx);
        luaL_error(L, "the loop's work pool: %s", uv_strerror(rc));
    }
    lua_rawgeti(L, LUA_REGISTRYINDEX, LUA_RIDX_MAINTHREAD);
    ctx->L = lua_tothread(L, -1);
    lua_pop(L, 1);
    uv_idle_init(&ctx->loop, &ctx->ready_idle);
    ctx->ready_idle.data = ctx;
    ctx->error_handler_ref = LUA_NOREF;
    lua_newtable(L);
    lua_rawsetp(L, LUA_REGISTRYINDEX, &tasks_key);

    tn_ctx **box = lua_newuserdatauv(L, sizeof *box, 0);
    *box = ctx;
    lua_newtable(L);
    lua_pushcfunction(L, ctx_gc);
    lua_setfield(L, -2, "__gc");
    lua_setmetatable(L, -2);
    lua_rawsetp(L, LUA_REGISTRYINDEX, &ctx_key);
    return ctx;
}

uv_loop_t *tn_loop(lua_State *L) { return &ctx_get(L)->loop; }

/* ---- errors ------------------------------------------------------------ */

int tn_fail(lua_State *L, const char *fmt, ...) {
    va_list ap;
    lua_pushnil(L);
    va_start(ap, fmt);
    lua_pushvfstring(L, fmt, ap);
    va_end(ap);
    return 2;
}

int tn_fail_uv(lua_State *L, const char *what, int uv_err) {
    tn_fail(L, "%s: %s: %s", what, uv_err_name(uv_err), uv_strerror(uv_err));
    lua_pushstring(L, uv_err_name(uv_err));
    return 3;
}

int tn_fail_errno(lua_State *L, const char *what, int err) {
    return tn_fail_uv(L, what, uv_translate_sys_error(err));
}

void tn_new_class(lua_State *L, const char *name, const luaL_Reg *methods) {
    luaL_newmetatable(L, name);
    luaL_setfuncs(L, methods, 0);
    lua_pushvalue(L, -1);
    lua_setfield(L, -2, "__index");
    lua_pop(L, 1);
}

/* ---- task memory ------------------------------------------------------- */

static void task_free_cb(uv_handle_t *h) { free(h->data); }

tn_task *tn_task_hold(tn_task *t) { t->refs++; return t; }

void tn_task_release(tn_task *t) {
    if (--t->refs > 0) return;
    if (t->ctx->closing) return; /* the loop is being torn down: leave it */
    if (t->timer_ready) uv_close((uv_handle_t *)&t->timer, task_free_cb);
    else free(t);
}

#define TASK_MT "tenement.task"

typedef struct { tn_task *t; } task_box;

/* Which coroutine is which task: a registry table thread -> tn_task*.
 * (Not lua_getextraspace: coroutines created before this module was loaded
 * carry an uninitialised copy of the main thread's area.) */

static void task_map_set(lua_State *L, lua_State *co, tn_task *t) {
    lua_rawgetp(L, LUA_REGISTRYINDEX, &tasks_key);
    lua_pushthread(co);
    lua_xmove(co, L, 1);
    if (t) lua_pushlightuserdata(L, t);
    else lua_pushnil(L);
    lua_rawset(L, -3);
    lua_pop(L, 1);
}

tn_task *tn_task_current(lua_State *L) {
    lua_rawgetp(L, LUA_REGISTRYINDEX, &tasks_key);
    if (!lua_istable(L, -1)) { lua_pop(L, 1); return NULL; }
    lua_pushthread(L);
    lua_rawget(L, -2);
    tn_task *t = lua_touserdata(L, -1);
    lua_pop(L, 2);
    return t;
}

tn_task *tn_task_check(lua_State *L) {
    tn_task *t = tn_task_current(L);
    if (!t)
        luaL_error(L, "this operation waits, so it must run inside a task "
                      "(core.spawn or core.run), not in a plain coroutine or the main chunk");
    return t;
}

lua_State *tn_task_thread(tn_task *t) { return t->co; }
uint64_t tn_task_seq(tn_task *t) { return t->seq; }
int tn_task_waiting_for(tn_task *t, uint64_t seq) {
    return t->state == TASK_WAITING && t->seq == seq;
}

/* Most tasks (one per request) never wait with a timeout: their timer is
 * set up on first use, so a task costs no libuv handle until it needs one. */
static void task_timer_start(tn_task *t, uv_timer_cb cb, uint64_t ms) {
    if (!t->timer_ready) {
        uv_timer_init(&t->ctx->loop, &t->timer);
        t->timer.data = t;
        t->timer_ready = 1;
    }
    uv_timer_start(&t->timer, cb, ms, 0);
    t->timer_active = 1;
}

/* ---- the ready queue --------------------------------------------------- */

static void ready_push(tn_task *t) {
    tn_ctx *ctx = t->ctx;
    t->state = TASK_READY;
    t->next_ready = NULL;
    if (ctx->ready_tail) ctx->ready_tail->next_ready = t;
    else ctx->ready_head = t;
    ctx->ready_tail = t;
    tn_task_hold(t);
    if (!uv_is_active((uv_handle_t *)&ctx->ready_idle))
        uv_idle_start(&ctx->ready_idle, ready_run);
}

static void task_step(tn_task *t);

static void ready_run(uv_idle_t *h) {
    tn_ctx *ctx = h->data;
    /* Only what was ready when this turn began, so a task that yields in a
     * loop cannot starve I/O. */
    tn_task *last = ctx->ready_tail;
    while (ctx->ready_head) {
        tn_task *t = ctx->ready_head;
        ctx->ready_head = t->next_ready;
        if (!ctx->ready_head) ctx->ready_tail = NULL;
        if (t->state == TASK_READY) task_step(t);
        tn_task_release(t);
        if (t == last) break;
    }
    if (!ctx->ready_head) uv_idle_stop(&ctx->ready_idle);
}

/* ---- running a task ---------------------------------------------------- */

static void report_error(tn_ctx *ctx, tn_task *t, const char *trace) {
    lua_State *L = ctx->L;
    if (ctx->error_handler_ref != LUA_NOREF) {
        lua_rawgeti(L, LUA_REGISTRYINDEX, ctx->error_handler_ref);
        lua_pushstring(L, trace);
        lua_rawgeti(L, LUA_REGISTRYINDEX, t->ud_ref);
        if (lua_pcall(L, 2, 0, 0) == LUA_OK) return;
        fprintf(stderr, "ten: error handler failed: %s\n", lua_tostring(L, -1));
        lua_pop(L, 1);
    }
    fprintf(stderr, "ten: task failed: %s\n", trace);
}

static void wake_joiners(tn_task *t) {
    lua_State *L = t->ctx->L;
    if (t->joiners_ref == LUA_NOREF) return;
    lua_rawgeti(L, LUA_REGISTRYINDEX, t->joiners_ref);
    luaL_unref(L, LUA_REGISTRYINDEX, t->joiners_ref);
    t->joiners_ref = LUA_NOREF;
    lua_Integer n = luaL_len(L, -1);
    /* entries are pairs: the joining task, and the number of its wait */
    for (lua_Integer i = 1; i + 1 <= n; i += 2) {
        lua_rawgeti(L, -1, i);
        task_box *b = luaL_checkudata(L, -1, TASK_MT);
        lua_rawgeti(L, -2, i + 1);
        uint64_t seq = (uint64_t)lua_tointeger(L, -1);
        lua_pop(L, 2);
        tn_task *j = b->t;
        if (j && j->parked && tn_task_waiting_for(j, seq)) {
            j->seq++;
            if (j->timer_active) { uv_timer_stop(&j->timer); j->timer_active = 0; }
            j->nresume = 0;
            ready_push(j);
        }
    }
    lua_pop(L, 1);
}

static void task_end(tn_task *t, int failed) {
    tn_ctx *ctx = t->ctx;
    lua_State *L = ctx->L;
    lua_State *co = t->co;
    t->state = failed ? TASK_FAILED : TASK_DONE;
    if (failed) {
        /* Keep the error object itself (busted's assertion errors are tables)
         * and, beside it, a printable form with the coroutine's traceback. */
        lua_createtable(L, 2, 0);
        lua_pushvalue(co, -1);
        lua_xmove(co, L, 1);
        const char *msg = luaL_tolstring(L, -1, NULL);
        luaL_traceback(L, co, msg, 0);
        lua_rawseti(L, -4, 2);
        lua_pop(L, 1);
        lua_rawseti(L, -2, 1);
        t->result_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    } else {
        int n = lua_gettop(co);
        lua_createtable(L, n, 1);
        for (int i = n; i >= 1; i--) {
            lua_xmove(co, L, 1);
            lua_rawseti(L, -2, i);
        }
        lua_pushinteger(L, n);
        lua_setfield(L, -2, "n");
        t->result_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    }
    task_map_set(L, co, NULL);
    /* Run the coroutine's pending <close> variables and free its stack. */
    int reset = lua_resetthread(co);
    if (!failed && reset == LUA_OK && lua_gettop(co) == 0 &&
        ctx->nspare < (int)(sizeof ctx->spare / sizeof ctx->spare[0]))
        ctx->spare[ctx->nspare++] = t->co_ref;
    else
        luaL_unref(L, LUA_REGISTRYINDEX, t->co_ref);
    t->co_ref = LUA_NOREF;
    t->co = NULL;
    ctx->live_tasks--;
    wake_joiners(t);
    if (failed) {
        lua_rawgeti(L, LUA_REGISTRYINDEX, t->result_ref);
        lua_rawgeti(L, -1, 2);
        const char *trace = lua_tostring(L, -1);
        if (ctx->main_task != t) report_error(ctx, t, trace ? trace : "(error object)");
        lua_pop(L, 2);
    }
    if (ctx->main_task == t) tn_io_stop(&ctx->loop);
    luaL_unref(L, LUA_REGISTRYINDEX, t->ud_ref);
    t->ud_ref = LUA_NOREF;
    tn_task_release(t); /* alive */
}

static void task_step(tn_task *t) {
    lua_State *co = t->co;
    int nres = 0;
    int nargs = t->nresume;
    t->nresume = 0;
    t->state = TASK_RUNNING;
    t->cancel = NULL;
    t->parked = 0;
    t->wakeable = 0;
    t->wait_keep = 0;
    tn_task_hold(t);
    int st = lua_resume(co, t->ctx->L, nargs, &nres);
    if (st == LUA_YIELD) {
        if (t->state == TASK_RUNNING) {
            /* A bare coroutine.yield() in a task: give others a turn. */
            lua_pop(co, nres);
            ready_push(t);
        }
        /* else tn_task_wait set TASK_WAITING */
    } else if (st == LUA_OK) {
        task_end(t, 0);
    } else {
        task_end(t, 1);
    }
    tn_task_release(t);
}

void tn_task_resume(tn_task *t, int nresults) {
    if (t->timer_active) { uv_timer_stop(&t->timer); t->timer_active = 0; }
    t->seq++;
    t->nresume = nresults;
    task_step(t);
}

/* The end of a timer (wait_timeout, sleep_done) makes its task ready,
 * behind the tasks that are ready already, rather than running it from the
 * callback. libuv runs timers before anything else in a turn: a task
 * resumed there would overtake tasks that were ready before its sleep began
 * (spawn a task, sleep 1 ms: after a stall of a millisecond the sleeper woke
 * first, and found the new task not yet started), and one that starts
 * another timer of 0 (sleep(0), park(0) in a polling loop) would find it due
 * within the same timer phase and run again at once, starving ready tasks
 * and I/O. The ready queue runs in the same turn, so this costs no
 * latency. */
static void task_wake(tn_task *t, int n);

static void wait_timeout(uv_timer_t *h) {
    tn_task *t = h->data;
    t->timer_active = 0;
    if (t->state != TASK_WAITING) return;
    if (t->cancel) t->cancel(t->cancel_arg);
    t->cancel = NULL;
    lua_State *co = t->co;
    lua_pushnil(co);
    lua_pushliteral(co, "timeout");
    task_wake(t, 2);
}

int tn_task_wait_cancel(lua_State *L, tn_task *t, int64_t timeout_ms,
                        tn_cancel_fn cancel, void *arg) {
    if (t->co != L) luaL_error(L, "internal: wait on a task from another coroutine");
    t->state = TASK_WAITING;
    t->cancel = cancel;
    t->cancel_arg = arg;
    if (timeout_ms >= 0) {
        task_timer_start(t, wait_timeout, (uint64_t)timeout_ms);
    }
    return lua_yield(L, 0);
}

int tn_task_wait(lua_State *L, tn_task *t, int64_t timeout_ms) {
    return tn_task_wait_cancel(L, t, timeout_ms, NULL, NULL);
}

int tn_task_wait_wakeable(lua_State *L, tn_task *t, int64_t timeout_ms,
                          tn_cancel_fn cancel, void *arg) {
    t->wakeable = 1;
    return tn_task_wait_cancel(L, t, timeout_ms, cancel, arg);
}

static int task_can_wake(tn_task *t) {
    return t->state == TASK_WAITING && (t->parked || t->wakeable);
}

/* Ends the wait with the n values already on t's stack. Never runs the task
 * synchronously, so the waker keeps its own invariants. */
static void task_wake(tn_task *t, int n) {
    if (t->timer_active) { uv_timer_stop(&t->timer); t->timer_active = 0; }
    if (t->cancel) t->cancel(t->cancel_arg);
    t->cancel = NULL;
    t->seq++;
    t->nresume = n;
    ready_push(t);
}

void tn_task_resume_later(tn_task *t, int nresults) {
    task_wake(t, nresults);
}

int tn_task_wake(tn_task *t) {
    if (!task_can_wake(t)) return 0;
    lua_settop(t->co, t->wait_keep);
    task_wake(t, 0);
    return 1;
}

/* ---- Lua API ----------------------------------------------------------- */

static tn_task *check_task(lua_State *L, int idx) {
    return ((task_box *)luaL_checkudata(L, idx, TASK_MT))->t;
}

tn_task *tn_task_arg(lua_State *L, int idx) { return check_task(L, idx); }

static int task_gc(lua_State *L) {
    task_box *b = luaL_checkudata(L, 1, TASK_MT);
    if (b->t) {
        tn_task *t = b->t;
        b->t = NULL;
        if (t->result_ref != LUA_NOREF && !t->ctx->closing) {
            luaL_unref(L, LUA_REGISTRYINDEX, t->result_ref);
            t->result_ref = LUA_NOREF;
        }
        tn_task_release(t);
    }
    return 0;
}

/* core.spawn(fn, ...) -> task. The task starts on the next loop turn. */
static int l_spawn(lua_State *L) {
    tn_ctx *ctx = ctx_get(L);
    luaL_checktype(L, 1, LUA_TFUNCTION);
    int nargs = lua_gettop(L) - 1;

    tn_task *t = calloc(1, sizeof *t);
    if (!t) return luaL_error(L, "out of memory");
    t->ctx = ctx;
    t->refs = 2; /* the Lua handle, and being alive */
    t->result_ref = t->joiners_ref = LUA_NOREF;

    task_box *b = lua_newuserdatauv(L, sizeof *b, 0);
    b->t = t;
    luaL_setmetatable(L, TASK_MT);
    lua_pushvalue(L, -1);
    t->ud_ref = luaL_ref(L, LUA_REGISTRYINDEX);

    lua_State *co;
    if (ctx->nspare > 0) {
        t->co_ref = ctx->spare[--ctx->nspare];
        lua_rawgeti(L, LUA_REGISTRYINDEX, t->co_ref);
        co = lua_tothread(L, -1);
        lua_pop(L, 1);
    } else {
        co = lua_newthread(L);
        t->co_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    }
    t->co = co;
    task_map_set(L, co, t);
    for (int i = 1; i <= nargs + 1; i++) lua_pushvalue(L, i);
    lua_xmove(L, co, nargs + 1);
    t->nresume = nargs;
    ctx->live_tasks++;
    ready_push(t);
    return 1; /* the task handle */
}

/* Hand a task's end to Lua: true, results... | nil, error */
static int push_outcome(lua_State *L, tn_task *t) {
    lua_rawgeti(L, LUA_REGISTRYINDEX, t->result_ref);
    if (t->state == TASK_DONE) {
        lua_getfield(L, -1, "n");
        int n = (int)lua_tointeger(L, -1);
        lua_pop(L, 1);
        luaL_checkstack(L, n + 1, "too many results");
        lua_pushboolean(L, 1);
        for (int i = 1; i <= n; i++) lua_rawgeti(L, -1 - i, i);
        return n + 1;
    }
    lua_pushnil(L);
    lua_rawgeti(L, -2, 1);
    if (lua_isnil(L, -1)) { lua_pop(L, 1); lua_rawgeti(L, -2, 2); }
    return 2;
}

/* Take me off t's joiners: a join that timed out or was woken is over, and
 * its entry would otherwise stay until t ends, one more per call for a task
 * that polls a long-lived one with join(timeout). */
static void joiners_forget(lua_State *L, tn_task *t, tn_task *me) {
    if (t->joiners_ref == LUA_NOREF) return;
    lua_rawgeti(L, LUA_REGISTRYINDEX, t->joiners_ref);
    lua_Integer n = luaL_len(L, -1), kept = 0;
    for (lua_Integer i = 1; i + 1 <= n; i += 2) {
        lua_rawgeti(L, -1, i);
        task_box *b = luaL_testudata(L, -1, TASK_MT);
        if (b && b->t == me) { lua_pop(L, 1); continue; }
        lua_rawseti(L, -2, ++kept);
        lua_rawgeti(L, -1, i + 1);
        lua_rawseti(L, -2, ++kept);
    }
    for (lua_Integer i = kept + 1; i <= n; i++) {
        lua_pushnil(L);
        lua_rawseti(L, -2, i);
    }
    lua_pop(L, 1);
}

static int join_cont(lua_State *L, int status, lua_KContext k) {
    (void)status;
    tn_task *t = (tn_task *)k;
    if (t->state != TASK_DONE && t->state != TASK_FAILED) {
        tn_task *me = tn_task_current(L);
        if (me) joiners_forget(L, t, me);
        /* resumed by the timeout: the stack holds nil, "timeout" */
        if (lua_gettop(L) >= 3 && lua_isnil(L, -2)) return 2;
        return tn_fail(L, "join: task still running");
    }
    lua_settop(L, 1);
    return push_outcome(L, t);
}

/* task:join([timeout_ms]) -> true, results... | nil, err */
static int l_task_join(lua_State *L) {
    tn_task *t = check_task(L, 1);
    lua_Integer timeout = luaL_optinteger(L, 2, -1);
    if (t->state == TASK_DONE || t->state == TASK_FAILED) return push_outcome(L, t);
    tn_task *me = tn_task_check(L);
    if (me == t) return luaL_error(L, "a task cannot join itself");
    tn_ctx *ctx = t->ctx;
    if (t->joiners_ref == LUA_NOREF) {
        lua_newtable(L);
        t->joiners_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    }
    lua_rawgeti(L, LUA_REGISTRYINDEX, t->joiners_ref);
    lua_Integer n = luaL_len(L, -1);
    lua_rawgeti(L, LUA_REGISTRYINDEX, me->ud_ref);
    lua_rawseti(L, -2, n + 1);
    lua_pushinteger(L, (lua_Integer)me->seq);
    lua_rawseti(L, -2, n + 2);
    lua_pop(L, 1);
    (void)ctx;
    me->state = TASK_WAITING;
    me->cancel = NULL;
    me->parked = 1;
    if (timeout >= 0) {
        task_timer_start(me, wait_timeout, (uint64_t)timeout);
    }
    /* keep the joined task's handle on the stack: it keeps t alive until
     * join_cont reads it */
    lua_settop(L, 1);
    me->wait_keep = 1;
    return lua_yieldk(L, 0, (lua_KContext)t, join_cont);
}

static int l_task_status(lua_State *L) {
    static const char *names[] = {"ready", "running", "waiting", "done", "failed"};
    lua_pushstring(L, names[check_task(L, 1)->state]);
    return 1;
}

static int l_task_tostring(lua_State *L) {
    tn_task *t = check_task(L, 1);
    lua_pushfstring(L, "tenement.task (%p)", (void *)t);
    return 1;
}

/* core.run([fn, ...]) runs the loop. With fn: until fn's task ends, then
 * returns its results or raises its error. Without: until no work is left. */
static int l_run(lua_State *L) {
    tn_ctx *ctx = ctx_get(L);
    if (tn_task_current(L)) return luaL_error(L, "core.run cannot be called from inside a task");
    if (ctx->main_task) return luaL_error(L, "core.run is already running");
    /* libuv's clock stood still since the last run: timers started now
     * must count from now, or a short one is due before tasks already
     * ready have run */
    uv_update_time(&ctx->loop);
    if (lua_isnoneornil(L, 1)) {
        tn_io_run(&ctx->loop);
        return 0;
    }
    l_spawn(L);
    tn_task *t = check_task(L, -1);
    ctx->main_task = t;
    while (t->state != TASK_DONE && t->state != TASK_FAILED) {
        if (tn_io_run(&ctx->loop) == 0 &&
            t->state != TASK_DONE && t->state != TASK_FAILED) {
            ctx->main_task = NULL;
            return luaL_error(L, "core.run: the main task is waiting for something that "
                                 "can never happen (no timers, I/O or other tasks left)");
        }
    }
    ctx->main_task = NULL;
    int top = lua_gettop(L);
    int n = push_outcome(L, t);
    if (t->state == TASK_FAILED) {
        lua_rawgeti(L, LUA_REGISTRYINDEX, t->result_ref);
        lua_rawgeti(L, -1, 1);
        if (lua_type(L, -1) == LUA_TSTRING || lua_isnil(L, -1)) {
            lua_pop(L, 1);
            lua_rawgeti(L, -1, 2); /* the message with the task's traceback */
        }
        return lua_error(L);
    }
    return n - 1 > 0 ? (lua_remove(L, top + 1), n - 1) : 0;
}

static void sleep_done(uv_timer_t *h) {
    tn_task *t = h->data;
    t->timer_active = 0;
    if (t->state != TASK_WAITING) return;
    task_wake(t, 0);
}

/* core.sleep(ms): wait without holding up anything else. */
static int l_sleep(lua_State *L) {
    lua_Number ms = luaL_checknumber(L, 1);
    tn_task *t = tn_task_check(L);
    if (ms < 0) ms = 0;
    t->state = TASK_WAITING;
    t->cancel = NULL;
    task_timer_start(t, sleep_done, (uint64_t)ms);
    return lua_yield(L, 0);
}

/* core.park([timeout_ms]) waits until core.wake(task, ...) and returns the
 * values given to wake; nil, "timeout" when the timeout passes first. */
static int l_park(lua_State *L) {
    lua_Integer timeout = luaL_optinteger(L, 1, -1);
    tn_task *t = tn_task_check(L);
    lua_settop(L, 0);
    t->parked = 1;
    return tn_task_wait(L, t, timeout);
}

/* core.wake(task, ...) -> true if the task was parked or in a wakeable wait
 * (it resumes on the next turn with the values), false otherwise. Any other
 * operation in flight owns the task's resumption. */
static int l_wake(lua_State *L) {
    tn_task *t = check_task(L, 1);
    int n = lua_gettop(L) - 1;
    if (!task_can_wake(t)) {
        lua_pushboolean(L, 0);
        return 1;
    }
    lua_State *co = t->co;
    lua_settop(co, t->wait_keep);
    luaL_checkstack(co, n, "too many values");
    for (int i = 2; i <= n + 1; i++) lua_pushvalue(L, i);
    lua_xmove(L, co, n);
    task_wake(t, n);
    lua_pushboolean(L, 1);
    return 1;
}

static int l_current(lua_State *L) {
    tn_task *t = tn_task_current(L);
    if (!t) { lua_pushnil(L); return 1; }
    lua_rawgeti(L, LUA_REGISTRYINDEX, t->ud_ref);
    return 1;
}

/* core.now() -> the loop's clock in ms (monotonic, cached per loop turn). */
static int l_now(lua_State *L) {
    lua_pushinteger(L, (lua_Integer)uv_now(tn_loop(L)));
    return 1;
}

/* core.hrtime() -> monotonic nanoseconds, for measuring. */
static int l_hrtime(lua_State *L) {
    lua_pushinteger(L, (lua_Integer)uv_hrtime());
    return 1;
}

/* core.time() -> wall-clock seconds since the epoch, with a fraction. */
static int l_time(lua_State *L) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    lua_pushnumber(L, (lua_Number)ts.tv_sec + (lua_Number)ts.tv_nsec / 1e9);
    return 1;
}

/* core.on_error(fn(trace, task)): where failures of unjoined tasks go
 * (default: stderr). */
static int l_on_error(lua_State *L) {
    tn_ctx *ctx = ctx_get(L);
    if (!lua_isnil(L, 1)) luaL_checktype(L, 1, LUA_TFUNCTION);
    luaL_unref(L, LUA_REGISTRYINDEX, ctx->error_handler_ref);
    lua_settop(L, 1);
    ctx->error_handler_ref = lua_isnil(L, 1) ? LUA_NOREF : luaL_ref(L, LUA_REGISTRYINDEX);
    return 0;
}

/* core.tasks() -> number of tasks alive (for leak checks in specs). */
static int l_tasks(lua_State *L) {
    lua_pushinteger(L, ctx_get(L)->live_tasks);
    return 1;
}

/* ---- signals ----------------------------------------------------------- */

#define SIGNAL_MT "tenement.signal"

typedef struct {
    uv_signal_t h;
    tn_task *waiter;
    uint64_t seq;
    int pending;      /* deliveries nobody waited for yet */
    int closed;
    int signum;
} sig_watch;

/* Shared by proc (kill) and here: a signal given as a number or a name,
 * "SIGTERM" or "TERM" (glibc's own table, so every signal has its name). */
int tn_check_signal(lua_State *L, int idx) {
    if (lua_type(L, idx) == LUA_TNUMBER) {
        lua_Integer n = luaL_checkinteger(L, idx);
        if (n < 0 || n >= NSIG) luaL_argerror(L, idx, "not a signal number"); /* 0: a probe */
        return (int)n;
    }
    const char *s = luaL_checkstring(L, idx);
    const char *bare = strncmp(s, "SIG", 3) == 0 ? s + 3 : s;
    for (int n = 1; n < NSIG; n++) {
        const char *abbrev = sigabbrev_np(n);
        if (abbrev && strcmp(abbrev, bare) == 0) return n;
    }
    return luaL_argerror(L, idx, lua_pushfstring(L, "unknown signal '%s'", s));
}

static void sig_cb(uv_signal_t *h, int signum) {
    (void)signum;
    sig_watch *w = h->data;
    if (w->waiter && tn_task_waiting_for(w->waiter, w->seq)) {
        tn_task *t = w->waiter;
        w->waiter = NULL;
        lua_pushinteger(tn_task_thread(t), w->signum);
        tn_task_resume(t, 1);
        tn_task_release(t);
        return;
    }
    w->pending++;
}

static void sig_close_cb(uv_handle_t *h) { free(h->data); }

static void sig_close(sig_watch *w) {
    if (w->closed) return;
    w->closed = 1;
    uv_close((uv_handle_t *)&w->h, sig_close_cb);
}

typedef struct { sig_watch *w; } sig_box;

static sig_watch *check_sig(lua_State *L) {
    sig_box *b = luaL_checkudata(L, 1, SIGNAL_MT);
    if (!b->w) luaL_error(L, "signal watcher is closed");
    return b->w;
}

/* core.signal(name_or_number) -> watcher; watcher:wait([timeout]) -> signum */
static int l_signal(lua_State *L) {
    int signum = tn_check_signal(L, 1);
    sig_watch *w = calloc(1, sizeof *w);
    if (!w) return luaL_error(L, "out of memory");
    w->signum = signum;
    uv_signal_init(tn_loop(L), &w->h);
    w->h.data = w;
    int rc = uv_signal_start(&w->h, sig_cb, signum);
    if (rc) {
        sig_close(w);
        return tn_fail_uv(L, "signal", rc);
    }
    /* A watched signal should not keep the loop alive on its own. */
    uv_unref((uv_handle_t *)&w->h);
    sig_box *b = lua_newuserdatauv(L, sizeof *b, 0);
    b->w = w;
    luaL_setmetatable(L, SIGNAL_MT);
    return 1;
}

static void sig_cancel(void *arg) {
    sig_watch *w = arg;
    if (w->waiter) { tn_task_release(w->waiter); w->waiter = NULL; }
}

static int l_sig_wait(lua_State *L) {
    sig_watch *w = check_sig(L);
    lua_Integer timeout = luaL_optinteger(L, 2, -1);
    if (w->pending > 0) {
        w->pending--;
        lua_pushinteger(L, w->signum);
        return 1;
    }
    tn_task *t = tn_task_check(L);
    if (w->waiter) return luaL_error(L, "another task is already waiting for this signal");
    w->waiter = tn_task_hold(t);
    w->seq = tn_task_seq(t);
    /* the watcher stays on the waiting coroutine's stack: nothing else may
     * refer to it (`core.signal("TERM"):wait()`), and it must not be
     * collected while a task waits on it */
    lua_settop(L, 1);
    return tn_task_wait_cancel(L, t, timeout, sig_cancel, w);
}

static int l_sig_close(lua_State *L) {
    sig_box *b = luaL_checkudata(L, 1, SIGNAL_MT);
    sig_watch *w = b->w;
    if (!w) return 0;
    b->w = NULL;
    if (w->waiter) {
        tn_task *t = w->waiter;
        w->waiter = NULL;
        if (tn_task_waiting_for(t, w->seq)) {
            lua_State *co = tn_task_thread(t);
            lua_pushnil(co);
            lua_pushliteral(co, "closed");
            tn_task_resume_later(t, 2);
        }
        tn_task_release(t);
    }
    sig_close(w);
    return 0;
}

static const luaL_Reg sig_methods[] = {
    {"wait", l_sig_wait}, {"close", l_sig_close}, {"__gc", l_sig_close},
    {"__close", l_sig_close}, {NULL, NULL},
};

static const luaL_Reg task_methods[] = {
    {"join", l_task_join}, {"status", l_task_status}, {"__gc", task_gc},
    {"__tostring", l_task_tostring}, {NULL, NULL},
};

/* ---- a cap on memory for code the server does not trust --------------
 * User hooks run in the server's Lua state under an instruction budget, but
 * one instruction (a concatenation, a string.rep) can ask for gigabytes.
 * The state's allocator is wrapped once; while a cap is set, a growth past
 * it is refused, which Lua raises as a memory error in the code asking for
 * it, where the hook's pcall contains it. Shrinking and freeing never fail. */
typedef struct mem_cap {
    lua_Alloc inner;
    void *inner_ud;
    int64_t used;   /* bytes since the wrapper went in: only differences count */
    int64_t limit;  /* refuse growth past this; INT64_MAX when no cap is set */
    int refused;    /* an allocation was refused since the cap was set */
} mem_cap;

static void *capped_alloc(void *ud, void *ptr, size_t osize, size_t nsize) {
    mem_cap *m = ud;
    /* with no block, osize is the kind of object, not a size */
    int64_t before = ptr ? (int64_t)osize : 0;
    int64_t grow = (int64_t)nsize - before;
    if (grow > 0 && m->used + grow > m->limit) {
        m->refused = 1;
        return NULL;
    }
    void *p = m->inner(m->inner_ud, ptr, osize, nsize);
    if (p || nsize == 0) m->used += grow;
    return p;
}

static mem_cap *mem_cap_of(lua_State *L) {
    void *ud;
    lua_Alloc f = lua_getallocf(L, &ud);
    if (f == capped_alloc) return ud;
    mem_cap *m = malloc(sizeof *m);
    if (!m) return NULL;
    *m = (mem_cap){ .inner = f, .inner_ud = ud, .limit = INT64_MAX };
    /* Loaded as a module (core.so), this code would be unloaded by
     * lua_close before the state's last frees, which go through it. */
    Dl_info self;
    if (dladdr((void *)capped_alloc, &self) && self.dli_fname)
        dlopen(self.dli_fname, RTLD_LAZY | RTLD_NOLOAD | RTLD_NODELETE);
    lua_setallocf(L, capped_alloc, m); /* kept for the life of the state */
    return m;
}

/* core.memory_cap(bytes): from now on at most bytes more than in use now.
 * core.memory_cap(): no cap; -> true when an allocation was refused under
 * the one lifted. */
static int l_memory_cap(lua_State *L) {
    mem_cap *m = mem_cap_of(L);
    if (!m) return luaL_error(L, "out of memory");
    if (lua_isnoneornil(L, 1)) {
        int refused = m->refused;
        m->limit = INT64_MAX;
        m->refused = 0;
        lua_pushboolean(L, refused);
        return 1;
    }
    lua_Integer bytes = luaL_checkinteger(L, 1);
    luaL_argcheck(L, bytes >= 0, 1, "must not be negative");
    m->limit = m->used + bytes;
    m->refused = 0;
    return 0;
}

int tn_open_loop(lua_State *L) {
    static const luaL_Reg fns[] = {
        {"spawn", l_spawn}, {"run", l_run}, {"sleep", l_sleep}, {"park", l_park},
        {"wake", l_wake}, {"current", l_current}, {"now", l_now}, {"hrtime", l_hrtime},
        {"time", l_time}, {"on_error", l_on_error}, {"tasks", l_tasks},
        {"signal", l_signal}, {"memory_cap", l_memory_cap}, {NULL, NULL},
    };
    if (!mem_cap_of(L)) return luaL_error(L, "out of memory");
    tn_new_class(L, TASK_MT, task_methods);
    tn_new_class(L, SIGNAL_MT, sig_methods);
    ctx_get(L);
    luaL_newlib(L, fns);
    return 1;
}
