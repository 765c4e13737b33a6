/*
 * tenement core: the internal interface shared by the C files of c/.
 *
 * Each primitive family (proc, net, http, db, crypto, ...) lives in its own
 * file and registers one table of `tenement.core` through a tn_open_<area>
 * function. This header is the only coupling between them: the scheduler
 * (tasks on coroutines over one libuv loop) and small helpers.
 *
 * The async protocol, used by every operation that waits:
 *
 *     static int l_thing_wait(lua_State *L) {
 *         tn_task *t = tn_task_check(L);          // raises outside a task
 *         struct op *op = ...;  op->task = tn_task_hold(t);
 *         start the libuv request, its callback is op_done
 *         return tn_task_wait(L, t, timeout_ms);  // yields the coroutine
 *     }
 *     static void op_done(...) {
 *         if (tn_task_waiting_for(op->task, op->seq)) {
 *             lua_State *co = tn_task_thread(op->task);
 *             lua_pushinteger(co, result);
 *             tn_task_resume(op->task, 1);
 *         }
 *         tn_task_release(op->task);
 *     }
 *
 * tn_task_wait records a wait sequence number (tn_task_seq) that the op keeps,
 * so a completion that arrives after a timeout already resumed the task is
 * ignored instead of resuming it in the middle of something else. A timeout
 * resumes the task with (nil, "timeout"). A held task stays allocated until
 * every holder released it, so a callback never touches freed memory.
 */
#ifndef TN_H
#define TN_H

#include <stddef.h>
#include <stdint.h>

#include <lua.h>
#include <lauxlib.h>
#include <uv.h>

#define TN_VERSION "0.1.0"

typedef struct tn_task tn_task;

/* The loop this Lua state runs on (one per state, created on first use). */
uv_loop_t *tn_loop(lua_State *L);
/* Run the loop as uv_run(UV_RUN_DEFAULT) does, with the HTTP server's
 * sockets polled first-hand (sockio.c); 0 once nothing is left to do. */
int tn_io_run(uv_loop_t *loop);
/* Make tn_io_run return after the events at hand, as uv_stop does. */
void tn_io_stop(uv_loop_t *loop);

/* The task running on L, or NULL when L is not a task's coroutine. */
tn_task *tn_task_current(lua_State *L);
/* Like tn_task_current, but raises a clear error when there is none. */
tn_task *tn_task_check(lua_State *L);

/* Yield the running task until tn_task_resume (or the timeout, if
 * timeout_ms >= 0, which resumes it with nil, "timeout"). Must be the
 * return expression of a lua_CFunction. */
int tn_task_wait(lua_State *L, tn_task *t, int64_t timeout_ms);
/* The same, and on timeout call cancel(arg) first, so the operation can stop
 * (stop reading, close a half-open connection) before the task goes on.
 * cancel must not resume the task. */
typedef void (*tn_cancel_fn)(void *arg);
int tn_task_wait_cancel(lua_State *L, tn_task *t, int64_t timeout_ms,
                        tn_cancel_fn cancel, void *arg);
/* The same, and core.wake (or tn_task_wake) may also end the wait early: it
 * calls cancel(arg), and the task resumes with the waker's values. For waits
 * a task may want to cut short on news from elsewhere (a process's exit,
 * while a socket may appear). cancel then runs from whatever Lua code woke
 * the task, which may be a task this operation's own completion is resuming:
 * an operation that resumes a list of waiters must own the list while it
 * walks it (see detach_waiters in proc.c). */
int tn_task_wait_wakeable(lua_State *L, tn_task *t, int64_t timeout_ms,
                          tn_cancel_fn cancel, void *arg);
/* End t's wait, if it is parked (core.park, join) or in a wakeable wait; it
 * resumes with no values on a later turn. -> 1 if it was woken. */
int tn_task_wake(tn_task *t);
/* The task behind a task handle (core.spawn's result) at idx; raises if it
 * is not one. */
tn_task *tn_task_arg(lua_State *L, int idx);
/* The sequence number of the wait that tn_task_wait is about to begin or has
 * begun; read it before calling tn_task_wait. */
uint64_t tn_task_seq(tn_task *t);
/* True when t is suspended in exactly the wait numbered seq. */
int tn_task_waiting_for(tn_task *t, uint64_t seq);

/* The coroutine of t: push results there, then tn_task_resume(t, n). */
lua_State *tn_task_thread(tn_task *t);
/* Resume a waiting task with the n values on top of its stack. Runs the task
 * until it waits again or ends; errors are contained and reported. */
void tn_task_resume(tn_task *t, int nresults);
/* The same, but t runs later in this turn, behind the tasks ready already,
 * not inside the caller: for a wait ended from Lua code (a close), whose
 * caller goes on with its own invariants. The wait's cancel function runs
 * first, as on a timeout. */
void tn_task_resume_later(tn_task *t, int nresults);

/* Keep t's memory alive across an asynchronous operation. */
tn_task *tn_task_hold(tn_task *t);
void tn_task_release(tn_task *t);

/* Work off the loop thread (work.c), as uv_queue_work but on threads that
 * end after a while without work: work(w) runs on a pool thread, then
 * done(w) on the loop thread, always in a later turn of the loop. The
 * caller owns w (data is its own) until done. tn_loop's loops are ready for
 * it (tn_work_init). */
typedef struct tn_work tn_work;
typedef void (*tn_work_cb)(tn_work *w);
typedef struct work_loop work_loop;
struct tn_work {
    void *data;
    tn_work *next;
    work_loop *wl;
    tn_work_cb work, done;
};
void tn_work_queue(uv_loop_t *loop, tn_work *w, tn_work_cb work, tn_work_cb done);
int tn_work_init(uv_loop_t *loop);

/* Expected failures: push nil and a message, return 2. */
int tn_fail(lua_State *L, const char *fmt, ...);
/* nil, "<what>: <code>: <text>", "<code>" (luv's convention), e.g.
 * nil, "connect /run/x.sock: ENOENT: no such file or directory", "ENOENT".
 * Returns 3. */
int tn_fail_uv(lua_State *L, const char *what, int uv_err);
/* The same for errno values. */
/* A signal given as a number or a name ("SIGTERM" or "TERM"); raises if unknown. */
int tn_check_signal(lua_State *L, int idx);
int tn_fail_errno(lua_State *L, const char *what, int err);

/* Set a new metatable named `name` with methods, __index to itself. */
void tn_new_class(lua_State *L, const char *name, const luaL_Reg *methods);

/* Registration of the primitive families (one per C file). Each pushes a
 * table of functions. */
int tn_open_loop(lua_State *L);
int tn_open_proc(lua_State *L);
int tn_open_net(lua_State *L);
int tn_open_http(lua_State *L);
int tn_open_db(lua_State *L);
int tn_open_crypto(lua_State *L);
int tn_open_fs(lua_State *L);
int tn_open_logbuf(lua_State *L);

/* The init of namespaced instances (c/init.c): `ten __tenement_init -- app...`,
 * run by main() before any Lua state exists; argv[first] follows the init's
 * own words. */
int tn_init_main(int argc, char **argv, int first);

/* The same init built alone (static, musl), embedded by the Makefile
 * ($(BUILD)/gen/init_image.c): what core.proc.init_fd serves. */
extern const unsigned char tn_init_image[];
extern const size_t tn_init_image_size;

#endif
