/*
 * core.logbuf: capture of instances' stdout and stderr.
 *
 * The child writes into a pipe; the loop reads the pipe as fast as it can and
 * splits lines here, in C, into a per-instance ring (the last N lines, for
 * `ten logs` and the dashboard) and optionally into a sink (a bounded queue
 * the store drains into SQLite in batches). Lua never sees a line on its way
 * in: it only reads the ring on demand and takes batches from the sink.
 *
 * Memory is bounded everywhere: a ring keeps at most `lines` lines and
 * `bytes` bytes of text, a sink at most `max_pending` lines and `max_bytes`
 * bytes, a partial line at most `max_line` bytes. Nothing pushes back on the
 * child: a slow store loses lines, it never stalls the writer. A full sink
 * drops the oldest line of the ring with the most lines waiting, so a flood
 * loses its own lines rather than a quiet neighbour's; the next line of that
 * ring taken from the sink is preceded by a line saying how many went.
 *
 * A line is one refcounted allocation shared by the ring and the sink. Tasks
 * waiting on a ring or a sink are woken from a check handle after the loop's
 * I/O phase, so Lua never runs inside a read callback and a taker gets
 * everything that arrived in one loop turn as one batch.
 *
 * Lifetime: a ring or sink is heap memory with a reference count held by its
 * Lua handle, its wake-up check handle (until the close callback), each
 * capture in flight (ring) and each ring feeding it (sink). While a ring
 * reads fds its Lua handle is anchored in the registry, so dropping the handle
 * never cuts a child's output short; a waiting task keeps the handle alive on
 * its own stack.
 */
#include "tn.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define RING_MT "tenement.logring"
#define SINK_MT "tenement.logsink"

static const char trunc_mark[] = " \xe2\x80\xa6[truncated]";
#define TRUNC_MARK_LEN (sizeof trunc_mark - 1)

static const char *const stream_names[] = {"stdout", "stderr", NULL};

#define RING_MAX_LINES   1000000
#define MAX_LINE_LIMIT   (16 * 1024 * 1024)
#define SINK_MAX_PENDING 10000000

/* ---- lines ------------------------------------------------------------- */

typedef struct lb_line lb_line;

/* The ring's name, shared by its lines; also where the sink keeps the
 * ring's waiting lines (oldest first) and what it dropped of them. */
typedef struct lb_tag {
    size_t refs;
    size_t sink_pending;
    size_t heap_at;          /* its place in the sink's heap, when in it */
    int in_heap;
    uint64_t heap_key;       /* at most its oldest waiting line's sink_seq */
    lb_line *sink_head, *sink_tail;
    uint64_t sink_dropped;   /* ever */
    uint64_t sink_gap;       /* since the last of its lines was taken */
    size_t len;
    char s[];
} lb_tag;

struct lb_line {
    uint32_t refs;
    uint32_t len;
    uint64_t seq;
    int64_t ts_ms;
    lb_tag *tag;
    lb_line *sink_next;  /* the next waiting line of its ring */
    uint64_t sink_seq;   /* its place in the sink's arrival order */
    uint8_t stream;
    uint32_t source;     /* the capture's, e.g. the pid of the process that wrote it */
    char text[];
};

static void tag_unref(lb_tag *t) {
    if (--t->refs == 0) free(t);
}

static void line_unref(lb_line *l) {
    if (--l->refs) return;
    tag_unref(l->tag);
    free(l);
}

static int64_t wall_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* ---- waiters ----------------------------------------------------------- */

enum { WAIT_LINE, WAIT_DRAIN, WAIT_TAKE };

typedef struct lb_waiter {
    struct lb_waiter *prev, *next;
    struct lb_waiter **head;
    tn_task *t;
    uint64_t seq;
    uint64_t after;      /* WAIT_LINE: wake when last_seq > after */
    lua_Integer max;     /* WAIT_TAKE: batch size */
    int kind;
} lb_waiter;

static void waiter_unlink(lb_waiter *w) {
    if (w->prev) w->prev->next = w->next;
    else *w->head = w->next;
    if (w->next) w->next->prev = w->prev;
    w->prev = w->next = NULL;
}

/* Appended at the tail, so takers are served in the order they came. */
static lb_waiter *waiter_add(lua_State *L, lb_waiter **head, tn_task *t, int kind) {
    lb_waiter *w = calloc(1, sizeof *w);
    if (!w) { luaL_error(L, "out of memory"); return NULL; }
    w->head = head;
    w->kind = kind;
    lb_waiter **pp = head, *prev = NULL;
    while (*pp) { prev = *pp; pp = &(*pp)->next; }
    w->prev = prev;
    *pp = w;
    w->t = tn_task_hold(t);
    w->seq = tn_task_seq(t);
    return w;
}

/* The wait ended otherwise than by its operation: a timeout (core resumes
 * the task with nil, "timeout"), or a close that woke it (waiter_fail). */
static void waiter_cancel(void *arg) {
    lb_waiter *w = arg;
    if (w->head) waiter_unlink(w);
    tn_task_release(w->t);
    free(w);
}

/* Detach w and resume its task with nil, reason. When resuming is not
 * allowed (a finalizer, which only meets waiters when the whole state
 * closes), w stays allocated for the task's timeout to cancel. */
static void waiter_fail(lb_waiter *w, const char *reason, int resume) {
    tn_task *t = w->t;
    uint64_t seq = w->seq;
    waiter_unlink(w);
    w->head = NULL;
    if (!resume) return;
    if (tn_task_waiting_for(t, seq)) {
        lua_State *co = tn_task_thread(t);
        lua_pushnil(co);
        lua_pushstring(co, reason);
        /* woken, not run inside the close: its cancel (waiter_cancel)
         * finds w unlinked, and frees it and releases the task */
        tn_task_resume_later(t, 2);
        return;
    }
    free(w);
    tn_task_release(t);
}

/* ---- the sink ---------------------------------------------------------- */

typedef struct lb_sink {
    unsigned refs;
    int closed;
    /* The rings with lines waiting, by the arrival of their oldest: the
     * next line taken is the oldest of the first one. A ring's key is
     * brought up to date only when it comes first (a drop would otherwise
     * read the line after the one dropped, one more cache miss a line in a
     * flood), so a key may be low, never high; a ring with nothing left
     * leaves once it comes first. */
    lb_tag **heap;
    size_t nheap, heapcap;
    size_t count;
    uint64_t arrived;
    lb_tag *heavy;           /* the ring with the most lines waiting, as last seen */
    size_t max_pending;
    size_t bytes, max_bytes;
    uint64_t taken, dropped;
    lb_waiter *takers;
    uv_check_t wake;
} lb_sink;

typedef struct { lb_sink *s; } sink_box;

static void sink_unref(lb_sink *s) {
    if (--s->refs) return;
    free(s->heap);
    free(s);
}

/* ---- the heap of rings, keyed by the arrival of their oldest line ---- */

static void heap_set(lb_sink *s, size_t i, lb_tag *t) {
    s->heap[i] = t;
    t->heap_at = i;
}

static void heap_down(lb_sink *s, size_t i) {
    lb_tag *t = s->heap[i];
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= s->nheap) break;
        if (c + 1 < s->nheap && s->heap[c + 1]->heap_key < s->heap[c]->heap_key) c++;
        if (t->heap_key <= s->heap[c]->heap_key) break;
        heap_set(s, i, s->heap[c]);
        i = c;
    }
    heap_set(s, i, t);
}

static void heap_remove_first(lb_sink *s) {
    lb_tag *t = s->heap[0];
    t->in_heap = 0;
    if (--s->nheap) {
        heap_set(s, 0, s->heap[s->nheap]);
        heap_down(s, 0);
    }
    tag_unref(t);
}

/* The ring whose waiting line came first, its key made true on the way.
 * NULL when no line waits. */
static lb_tag *heap_first(lb_sink *s) {
    while (s->nheap) {
        lb_tag *t = s->heap[0];
        if (!t->sink_pending) {
            heap_remove_first(s);
            continue;
        }
        uint64_t key = t->sink_head->sink_seq;
        if (key == t->heap_key) return t;
        t->heap_key = key;
        heap_down(s, 0);
    }
    return NULL;
}

/* The oldest waiting line of t is no longer waiting. */
static lb_line *sink_unlink_oldest(lb_sink *s, lb_tag *t) {
    lb_line *l = t->sink_head;
    t->sink_head = l->sink_next;
    if (!t->sink_head) t->sink_tail = NULL;
    l->sink_next = NULL;
    t->sink_pending--;
    s->count--;
    s->bytes -= l->len;
    return l;
}

/* The oldest waiting line of all, out of the sink. Needs count > 0. */
static lb_line *sink_pop(lb_sink *s) {
    return sink_unlink_oldest(s, heap_first(s));
}

/* Room for one line at the expense of the ring with the most lines
 * waiting: its oldest is dropped (the oldest of all when that ring is not
 * known), counted, and remembered as a gap before its next line. */
static void sink_drop_one(lb_sink *s) {
    lb_tag *t = s->heavy && s->heavy->sink_pending ? s->heavy : heap_first(s);
    lb_line *l = sink_unlink_oldest(s, t);
    /* in a flood the next line dropped is likely this ring's next, and
     * long out of the cache: its load starts now, a line ahead */
    if (t->sink_head) __builtin_prefetch(t->sink_head, 1);
    t->sink_dropped++;
    t->sink_gap++;
    s->dropped++;
    line_unref(l);
}

static void sink_push(lb_sink *s, lb_line *l) {
    if (s->closed) return;
    lb_tag *t = l->tag;
    while (s->count && (s->count >= s->max_pending || s->bytes + l->len > s->max_bytes)) sink_drop_one(s);
    if (!t->in_heap && s->nheap == s->heapcap) {
        size_t ncap = s->heapcap ? s->heapcap * 2 : 16;
        lb_tag **nh = realloc(s->heap, ncap * sizeof *nh);
        if (!nh) {
            s->dropped++;
            t->sink_dropped++;
            t->sink_gap++;
            return;
        }
        s->heap = nh;
        s->heapcap = ncap;
    }
    l->refs++;
    l->sink_seq = ++s->arrived;
    l->sink_next = NULL;
    if (t->sink_tail) t->sink_tail->sink_next = l;
    else t->sink_head = l;
    t->sink_tail = l;
    s->count++;
    s->bytes += l->len;
    t->sink_pending++;
    /* the newest line of all: a ring out of the heap goes last */
    if (!t->in_heap) {
        t->in_heap = 1;
        t->heap_key = l->sink_seq;
        t->refs++;
        heap_set(s, s->nheap++, t);
    }
    if (t != s->heavy && (!s->heavy || t->sink_pending > s->heavy->sink_pending)) {
        if (s->heavy) tag_unref(s->heavy);
        s->heavy = t;
        t->refs++;
    }
}

/* One row { ts, tag, stream, text [, source] }: the shape a prepared
 * statement's run_many takes as it is. A row of the same ring as the row
 * before it shares that row's tag string. */
static void push_row(lua_State *L, lua_Integer k, const lb_line *l, const lb_tag **last_tag,
                     const char *text, size_t len) {
    lua_createtable(L, 5, 0);
    lua_pushnumber(L, (lua_Number)l->ts_ms / 1000.0);
    lua_rawseti(L, -2, 1);
    if (l->tag == *last_tag) {
        lua_rawgeti(L, -2, k - 1);
        lua_rawgeti(L, -1, 2);
        lua_remove(L, -2);
    } else {
        lua_pushlstring(L, l->tag->s, l->tag->len);
        *last_tag = l->tag;
    }
    lua_rawseti(L, -2, 2);
    lua_pushstring(L, stream_names[l->stream]);
    lua_rawseti(L, -2, 3);
    lua_pushlstring(L, text, len);
    lua_rawseti(L, -2, 4);
    if (l->source) {
        lua_pushinteger(L, (lua_Integer)l->source);
        lua_rawseti(L, -2, 5);
    }
    lua_rawseti(L, -2, k);
}

/* Up to max waiting lines as rows, in arrival order: of every ring, or of
 * `only`'s. Where lines of a ring were dropped, a row saying how many comes
 * before its next line, with that line's time, stream and source: a reader
 * of the ring sees the gap where it is. Taking one ring's lines leaves its
 * key in the heap low, which heap_first allows for. */
static void sink_push_batch(lua_State *L, lb_sink *s, lua_Integer max, lb_tag *only) {
    size_t waiting = only ? only->sink_pending : s->count;
    size_t n = waiting < (size_t)max ? waiting : (size_t)max;
    lua_createtable(L, (int)n, 0);
    const lb_tag *last_tag = NULL;
    lua_Integer k = 0;
    for (size_t i = 0; i < n; i++) {
        lb_tag *t = only ? only : heap_first(s);
        /* taken out only once its rows are made: a memory error in Lua
         * leaves it waiting, not leaked */
        lb_line *l = t->sink_head;
        if (l->tag->sink_gap) {
            char gap[160];
            int len = snprintf(gap, sizeof gap, "\xe2\x80\xa6[%llu line%s dropped here: the log store could not keep up]",
                               (unsigned long long)l->tag->sink_gap, l->tag->sink_gap == 1 ? "" : "s");
            l->tag->sink_gap = 0;
            push_row(L, ++k, l, &last_tag, gap, (size_t)len);
        }
        push_row(L, ++k, l, &last_tag, l->text, l->len);
        line_unref(sink_unlink_oldest(s, t));
    }
    s->taken += n;
}

static void sink_wake_cb(uv_check_t *h) {
    lb_sink *s = h->data;
    uv_check_stop(h);
    s->refs++;
    /* A resumed task may take, wait again or close the sink: look afresh
     * after each one. */
    while (!s->closed && s->count && s->takers) {
        lb_waiter *w = s->takers;
        tn_task *t = w->t;
        uint64_t seq = w->seq;
        lua_Integer max = w->max;
        waiter_unlink(w);
        free(w);
        if (tn_task_waiting_for(t, seq)) {
            lua_State *co = tn_task_thread(t);
            sink_push_batch(co, s, max, NULL);
            tn_task_resume(t, 1);
        }
        tn_task_release(t);
    }
    sink_unref(s);
}

static void sink_notify(lb_sink *s) {
    if (!s->closed && s->takers && s->count) uv_check_start(&s->wake, sink_wake_cb);
}

static void sink_wake_close_cb(uv_handle_t *h) { sink_unref(h->data); }

static void sink_close(lb_sink *s, int resume) {
    if (s->closed) return;
    s->closed = 1;
    while (s->count) line_unref(sink_pop(s));
    while (s->nheap) heap_remove_first(s);
    if (s->heavy) tag_unref(s->heavy);
    s->heavy = NULL;
    uv_close((uv_handle_t *)&s->wake, sink_wake_close_cb);
    while (s->takers) waiter_fail(s->takers, "closed", resume);
}

static lb_sink *check_sink(lua_State *L, int idx) {
    sink_box *b = luaL_checkudata(L, idx, SINK_MT);
    if (!b->s) luaL_error(L, "logbuf sink is closed");
    return b->s;
}

/* ---- the ring ---------------------------------------------------------- */

typedef struct lb_cap lb_cap;

typedef struct lb_ring {
    lua_State *L;        /* the main thread, for the registry */
    int anchor;          /* ref to the Lua handle while fds are read */
    unsigned refs;
    int closed;
    lb_tag *tag;
    lb_sink *sink;
    lb_line **slots;     /* grown by doubling up to max_lines: a quiet */
    size_t nslots;       /* instance never pays for the lines it does not write */
    size_t max_lines, first, count;
    size_t max_bytes, held_bytes, max_line;
    uint64_t last_seq, total_bytes, truncated, overwritten;
    int open_fds;
    lb_cap *caps;
    lb_waiter *waiters;
    uv_check_t wake;
} lb_ring;

struct lb_cap {
    uv_pipe_t h;
    lb_ring *r;
    lb_cap *prev, *next;
    char *pbuf;          /* the partial line carried across reads */
    size_t plen, pcap;
    int64_t pts;         /* when its first byte came: the line's time */
    uint8_t stream;
    uint32_t source;
    int discarding;      /* the rest of a cut line, up to its newline */
    int closing;
};

typedef struct { lb_ring *r; } ring_box;

static void ring_unref(lb_ring *r) {
    if (--r->refs) return;
    free(r->slots);
    free(r);
}

/* Room for one more line without evicting: the slots double (at least 16,
 * at most max_lines), copied oldest first. -> 0 when there is none. */
static int ring_grow(lb_ring *r) {
    if (r->nslots >= r->max_lines) return 0;
    size_t ncap = r->nslots ? r->nslots * 2 : 16;
    if (ncap > r->max_lines) ncap = r->max_lines;
    lb_line **ns = malloc(ncap * sizeof *ns);
    if (!ns) return 0;
    for (size_t i = 0; i < r->count; i++) {
        size_t j = r->first + i;
        if (j >= r->nslots) j -= r->nslots;
        ns[i] = r->slots[j];
    }
    free(r->slots);
    r->slots = ns;
    r->nslots = ncap;
    r->first = 0;
    return 1;
}

static void ring_push(lb_ring *r, lb_line *l) {
    if (r->count == r->nslots && !ring_grow(r) && r->nslots == 0) {
        line_unref(l); /* out of memory before the first line: it is lost */
        r->overwritten++;
        return;
    }
    while (r->count && (r->count == r->nslots || r->held_bytes + l->len > r->max_bytes)) {
        lb_line *old = r->slots[r->first];
        if (++r->first == r->nslots) r->first = 0;
        r->count--;
        r->held_bytes -= old->len;
        r->overwritten++;
        line_unref(old);
    }
    size_t i = r->first + r->count;
    if (i >= r->nslots) i -= r->nslots;
    r->slots[i] = l;
    r->count++;
    r->held_bytes += l->len;
}

/* Cut at most max bytes, backing off to the start of a UTF-8 sequence the
 * cut would split (text that is not UTF-8 is cut at max as it is). */
static size_t utf8_cut(const char *p, size_t max) {
    size_t k = max;
    for (int back = 0; back < 3 && k > 0 && ((unsigned char)p[k] & 0xC0) == 0x80; back++) k--;
    return ((unsigned char)p[k] & 0xC0) == 0x80 ? max : k;
}

static void cap_emit(lb_cap *c, const char *p, size_t n, int newline, int64_t ts) {
    lb_ring *r = c->r;
    int cut = 0;
    if (newline && n && p[n - 1] == '\r') n--;
    if (n > r->max_line) {
        n = utf8_cut(p, r->max_line);
        cut = 1;
    }
    size_t len = n + (cut ? TRUNC_MARK_LEN : 0);
    lb_line *l = malloc(sizeof *l + len);
    if (!l) return;
    memcpy(l->text, p, n);
    if (cut) memcpy(l->text + n, trunc_mark, TRUNC_MARK_LEN);
    l->refs = 1;
    l->len = (uint32_t)len;
    l->sink_next = NULL;
    l->sink_seq = 0;
    l->seq = ++r->last_seq;
    l->ts_ms = ts;
    l->stream = c->stream;
    l->source = c->source;
    l->tag = r->tag;
    r->tag->refs++;
    r->total_bytes += len;
    r->truncated += (uint64_t)cut;
    if (r->sink) sink_push(r->sink, l);
    ring_push(r, l);
}

/* The partial line was used up. A big buffer is given back, so thousands
 * of quiet instances do not each keep one for a single long line. */
static void cap_reset(lb_cap *c) {
    c->plen = 0;
    if (c->pcap > 4096) {
        free(c->pbuf);
        c->pbuf = NULL;
        c->pcap = 0;
    }
}

/* Add bytes without a newline to the partial line. One byte beyond max_line
 * is kept because it may be the \r of a \r\n; past that the line is cut
 * now (so a line that never ends still shows) and the rest is discarded. */
static void cap_append(lb_cap *c, const char *p, size_t n, int64_t ts) {
    if (c->plen == 0) c->pts = ts;
    size_t limit = c->r->max_line + 1;
    size_t take = limit - c->plen;
    if (take > n) take = n;
    if (c->plen + take > c->pcap) {
        size_t ncap = c->pcap ? c->pcap : 256;
        while (ncap < c->plen + take) ncap *= 2;
        if (ncap > limit) ncap = limit;
        char *nb = realloc(c->pbuf, ncap);
        if (!nb) { cap_reset(c); c->discarding = 1; return; }
        c->pbuf = nb;
        c->pcap = ncap;
    }
    memcpy(c->pbuf + c->plen, p, take);
    c->plen += take;
    if (n > take || (c->plen == limit && c->pbuf[limit - 1] != '\r')) {
        cap_emit(c, c->pbuf, c->plen, 0, c->pts);
        cap_reset(c);
        c->discarding = 1;
    }
}

static void cap_feed(lb_cap *c, const char *p, size_t n, int64_t ts) {
    while (n > 0) {
        const char *nl = memchr(p, '\n', n);
        size_t seg = nl ? (size_t)(nl - p) : n;
        if (c->discarding) {
            if (nl) c->discarding = 0;
        } else if (nl && c->plen == 0) {
            cap_emit(c, p, seg, 1, ts);      /* the common case: one copy */
        } else {
            cap_append(c, p, seg, ts);
            if (nl) {
                if (c->discarding) c->discarding = 0;
                else cap_emit(c, c->pbuf, c->plen, 1, c->pts);
                cap_reset(c);
            }
        }
        if (!nl) break;
        p += seg + 1;
        n -= seg + 1;
    }
}

/* One read buffer for every capture: libuv calls alloc and read back to back
 * for one stream, and the bytes are consumed before read returns. */
static _Thread_local char read_buf[64 * 1024];

static void cap_alloc(uv_handle_t *h, size_t hint, uv_buf_t *buf) {
    (void)h; (void)hint;
    buf->base = read_buf;
    buf->len = sizeof read_buf;
}

static void ring_unanchor(lb_ring *r) {
    if (r->anchor == LUA_NOREF) return;
    luaL_unref(r->L, LUA_REGISTRYINDEX, r->anchor);
    r->anchor = LUA_NOREF;
}

static void cap_close_cb(uv_handle_t *h) {
    lb_cap *c = h->data;
    free(c->pbuf);
    if (c->r) ring_unref(c->r);
    free(c);
}

static void cap_close(lb_cap *c) {
    lb_ring *r = c->r;
    if (c->closing) return;
    c->closing = 1;
    if (c->prev) c->prev->next = c->next;
    else r->caps = c->next;
    if (c->next) c->next->prev = c->prev;
    uv_close((uv_handle_t *)&c->h, cap_close_cb);
    if (--r->open_fds == 0) ring_unanchor(r);
}

static void ring_wake_cb(uv_check_t *h) {
    lb_ring *r = h->data;
    uv_check_stop(h);
    r->refs++;
    /* A resumed task may wait again or close the ring: look afresh after
     * each one. */
    while (!r->closed) {
        lb_waiter *w = r->waiters;
        while (w && !(w->kind == WAIT_LINE ? r->last_seq > w->after : r->open_fds == 0))
            w = w->next;
        if (!w) break;
        tn_task *t = w->t;
        uint64_t seq = w->seq;
        waiter_unlink(w);
        free(w);
        if (tn_task_waiting_for(t, seq)) {
            lua_pushboolean(tn_task_thread(t), 1);
            tn_task_resume(t, 1);
        }
        tn_task_release(t);
    }
    ring_unref(r);
}

static void ring_notify(lb_ring *r) {
    if (r->waiters) uv_check_start(&r->wake, ring_wake_cb);
    if (r->sink) sink_notify(r->sink);
}

static void cap_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf) {
    lb_cap *c = s->data;
    lb_ring *r = c->r;
    if (nread == 0) return;
    if (nread > 0) {
        cap_feed(c, buf->base, (size_t)nread, wall_ms());
    } else {
        /* EOF, or an error that ends the stream just as well: whatever was
         * read is kept, the last line even without its newline. */
        if (!c->discarding && c->plen) cap_emit(c, c->pbuf, c->plen, 0, c->pts);
        c->plen = 0;
        cap_close(c);
    }
    ring_notify(r);
}

static void ring_wake_close_cb(uv_handle_t *h) { ring_unref(h->data); }

static void ring_close(lb_ring *r, int resume) {
    if (r->closed) return;
    r->closed = 1;
    while (r->caps) cap_close(r->caps);
    ring_unanchor(r);
    while (r->count) {
        lb_line *l = r->slots[r->first];
        if (++r->first == r->nslots) r->first = 0;
        r->count--;
        line_unref(l);
    }
    r->held_bytes = 0;
    if (r->sink) { sink_unref(r->sink); r->sink = NULL; }
    tag_unref(r->tag);
    r->tag = NULL;
    uv_close((uv_handle_t *)&r->wake, ring_wake_close_cb);
    while (r->waiters) waiter_fail(r->waiters, "closed", resume);
}

static lb_ring *check_ring(lua_State *L, int idx) {
    ring_box *b = luaL_checkudata(L, idx, RING_MT);
    if (!b->r) luaL_error(L, "logbuf ring is closed");
    return b->r;
}

/* ---- options ----------------------------------------------------------- */

static void check_keys(lua_State *L, int idx, const char *what, const char *const *known) {
    lua_pushnil(L);
    while (lua_next(L, idx)) {
        lua_pop(L, 1);
        int ok = 0;
        if (lua_type(L, -1) == LUA_TSTRING)
            for (int i = 0; known[i]; i++) ok |= strcmp(lua_tostring(L, -1), known[i]) == 0;
        if (!ok)
            luaL_error(L, "%s: unknown option '%s'", what, luaL_tolstring(L, -1, NULL));
    }
}

static lua_Integer opt_field(lua_State *L, int idx, const char *what, const char *key,
                             lua_Integer def, lua_Integer min, lua_Integer max) {
    lua_getfield(L, idx, key);
    lua_Integer v = def;
    if (!lua_isnil(L, -1)) {
        int isint;
        v = lua_tointegerx(L, -1, &isint);
        if (!isint) luaL_error(L, "%s: option '%s' must be an integer", what, key);
        if (v < min || v > max)
            luaL_error(L, "%s: option '%s' must be between %I and %I", what, key, min, max);
    }
    lua_pop(L, 1);
    return v;
}

/* ---- Lua API: fds ------------------------------------------------------ */

/* logbuf.pipe() -> rfd, wfd | nil, err, code. Both ends close-on-exec: the
 * child gets wfd through dup2, which clears the flag on the copy. */
static int l_pipe(lua_State *L) {
    int fds[2];
    if (pipe2(fds, O_CLOEXEC) != 0) return tn_fail_errno(L, "pipe", errno);
    lua_pushinteger(L, fds[0]);
    lua_pushinteger(L, fds[1]);
    return 2;
}

/* logbuf.close_fd(fd) -> true | nil, err, code */
static int l_close_fd(lua_State *L) {
    lua_Integer fd = luaL_checkinteger(L, 1);
    luaL_argcheck(L, fd >= 0 && fd <= INT32_MAX, 1, "not a file descriptor");
    if (close((int)fd) != 0 && errno != EINTR)
        return tn_fail_errno(L, lua_pushfstring(L, "close fd %I", fd), errno);
    lua_pushboolean(L, 1);
    return 1;
}

/* ---- Lua API: sink ----------------------------------------------------- */

/* logbuf.sink{ max_pending = 100000, max_bytes = 64 MiB } -> sink */
static int l_sink_new(lua_State *L) {
    static const char *const keys[] = {"max_pending", "max_bytes", NULL};
    const char *what = "logbuf.sink";
    if (lua_isnoneornil(L, 1)) { lua_settop(L, 0); lua_newtable(L); }
    luaL_checktype(L, 1, LUA_TTABLE);
    check_keys(L, 1, what, keys);
    lua_Integer max_pending = opt_field(L, 1, what, "max_pending", 100000, 1, SINK_MAX_PENDING);
    lua_Integer max_bytes = opt_field(L, 1, what, "max_bytes", 64 << 20, 1, (lua_Integer)1 << 40);

    sink_box *b = lua_newuserdatauv(L, sizeof *b, 0);
    b->s = NULL;
    luaL_setmetatable(L, SINK_MT);
    lb_sink *s = calloc(1, sizeof *s);
    if (!s) return luaL_error(L, "out of memory");
    s->refs = 2; /* the Lua handle, the check handle */
    s->max_pending = (size_t)max_pending;
    s->max_bytes = (size_t)max_bytes;
    uv_check_init(tn_loop(L), &s->wake);
    s->wake.data = s;
    b->s = s;
    return 1;
}

/* sink:take([max_lines=1000 [, timeout_ms]]) -> { {ts, tag, stream, text [, source]}, ... }
 * | nil, "timeout" | nil, "closed" (source: ring:capture's, left out when 0).
 * Waits until at least one line is pending. */
static int l_sink_take(lua_State *L) {
    lb_sink *s = check_sink(L, 1);
    lua_Integer max = luaL_optinteger(L, 2, 1000);
    lua_Integer timeout = luaL_optinteger(L, 3, -1);
    luaL_argcheck(L, max >= 1, 2, "must be at least 1");
    if (s->count) {
        sink_push_batch(L, s, max, NULL);
        return 1;
    }
    tn_task *t = tn_task_check(L);
    /* The handle stays on this coroutine's stack while it waits, which keeps
     * it from being collected under the waiter. */
    lb_waiter *w = waiter_add(L, &s->takers, t, WAIT_TAKE);
    w->max = max;
    return tn_task_wait_cancel(L, t, timeout, waiter_cancel, w);
}

/* sink:stats() -> { pending, bytes, taken, dropped } */
static int l_sink_stats(lua_State *L) {
    lb_sink *s = check_sink(L, 1);
    lua_createtable(L, 0, 4);
    lua_pushinteger(L, (lua_Integer)s->count); lua_setfield(L, -2, "pending");
    lua_pushinteger(L, (lua_Integer)s->bytes); lua_setfield(L, -2, "bytes");
    lua_pushinteger(L, (lua_Integer)s->taken); lua_setfield(L, -2, "taken");
    lua_pushinteger(L, (lua_Integer)s->dropped); lua_setfield(L, -2, "dropped");
    return 1;
}

static int sink_do_close(lua_State *L, int resume) {
    sink_box *b = luaL_checkudata(L, 1, SINK_MT);
    lb_sink *s = b->s;
    if (!s) return 0;
    b->s = NULL;
    sink_close(s, resume);
    sink_unref(s);
    return 0;
}

/* sink:close(): pending lines are discarded, takers get nil, "closed". */
static int l_sink_close(lua_State *L) { return sink_do_close(L, 1); }
/* A collected sink has no takers (they would hold it), except when the whole
 * state closes: then nothing may be resumed. */
static int l_sink_gc(lua_State *L) { return sink_do_close(L, 0); }

static int l_sink_tostring(lua_State *L) {
    sink_box *b = luaL_checkudata(L, 1, SINK_MT);
    if (b->s) lua_pushfstring(L, SINK_MT " (%p, %d pending)", (void *)b->s, (int)b->s->count);
    else lua_pushliteral(L, SINK_MT " (closed)");
    return 1;
}

/* ---- Lua API: ring ----------------------------------------------------- */

/* logbuf.ring{ tag = "", lines = 1000, max_line = 16384, bytes = lines * 256,
 * sink = nil } -> ring */
static int l_ring_new(lua_State *L) {
    static const char *const keys[] = {"tag", "lines", "max_line", "bytes", "sink", NULL};
    const char *what = "logbuf.ring";
    if (lua_isnoneornil(L, 1)) { lua_settop(L, 0); lua_newtable(L); }
    luaL_checktype(L, 1, LUA_TTABLE);
    lua_settop(L, 1);
    check_keys(L, 1, what, keys);
    lua_Integer lines = opt_field(L, 1, what, "lines", 1000, 1, RING_MAX_LINES);
    lua_Integer max_line = opt_field(L, 1, what, "max_line", 16384, 1, MAX_LINE_LIMIT);
    lua_Integer bytes = opt_field(L, 1, what, "bytes", lines * 256, 1, (lua_Integer)1 << 40);
    size_t tag_len = 0;
    const char *tag = "";
    lua_getfield(L, 1, "tag");                               /* 2 */
    if (!lua_isnil(L, 2)) {
        if (lua_type(L, 2) != LUA_TSTRING) luaL_error(L, "%s: option 'tag' must be a string", what);
        tag = lua_tolstring(L, 2, &tag_len);
    }
    lua_getfield(L, 1, "sink");                              /* 3 */
    lb_sink *sink = NULL;
    if (!lua_isnil(L, 3)) {
        if (!luaL_testudata(L, 3, SINK_MT)) luaL_error(L, "%s: option 'sink' must be a logbuf sink", what);
        sink = check_sink(L, 3);
    }

    /* The handle first, so a failed allocation below leaves nothing behind
     * but a handle that __gc ignores. It keeps its sink alive. */
    ring_box *b = lua_newuserdatauv(L, sizeof *b, 1);        /* 4 */
    b->r = NULL;
    luaL_setmetatable(L, RING_MT);
    lua_pushvalue(L, 3);
    lua_setiuservalue(L, 4, 1);

    lb_ring *r = calloc(1, sizeof *r);
    lb_tag *tg = malloc(sizeof *tg + tag_len);
    if (!r || !tg) {
        free(r); free(tg);
        return luaL_error(L, "out of memory");
    }
    memset(tg, 0, sizeof *tg);
    tg->refs = 1;
    tg->len = tag_len;
    memcpy(tg->s, tag, tag_len);
    lua_rawgeti(L, LUA_REGISTRYINDEX, LUA_RIDX_MAINTHREAD);
    r->L = lua_tothread(L, -1);
    lua_pop(L, 1);
    r->anchor = LUA_NOREF;
    r->refs = 2; /* the Lua handle, the check handle */
    r->tag = tg;
    r->max_lines = (size_t)lines;
    r->max_line = (size_t)max_line;
    r->max_bytes = (size_t)bytes;
    if (sink) { r->sink = sink; sink->refs++; }
    uv_check_init(tn_loop(L), &r->wake);
    r->wake.data = r;
    b->r = r;
    return 1;
}

/* ring:capture(rfd [, "stdout"|"stderr" [, source]]) -> true | nil, err, code.
 * Takes ownership of rfd (closed on failure too, unless the loop already
 * watches it) and reads it until EOF. source (a number, 0 to 2^32-1) marks
 * the lines read, so a caller tells apart the writers of one ring: the
 * supervisor gives the pid, since a rollout's new process starts while the
 * old one still writes. */
static int l_ring_capture(lua_State *L) {
    lb_ring *r = check_ring(L, 1);
    lua_Integer ifd = luaL_checkinteger(L, 2);
    int stream = luaL_checkoption(L, 3, "stdout", stream_names);
    lua_Integer source = luaL_optinteger(L, 4, 0);
    luaL_argcheck(L, ifd >= 0 && ifd <= INT32_MAX, 2, "not a file descriptor");
    luaL_argcheck(L, source >= 0 && source <= UINT32_MAX, 4, "not a number from 0 to 2^32-1");
    int fd = (int)ifd;
    struct stat st;
    if (fstat(fd, &st) != 0)
        return tn_fail_errno(L, lua_pushfstring(L, "capture fd %d", fd), errno);
    /* epoll refuses regular files and most devices, and libuv aborts on
     * that: only pipes and sockets get this far. */
    if (!S_ISFIFO(st.st_mode) && !S_ISSOCK(st.st_mode)) {
        close(fd);
        return tn_fail_errno(L, lua_pushfstring(L, "capture fd %d: not a pipe or a socket", fd),
                             EINVAL);
    }
    lb_cap *c = calloc(1, sizeof *c);
    if (!c) { close(fd); return luaL_error(L, "out of memory"); }
    uv_pipe_init(tn_loop(L), &c->h, 0);
    c->h.data = c;
    c->stream = (uint8_t)stream;
    c->source = (uint32_t)source;
    int rc = uv_pipe_open(&c->h, fd);
    int opened = rc == 0;
    if (rc == 0) rc = uv_read_start((uv_stream_t *)&c->h, cap_alloc, cap_read);
    if (rc != 0) {
        c->closing = 1;
        uv_close((uv_handle_t *)&c->h, cap_close_cb); /* closes fd once opened */
        if (!opened && rc != UV_EEXIST) close(fd);
        return tn_fail_uv(L, lua_pushfstring(L, "capture fd %d", fd), rc);
    }
    c->r = r;
    r->refs++;
    c->next = r->caps;
    if (r->caps) r->caps->prev = c;
    r->caps = c;
    if (r->open_fds++ == 0) {
        lua_pushvalue(L, 1);
        r->anchor = luaL_ref(L, LUA_REGISTRYINDEX);
    }
    lua_pushboolean(L, 1);
    return 1;
}

static void push_line(lua_State *L, const lb_line *l) {
    lua_createtable(L, 0, 5);
    lua_pushinteger(L, (lua_Integer)l->seq);
    lua_setfield(L, -2, "seq");
    lua_pushnumber(L, (lua_Number)l->ts_ms / 1000.0);
    lua_setfield(L, -2, "ts");
    lua_pushstring(L, stream_names[l->stream]);
    lua_setfield(L, -2, "stream");
    lua_pushlstring(L, l->text, l->len);
    lua_setfield(L, -2, "text");
    lua_pushinteger(L, (lua_Integer)l->source);
    lua_setfield(L, -2, "source");
}

/* ring:lines([after_seq [, max]]) -> { {seq, ts, stream, text, source}, ... } oldest
 * first: the lines still held with seq > after_seq, at most the newest max. */
static int l_ring_lines(lua_State *L) {
    lb_ring *r = check_ring(L, 1);
    lua_Integer after = luaL_optinteger(L, 2, 0);
    lua_Integer max = luaL_optinteger(L, 3, -1);
    luaL_argcheck(L, lua_isnoneornil(L, 3) || max >= 0, 3, "must not be negative");
    uint64_t oldest = r->last_seq - r->count + 1;          /* seqs held are consecutive */
    uint64_t from = oldest;
    if (after >= 0 && (uint64_t)after + 1 > from) from = (uint64_t)after + 1;
    if (max >= 0 && r->last_seq + 1 >= (uint64_t)max && r->last_seq + 1 - (uint64_t)max > from)
        from = r->last_seq + 1 - (uint64_t)max;
    size_t n = from > r->last_seq ? 0 : (size_t)(r->last_seq - from + 1);
    lua_createtable(L, (int)n, 0);
    size_t idx = r->first + (size_t)(from - oldest);
    for (size_t i = 1; i <= n; i++, idx++) {
        if (idx >= r->nslots) idx -= r->nslots;
        push_line(L, r->slots[idx]);
        lua_rawseti(L, -2, (lua_Integer)i);
    }
    return 1;
}

/* ring:last_seq() -> the seq of the newest line (0 before the first) */
static int l_ring_last_seq(lua_State *L) {
    lua_pushinteger(L, (lua_Integer)check_ring(L, 1)->last_seq);
    return 1;
}

/* ring:wait([after_seq = last_seq [, timeout_ms]]) -> true | nil, "timeout" |
 * nil, "closed": until a line with seq > after_seq exists. */
static int l_ring_wait(lua_State *L) {
    lb_ring *r = check_ring(L, 1);
    lua_Integer after = lua_isnoneornil(L, 2) ? (lua_Integer)r->last_seq : luaL_checkinteger(L, 2);
    lua_Integer timeout = luaL_optinteger(L, 3, -1);
    if (after < 0) after = 0;
    if (r->last_seq > (uint64_t)after) {
        lua_pushboolean(L, 1);
        return 1;
    }
    tn_task *t = tn_task_check(L);
    lb_waiter *w = waiter_add(L, &r->waiters, t, WAIT_LINE);
    w->after = (uint64_t)after;
    return tn_task_wait_cancel(L, t, timeout, waiter_cancel, w);
}

/* ring:wait_drained([timeout_ms]) -> true | nil, "timeout" | nil, "closed":
 * until every captured fd reached EOF and its last line is in the ring. */
static int l_ring_wait_drained(lua_State *L) {
    lb_ring *r = check_ring(L, 1);
    lua_Integer timeout = luaL_optinteger(L, 2, -1);
    if (r->open_fds == 0) {
        lua_pushboolean(L, 1);
        return 1;
    }
    tn_task *t = tn_task_check(L);
    lb_waiter *w = waiter_add(L, &r->waiters, t, WAIT_DRAIN);
    return tn_task_wait_cancel(L, t, timeout, waiter_cancel, w);
}

/* ring:open_fds() -> how many captured fds have not reached EOF yet */
static int l_ring_open_fds(lua_State *L) {
    lua_pushinteger(L, check_ring(L, 1)->open_fds);
    return 1;
}

/* ring:stats() -> { lines, bytes, truncated, overwritten, held, held_bytes,
 * dropped = its lines the sink dropped, waiting = its lines in the sink } */
static int l_ring_stats(lua_State *L) {
    lb_ring *r = check_ring(L, 1);
    lua_createtable(L, 0, 8);
    lua_pushinteger(L, (lua_Integer)r->last_seq); lua_setfield(L, -2, "lines");
    lua_pushinteger(L, (lua_Integer)r->total_bytes); lua_setfield(L, -2, "bytes");
    lua_pushinteger(L, (lua_Integer)r->truncated); lua_setfield(L, -2, "truncated");
    lua_pushinteger(L, (lua_Integer)r->overwritten); lua_setfield(L, -2, "overwritten");
    lua_pushinteger(L, (lua_Integer)r->count); lua_setfield(L, -2, "held");
    lua_pushinteger(L, (lua_Integer)r->held_bytes); lua_setfield(L, -2, "held_bytes");
    lua_pushinteger(L, (lua_Integer)r->tag->sink_dropped); lua_setfield(L, -2, "dropped");
    lua_pushinteger(L, (lua_Integer)r->tag->sink_pending); lua_setfield(L, -2, "waiting");
    return 1;
}

/* ring:take_waiting([max_lines=1000]) -> rows: up to max of this ring's
 * lines still waiting in its sink, oldest first, taken out of it, as
 * sink:take gives them; none waiting, or no sink: an empty table. Never
 * waits. A reader of one instance's lines has the store take that
 * instance's now, not every line a flood next to it left waiting. */
static int l_ring_take_waiting(lua_State *L) {
    lb_ring *r = check_ring(L, 1);
    lua_Integer max = luaL_optinteger(L, 2, 1000);
    luaL_argcheck(L, max >= 1, 2, "must be at least 1");
    if (!r->sink || r->sink->closed) {
        lua_newtable(L);
        return 1;
    }
    sink_push_batch(L, r->sink, max, r->tag);
    return 1;
}

static int ring_do_close(lua_State *L, int resume) {
    ring_box *b = luaL_checkudata(L, 1, RING_MT);
    lb_ring *r = b->r;
    if (!r) return 0;
    b->r = NULL;
    ring_close(r, resume);
    ring_unref(r);
    return 0;
}

/* ring:close(): stops reading, closes the fds, frees the lines, wakes
 * waiters with nil, "closed". Idempotent. */
static int l_ring_close(lua_State *L) { return ring_do_close(L, 1); }
/* Collected only with no fd open and no waiter (both anchor it), except when
 * the whole state closes: then nothing may be resumed. */
static int l_ring_gc(lua_State *L) { return ring_do_close(L, 0); }

static int l_ring_tostring(lua_State *L) {
    ring_box *b = luaL_checkudata(L, 1, RING_MT);
    if (b->r)
        lua_pushfstring(L, RING_MT " (%p, '%s', %d lines)", (void *)b->r,
                        lua_pushlstring(L, b->r->tag->s, b->r->tag->len),
                        (int)b->r->count);
    else lua_pushliteral(L, RING_MT " (closed)");
    return 1;
}

int tn_open_logbuf(lua_State *L) {
    static const luaL_Reg ring_methods[] = {
        {"capture", l_ring_capture}, {"lines", l_ring_lines}, {"last_seq", l_ring_last_seq},
        {"wait", l_ring_wait}, {"wait_drained", l_ring_wait_drained},
        {"open_fds", l_ring_open_fds}, {"stats", l_ring_stats}, {"take_waiting", l_ring_take_waiting},
        {"close", l_ring_close},
        {"__close", l_ring_close}, {"__gc", l_ring_gc}, {"__tostring", l_ring_tostring},
        {NULL, NULL},
    };
    static const luaL_Reg sink_methods[] = {
        {"take", l_sink_take}, {"stats", l_sink_stats}, {"close", l_sink_close},
        {"__close", l_sink_close}, {"__gc", l_sink_gc}, {"__tostring", l_sink_tostring},
        {NULL, NULL},
    };
    static const luaL_Reg fns[] = {
        {"pipe", l_pipe}, {"close_fd", l_close_fd}, {"sink", l_sink_new}, {"ring", l_ring_new},
        {NULL, NULL},
    };
    tn_new_class(L, RING_MT, ring_methods);
    tn_new_class(L, SINK_MT, sink_methods);
    luaL_newlib(L, fns);
    return 1;
}
