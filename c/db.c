/*
 * core.db: SQLite for the store (tokens, desired instances, routes, logs in
 * FTS5), without blocking the event loop.
 *
 * Execution model. Inside a task every statement runs on a pool thread
 * (tn_work_queue) and the task yields until it is done; outside a task
 * (CLI tools, setup code, no loop running) it runs on the calling thread.
 * A connection runs one operation at a time: operations of several tasks
 * queue FIFO per connection. Bind values are copied into C memory before the
 * work is queued, results are copied into C memory by the worker, and only
 * the loop thread turns them into Lua values: the worker never touches a
 * lua_State.
 *
 * Transactions make a connection exclusive: once BEGIN IMMEDIATE succeeded
 * for a task (the holder), the queue only dispatches the holder's
 * operations; everybody else's wait, in order, until COMMIT or ROLLBACK.
 * conn:transaction is a few lines of Lua (below, tx_lua) over two hidden C
 * primitives, because the function it runs may itself yield, which a plain
 * C function cannot wrap.
 *
 * Lifetime. A connection (db_conn) and a statement (db_stmt) are heap
 * structures the Lua handles point to. A connection is reference counted:
 * its handle, each of its statements and each operation in flight hold it,
 * so a worker never runs on freed memory. A statement closed (or collected)
 * while an operation uses it, or while the connection is busy on the thread
 * pool, is finalized later, on the loop thread, when the connection is idle:
 * the loop thread never calls into a connection the worker is using, which
 * would block the loop on SQLite's connection mutex.
 */
#include "tn.h"

#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <sqlite3.h>

#define CONN_MT "tenement.db.conn"
#define STMT_MT "tenement.db.stmt"
#define BLOB_MT "tenement.db.blob"

/* How much SQL an error message quotes. */
#define SQL_QUOTE_MAX 160

/* ---- an arena for the values of one operation ---------------------------- */

/* Bind values and results are many small pieces freed together when the
 * operation ends: one bump allocator per operation. It starts small and
 * doubles: a burst of small writes (a thousand instances started at once,
 * each remembered by the store) queues many operations at a time, and each
 * needs a few hundred bytes. */
#define ARENA_FIRST 512
typedef struct arena_chunk {
    struct arena_chunk *next;
    size_t used, cap;
} arena_chunk;

typedef struct { arena_chunk *head; size_t next_cap; } arena;

#define CHUNK_HDR ((sizeof(arena_chunk) + 15) & ~(size_t)15)

static void *arena_alloc(arena *a, size_t n) {
    n = (n + 7) & ~(size_t)7;
    arena_chunk *h = a->head;
    if (!h || h->cap - h->used < n) {
        size_t cap = a->next_cap ? a->next_cap : ARENA_FIRST - CHUNK_HDR;
        if (cap < n) cap = n;
        h = malloc(CHUNK_HDR + cap);
        if (!h) return NULL;
        h->cap = cap;
        h->used = 0;
        h->next = a->head;
        a->head = h;
        /* grow so that a big batch costs few mallocs */
        a->next_cap = cap < (1u << 20) ? cap * 2 : cap;
    }
    void *p = (char *)h + CHUNK_HDR + h->used;
    h->used += n;
    return p;
}

static char *arena_strdup(arena *a, const char *s, size_t len) {
    char *p = arena_alloc(a, len + 1);
    if (!p) return NULL;
    if (len) memcpy(p, s, len);
    p[len] = '\0';
    return p;
}

static void arena_free(arena *a) {
    arena_chunk *h = a->head;
    while (h) {
        arena_chunk *next = h->next;
        free(h);
        h = next;
    }
    a->head = NULL;
}

/* ---- values --------------------------------------------------------------- */

typedef struct {
    int type;            /* SQLITE_INTEGER, _FLOAT, _TEXT, _BLOB, _NULL */
    size_t len;
    union { sqlite3_int64 i; double d; const char *p; } u;
} db_value;

/* A named-bind table entry: a string key, or an integer key (name NULL). */
typedef struct { const char *name; lua_Integer idx; db_value v; } db_kv;

enum { BIND_LIST = 1, BIND_TABLE };

typedef struct {
    int mode;
    int n;
    db_value *vals;      /* BIND_LIST */
    db_kv *kvs;          /* BIND_TABLE */
} db_binds;

/* ---- connections, statements, operations ---------------------------------- */

typedef struct db_op db_op;
typedef struct db_stmt db_stmt;

typedef struct db_conn {
    sqlite3 *db;             /* NULL once closed */
    lua_State *L;            /* the main thread: registry work */
    uv_loop_t *loop;
    int refs;
    int closing;             /* close requested: new operations raise */
    int busy;                /* an operation is on a pool thread */
    db_op *qhead, *qtail;    /* waiting operations, FIFO */
    void *tx_owner;          /* who holds the transaction, or NULL */
    tn_task *tx_task;        /* the holder, held, when it is a task */
    db_stmt *stmts;          /* every statement not yet freed */
    char *file;              /* for tostring, read without the connection */
} db_conn;

struct db_stmt {
    sqlite3_stmt *st;        /* NULL once finalized */
    db_conn *c;
    db_stmt *prev, *next;
    int users;               /* operations queued or running on it */
    int closing;             /* its handle let go: finalize when unused */
};

typedef struct { db_conn *c; } conn_box;
typedef struct { db_stmt *s; } stmt_box;

enum op_kind {
    OP_OPEN, OP_EXEC, OP_QUERY, OP_RUN, OP_RUN_MANY, OP_PREPARE,
    OP_BEGIN, OP_COMMIT, OP_ROLLBACK, OP_CLOSE,
};

static const char *const op_names[] = {
    "open", "exec", "query", "run", "run_many", "prepare",
    "begin", "commit", "rollback", "close",
};

struct db_op {
    tn_work req;
    db_op *next;
    enum op_kind kind;
    db_conn *c;
    lua_State *L;            /* the main thread, for the anchor */
    db_stmt *s;              /* the prepared statement used, if any */
    void *owner;             /* the task, &sync_owner, or NULL (detached close) */
    tn_task *task;           /* to resume, held; NULL when synchronous */
    uint64_t seq;
    int anchor;              /* registry ref to the handle the call was made on */
    arena a;
    /* input */
    const char *sql;
    size_t sql_len;
    db_binds binds;
    db_binds *rows;          /* run_many */
    size_t nrows;
    int open_flags, busy_ms;
    /* output */
    int rc;
    char *err;               /* malloc'd message when rc != SQLITE_OK */
    int ncols;
    const char **colnames;
    db_value *vals;          /* ncols values per row, malloc'd */
    size_t nvals, capvals;
    sqlite3_int64 changes, last_id;
    sqlite3_stmt *prepared;  /* OP_PREPARE */
};

/* The transaction owner for code running outside any task. */
static char sync_owner;

static void *current_owner(lua_State *L) {
    tn_task *t = tn_task_current(L);
    return t ? (void *)t : (void *)&sync_owner;
}

/* ---- error codes ---------------------------------------------------------- */

static const char *code_name(int rc) {
    static const char *const names[] = {
        "SQLITE_OK", "SQLITE_ERROR", "SQLITE_INTERNAL", "SQLITE_PERM", "SQLITE_ABORT",
        "SQLITE_BUSY", "SQLITE_LOCKED", "SQLITE_NOMEM", "SQLITE_READONLY",
        "SQLITE_INTERRUPT", "SQLITE_IOERR", "SQLITE_CORRUPT", "SQLITE_NOTFOUND",
        "SQLITE_FULL", "SQLITE_CANTOPEN", "SQLITE_PROTOCOL", "SQLITE_EMPTY",
        "SQLITE_SCHEMA", "SQLITE_TOOBIG", "SQLITE_CONSTRAINT", "SQLITE_MISMATCH",
        "SQLITE_MISUSE", "SQLITE_NOLFS", "SQLITE_AUTH", "SQLITE_FORMAT", "SQLITE_RANGE",
        "SQLITE_NOTADB", "SQLITE_NOTICE", "SQLITE_WARNING",
    };
    int primary = rc & 0xff;
    if (primary >= 0 && primary < (int)(sizeof names / sizeof names[0])) return names[primary];
    return "SQLITE_ERROR";
}

/* Record a failure: "<op>: <what> (in: <sql>)". Runs on any thread. */
static void op_fail(db_op *op, int rc, const char *sql, const char *fmt, ...) {
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    free(op->err);
    op->rc = rc ? rc : SQLITE_ERROR;
    const char *what = op->kind == OP_OPEN ? "open" : op_names[op->kind];
    size_t n = 0;
    if (sql) {
        while (*sql == ' ' || *sql == '\n' || *sql == '\t' || *sql == '\r') sql++;
        n = strlen(sql);
        while (n && (sql[n - 1] == ' ' || sql[n - 1] == '\n' || sql[n - 1] == '\t')) n--;
    }
    /* A full, read-only or failing disk, a damaged file, one its owner's
     * permissions or another process's lock keep out: the machine's state,
     * not the statement's. The operator acts on the file, so it is named
     * instead; the statement is quoted for what would be a bug of ours. */
    int primary = op->rc & 0xff;
    int of_file = primary == SQLITE_FULL || primary == SQLITE_READONLY || primary == SQLITE_IOERR
        || primary == SQLITE_CORRUPT || primary == SQLITE_NOTADB || primary == SQLITE_CANTOPEN
        || primary == SQLITE_PERM || primary == SQLITE_BUSY;
    const char *file = of_file && op->c && op->c->file ? op->c->file : NULL;
    size_t cap = strlen(what) + strlen(msg) + SQL_QUOTE_MAX + (file ? strlen(file) : 0) + 32;
    if (op->kind == OP_OPEN) cap += op->sql_len;
    op->err = malloc(cap);
    if (!op->err) return;
    if (op->kind == OP_OPEN)
        snprintf(op->err, cap, "open %s: %s", op->sql, msg);
    else if (file)
        snprintf(op->err, cap, "%s: %s (%s)", what, msg, file);
    else if (sql && n)
        snprintf(op->err, cap, "%s: %s (in: %.*s%s)", what, msg,
                 (int)(n > SQL_QUOTE_MAX ? SQL_QUOTE_MAX : n), sql, n > SQL_QUOTE_MAX ? "..." : "");
    else
        snprintf(op->err, cap, "%s: %s", what, msg);
}

/* ---- the worker side: everything here may run on a pool thread ------------ */

static int bind_one(sqlite3_stmt *st, int i, const db_value *v) {
    switch (v->type) {
    case SQLITE_INTEGER: return sqlite3_bind_int64(st, i, v->u.i);
    case SQLITE_FLOAT: return sqlite3_bind_double(st, i, v->u.d);
    /* STATIC: the arena outlives the step, and bindings are cleared before
     * the operation ends. */
    case SQLITE_TEXT: return sqlite3_bind_text64(st, i, v->u.p, v->len, SQLITE_STATIC, SQLITE_UTF8);
    case SQLITE_BLOB: return sqlite3_bind_blob64(st, i, v->u.p, v->len, SQLITE_STATIC);
    default: return sqlite3_bind_null(st, i);
    }
}

static const db_value *kv_find(const db_binds *b, const char *pname, int i) {
    for (int k = 0; k < b->n; k++) {
        const db_kv *kv = &b->kvs[k];
        if (pname && (pname[0] == ':' || pname[0] == '@' || pname[0] == '$')) {
            if (kv->name && (strcmp(kv->name, pname + 1) == 0 || strcmp(kv->name, pname) == 0))
                return &kv->v;
        } else if (!kv->name && kv->idx == i) {
            return &kv->v;
        }
    }
    return NULL;
}

/* Positional values must match the parameters one for one; a table binds
 * each named parameter from its name (without the : @ $ prefix) and each
 * unnamed one from its index, missing entries as NULL. */
static int bind_all(db_op *op, sqlite3_stmt *st, const db_binds *b, const char *row) {
    int np = sqlite3_bind_parameter_count(st);
    if (b->mode != BIND_TABLE && b->n != np) {
        op_fail(op, SQLITE_RANGE, sqlite3_sql(st), "%s%d value%s given for %d parameter%s", row,
                b->n, b->n == 1 ? "" : "s", np, np == 1 ? "" : "s");
        return SQLITE_RANGE;
    }
    for (int i = 1; i <= np; i++) {
        const db_value *v;
        if (b->mode == BIND_TABLE) {
            v = kv_find(b, sqlite3_bind_parameter_name(st, i), i);
            if (!v) continue;
        } else {
            v = &b->vals[i - 1];
        }
        int rc = bind_one(st, i, v);
        if (rc != SQLITE_OK) {
            op_fail(op, rc, sqlite3_sql(st), "%sbind parameter %d: %s", row, i,
                    sqlite3_errmsg(sqlite3_db_handle(st)));
            return rc;
        }
    }
    return SQLITE_OK;
}

static int grab_row(db_op *op, sqlite3_stmt *st) {
    if (op->nvals + (size_t)op->ncols > op->capvals) {
        size_t cap = op->capvals ? op->capvals * 2 : 64;
        while (cap < op->nvals + (size_t)op->ncols) cap *= 2;
        db_value *v = realloc(op->vals, cap * sizeof *v);
        if (!v) return SQLITE_NOMEM;
        op->vals = v;
        op->capvals = cap;
    }
    for (int i = 0; i < op->ncols; i++) {
        db_value *v = &op->vals[op->nvals++];
        v->type = sqlite3_column_type(st, i);
        v->len = 0;
        switch (v->type) {
        case SQLITE_INTEGER: v->u.i = sqlite3_column_int64(st, i); break;
        case SQLITE_FLOAT: v->u.d = sqlite3_column_double(st, i); break;
        case SQLITE_TEXT:
        case SQLITE_BLOB: {
            const void *p = v->type == SQLITE_TEXT ? (const void *)sqlite3_column_text(st, i)
                                                   : sqlite3_column_blob(st, i);
            v->len = (size_t)sqlite3_column_bytes(st, i);
            v->u.p = arena_strdup(&op->a, p ? p : "", p ? v->len : 0);
            if (!v->u.p) return SQLITE_NOMEM;
            break;
        }
        default: v->type = SQLITE_NULL; break;
        }
    }
    return SQLITE_OK;
}

/* Bind, step to the end (collecting rows for query), count changes. */
static int step_stmt(db_op *op, sqlite3_stmt *st, const db_binds *b, int collect,
                     sqlite3_int64 *changes, const char *row) {
    sqlite3 *db = sqlite3_db_handle(st);
    int rc = bind_all(op, st, b, row);
    if (rc != SQLITE_OK) return rc;
    if (collect) {
        op->ncols = sqlite3_column_count(st);
        op->colnames = arena_alloc(&op->a, sizeof(char *) * (size_t)(op->ncols ? op->ncols : 1));
        if (!op->colnames) { op_fail(op, SQLITE_NOMEM, NULL, "out of memory"); return SQLITE_NOMEM; }
        for (int i = 0; i < op->ncols; i++) {
            const char *name = sqlite3_column_name(st, i);
            if (!name) name = "?";
            op->colnames[i] = arena_strdup(&op->a, name, strlen(name));
            if (!op->colnames[i]) { op_fail(op, SQLITE_NOMEM, NULL, "out of memory"); return SQLITE_NOMEM; }
        }
    }
    /* changes() keeps the count of the last INSERT/UPDATE/DELETE, even
     * when this statement changed nothing: compare the totals first. */
    sqlite3_int64 before = sqlite3_total_changes64(db);
    while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
        if (collect && grab_row(op, st) != SQLITE_OK) {
            op_fail(op, SQLITE_NOMEM, NULL, "out of memory");
            return SQLITE_NOMEM;
        }
    }
    if (rc != SQLITE_DONE) {
        op_fail(op, rc, sqlite3_sql(st), "%s%s", row, sqlite3_errmsg(db));
        return rc;
    }
    *changes = sqlite3_total_changes64(db) != before ? sqlite3_changes64(db) : 0;
    return SQLITE_OK;
}

/* Prepare exactly one statement from op->sql; text after it must be blank. */
static sqlite3_stmt *prepare_one(db_op *op, sqlite3 *db, unsigned flags) {
    sqlite3_stmt *st = NULL, *extra = NULL;
    const char *tail = NULL;
    int rc = sqlite3_prepare_v3(db, op->sql, (int)op->sql_len, flags, &st, &tail);
    if (rc != SQLITE_OK) {
        op_fail(op, rc, op->sql, "%s", sqlite3_errmsg(db));
        return NULL;
    }
    if (!st) {
        op_fail(op, SQLITE_MISUSE, NULL, "no SQL statement in \"%.*s\"", (int)(op->sql_len > 40 ? 40 : op->sql_len), op->sql);
        return NULL;
    }
    if (tail && *tail) {
        /* only blanks and comments may follow */
        int len = (int)(op->sql_len - (size_t)(tail - op->sql));
        rc = sqlite3_prepare_v2(db, tail, len, &extra, NULL);
        if (rc != SQLITE_OK || extra) {
            sqlite3_finalize(extra);
            sqlite3_finalize(st);
            op_fail(op, SQLITE_MISUSE, op->sql,
                    "more than one statement (use exec for scripts, prepare each statement)");
            return NULL;
        }
    }
    return st;
}

static int exec_sql(db_op *op, sqlite3 *db, const char *sql, const char *what) {
    int rc = sqlite3_exec(db, sql, NULL, NULL, NULL);
    if (rc != SQLITE_OK) op_fail(op, rc, sql, "%s%s", what, sqlite3_errmsg(db));
    return rc;
}

/* End the transaction run_many or commit opened, after a failure. An error
 * such as SQLITE_FULL may have rolled it back already. */
static void rollback_quietly(sqlite3 *db, int savepoint) {
    if (sqlite3_get_autocommit(db)) return;
    if (savepoint) sqlite3_exec(db, "ROLLBACK TO tn_run_many; RELEASE tn_run_many", NULL, NULL, NULL);
    else sqlite3_exec(db, "ROLLBACK", NULL, NULL, NULL);
}

static void stmt_finish(sqlite3_stmt *st) {
    sqlite3_reset(st);           /* ends its read transaction, if any */
    sqlite3_clear_bindings(st);  /* no pointers into the arena remain */
}

/* ---- the log index's tokenizer: no_escapes ------------------------------ */

/* Apps colour their output with terminal escapes ("\x1b[31merror\x1b[0m"),
 * and unicode61 alone reads "31merror" as one word, so a search for "error"
 * missed every coloured line. no_escapes wraps the tokenizer named after it
 * (tokenize = 'no_escapes unicode61', as porter wraps one) and hands it the
 * text with each escape sequence turned into spaces of the same length: the
 * words' offsets stay those of the stored line, which highlighting needs,
 * and the stored line keeps its bytes. Every connection core.db opens has
 * it, as must any other program that queries the index. */

typedef struct {
    fts5_tokenizer inner_api;
    Fts5Tokenizer *inner;
} no_escapes_tok;

/* Length of the escape sequence at p[0] == ESC (ECMA-48: CSI, the string
 * controls OSC/DCS/SOS/PM/APC up to BEL or ST, and the two- and three-byte
 * escapes); a sequence cut short by the end of the text runs to it. */
static size_t escape_len(const unsigned char *p, size_t n) {
    if (n < 2) return n;
    unsigned char c = p[1];
    size_t i = 2;
    if (c == '[') {
        while (i < n && p[i] >= 0x20 && p[i] <= 0x3f) i++; /* parameters, intermediates */
        if (i < n && p[i] >= 0x40 && p[i] <= 0x7e) i++;     /* the final byte */
        return i;
    }
    if (c == ']' || c == 'P' || c == 'X' || c == '^' || c == '_') {
        for (; i < n; i++) {
            if (p[i] == 0x07) return i + 1;
            if (p[i] == 0x1b) return i + 1 < n && p[i + 1] == '\\' ? i + 2 : i;
        }
        return n;
    }
    /* the rest: intermediates, then one final byte (ESC c, ESC ( B) */
    for (i = 1; i < n && p[i] >= 0x20 && p[i] <= 0x2f; i++) {}
    return i < n && p[i] >= 0x30 && p[i] <= 0x7e ? i + 1 : i;
}

/* Blanks every escape sequence of text[0, n) into out. */
static void blank_escapes(const char *text, size_t n, char *out) {
    memcpy(out, text, n);
    for (char *esc = memchr(out, 0x1b, n); esc; ) {
        size_t at = (size_t)(esc - out), len = escape_len((const unsigned char *)esc, n - at);
        memset(esc, ' ', len);
        esc = at + len < n ? memchr(out + at + len, 0x1b, n - at - len) : NULL;
    }
}

static int no_escapes_create(void *ud, const char **argv, int argc, Fts5Tokenizer **out) {
    fts5_api *api = ud;
    const char *inner_name = argc > 0 ? argv[0] : "unicode61";
    void *inner_ud = NULL;
    no_escapes_tok *t = sqlite3_malloc(sizeof *t);
    if (!t) return SQLITE_NOMEM;
    int rc = api->xFindTokenizer(api, inner_name, &inner_ud, &t->inner_api);
    if (rc == SQLITE_OK) rc = t->inner_api.xCreate(inner_ud, argc > 0 ? argv + 1 : NULL, argc > 0 ? argc - 1 : 0, &t->inner);
    if (rc != SQLITE_OK) {
        sqlite3_free(t);
        return rc;
    }
    *out = (Fts5Tokenizer *)t;
    return SQLITE_OK;
}

static void no_escapes_delete(Fts5Tokenizer *p) {
    no_escapes_tok *t = (no_escapes_tok *)p;
    t->inner_api.xDelete(t->inner);
    sqlite3_free(t);
}

static int no_escapes_tokenize(Fts5Tokenizer *p, void *ctx, int flags, const char *text, int n,
                               int (*token)(void *, int, const char *, int, int, int)) {
    no_escapes_tok *t = (no_escapes_tok *)p;
    if (n <= 0 || !memchr(text, 0x1b, (size_t)n)) return t->inner_api.xTokenize(t->inner, ctx, flags, text, n, token);
    char *blanked = sqlite3_malloc(n);
    if (!blanked) return SQLITE_NOMEM;
    blank_escapes(text, (size_t)n, blanked);
    int rc = t->inner_api.xTokenize(t->inner, ctx, flags, blanked, n, token);
    sqlite3_free(blanked);
    return rc;
}

static fts5_api *fts5_of(sqlite3 *db) {
    fts5_api *api = NULL;
    sqlite3_stmt *st = NULL;
    if (sqlite3_prepare_v2(db, "SELECT fts5(?1)", -1, &st, NULL) == SQLITE_OK) {
        sqlite3_bind_pointer(st, 1, (void *)&api, "fts5_api_ptr", NULL);
        sqlite3_step(st);
    }
    sqlite3_finalize(st);
    return api;
}

/* SQLITE_OK, or why the connection cannot have the tokenizer */
static int add_no_escapes(sqlite3 *db) {
    static fts5_tokenizer methods = { no_escapes_create, no_escapes_delete, no_escapes_tokenize };
    fts5_api *api = fts5_of(db);
    if (!api) return SQLITE_ERROR;
    return api->xCreateTokenizer(api, "no_escapes", api, &methods, NULL);
}

static void do_open(db_op *op) {
    db_conn *c = op->c;
    sqlite3 *db = NULL;
    int rc = sqlite3_open_v2(op->sql, &db, op->open_flags | SQLITE_OPEN_FULLMUTEX, NULL);
    if (rc != SQLITE_OK) {
        /* "unable to open database file" alone hides the cause the operator can act on */
        int e = db ? sqlite3_system_errno(db) : 0;
        op_fail(op, rc, NULL, "%s%s%s%s", db ? sqlite3_errmsg(db) : sqlite3_errstr(rc), e ? " (" : "",
                e ? strerror(e) : "", e ? ")" : "");
        sqlite3_close_v2(db);
        return;
    }
    sqlite3_busy_timeout(db, op->busy_ms);
    if (add_no_escapes(db) != SQLITE_OK) {
        op_fail(op, SQLITE_ERROR, NULL, "this SQLite has no FTS5, which the log index needs");
        sqlite3_close_v2(db);
        return;
    }
    const char *file = sqlite3_db_filename(db, "main");
    int readonly = (op->open_flags & SQLITE_OPEN_READONLY) != 0;
    if (!readonly && file && *file) {
        /* WAL: readers never block the writer nor each other, and a commit
         * is one append to the log. */
        sqlite3_stmt *st = NULL;
        rc = sqlite3_prepare_v2(db, "PRAGMA journal_mode=WAL", -1, &st, NULL);
        if (rc == SQLITE_OK) rc = sqlite3_step(st);
        if (rc == SQLITE_ROW) {
            const char *mode = (const char *)sqlite3_column_text(st, 0);
            if (!mode || strcmp(mode, "wal") != 0) {
                op_fail(op, SQLITE_ERROR, NULL, "cannot use WAL mode (journal_mode is %s)",
                        mode ? mode : "unknown");
                sqlite3_finalize(st);
                sqlite3_close_v2(db);
                return;
            }
            rc = SQLITE_OK;
        }
        if (rc != SQLITE_OK) {
            op_fail(op, rc, NULL, "%s", sqlite3_errmsg(db));
            sqlite3_finalize(st);
            sqlite3_close_v2(db);
            return;
        }
        sqlite3_finalize(st);
    }
    /* Durability: the contract says every accepted write is durable, so a
     * commit must survive power loss, not only a crash of ten. With WAL,
     * synchronous=NORMAL skips the fsync at commit (a power cut may roll
     * back the last transactions); FULL fsyncs the WAL on every commit. We
     * take FULL: the store's writes are few (tokens, desired instances,
     * routes), and log lines arrive in batches through run_many, which is
     * one transaction and so one fsync per batch. A checkpoint reuses the
     * WAL file but never shrinks it: the limit truncates it back after one
     * that a burst of writes grew (a flood of output made it a gigabyte). */
    rc = sqlite3_exec(db, "PRAGMA synchronous=FULL; PRAGMA foreign_keys=ON; PRAGMA journal_size_limit=67108864",
                      NULL, NULL, NULL);
    if (rc != SQLITE_OK) {
        op_fail(op, rc, NULL, "%s", sqlite3_errmsg(db));
        sqlite3_close_v2(db);
        return;
    }
    c->file = strdup(file && *file ? file : ":memory:");
    c->db = db;
}

/* Finalize every statement, then close. Statement structures stay until
 * their handles let go of them. */
static void close_db(db_conn *c) {
    for (db_stmt *s = c->stmts; s; s = s->next) {
        if (s->st) { sqlite3_finalize(s->st); s->st = NULL; }
    }
    /* close_v2 cannot fail with every statement finalized; it also rolls
     * back a transaction left open. */
    sqlite3_close_v2(c->db);
    c->db = NULL;
}

static void op_run(db_op *op) {
    db_conn *c = op->c;
    op->rc = SQLITE_OK;
    if (op->kind == OP_OPEN) { do_open(op); return; }
    sqlite3 *db = c->db;
    if (!db) { op_fail(op, SQLITE_MISUSE, NULL, "the connection is closed"); return; }
    switch (op->kind) {
    case OP_EXEC:
        exec_sql(op, db, op->sql, "");
        break;
    case OP_QUERY:
    case OP_RUN: {
        sqlite3_stmt *st = op->s ? op->s->st : prepare_one(op, db, 0);
        if (!st) {
            if (op->s) op_fail(op, SQLITE_MISUSE, NULL, "the statement is closed");
            break;
        }
        if (op->s) stmt_finish(st); /* a fresh start whatever happened before */
        if (step_stmt(op, st, &op->binds, op->kind == OP_QUERY, &op->changes, "") == SQLITE_OK)
            op->last_id = sqlite3_last_insert_rowid(db);
        if (op->s) stmt_finish(st);
        else sqlite3_finalize(st);
        break;
    }
    case OP_RUN_MANY: {
        sqlite3_stmt *st = op->s->st;
        if (!st) { op_fail(op, SQLITE_MISUSE, NULL, "the statement is closed"); break; }
        /* All rows or none: its own transaction, or a savepoint inside the
         * caller's. IMMEDIATE takes the write lock up front, so the batch
         * never fails half-way on a lock upgrade. */
        int nested = !sqlite3_get_autocommit(db);
        if (exec_sql(op, db, nested ? "SAVEPOINT tn_run_many" : "BEGIN IMMEDIATE", "") != SQLITE_OK)
            break;
        sqlite3_int64 total = 0;
        char row[32];
        for (size_t r = 0; r < op->nrows; r++) {
            sqlite3_int64 n = 0;
            stmt_finish(st);
            snprintf(row, sizeof row, "row %zu: ", r + 1);
            if (step_stmt(op, st, &op->rows[r], 0, &n, row) != SQLITE_OK) break;
            total += n;
        }
        stmt_finish(st);
        if (op->rc == SQLITE_OK &&
            exec_sql(op, db, nested ? "RELEASE tn_run_many" : "COMMIT", "") == SQLITE_OK) {
            op->changes = total;
            op->last_id = sqlite3_last_insert_rowid(db);
            break;
        }
        rollback_quietly(db, nested);
        break;
    }
    case OP_PREPARE:
        /* PERSISTENT: these are kept for the life of the store */
        op->prepared = prepare_one(op, db, SQLITE_PREPARE_PERSISTENT);
        break;
    case OP_BEGIN:
        exec_sql(op, db, "BEGIN IMMEDIATE", "");
        break;
    case OP_COMMIT:
        if (exec_sql(op, db, "COMMIT", "") != SQLITE_OK) rollback_quietly(db, 0);
        break;
    case OP_ROLLBACK:
        if (!sqlite3_get_autocommit(db)) exec_sql(op, db, "ROLLBACK", "");
        break;
    case OP_CLOSE:
        close_db(c);
        break;
    default:
        break;
    }
}

static void op_work(tn_work *req) { op_run(req->data); }

/* ---- the loop side ---------------------------------------------------------- */

static void conn_release(db_conn *c) {
    if (--c->refs > 0) return;
    if (c->db) sqlite3_close_v2(c->db); /* not reached: handles close first */
    free(c->file);
    free(c);
}

static void stmt_unlink(db_stmt *s) {
    db_conn *c = s->c;
    if (s->prev) s->prev->next = s->next;
    else c->stmts = s->next;
    if (s->next) s->next->prev = s->prev;
}

/* Free the statements nobody uses any more. Loop thread, connection idle. */
static void conn_reap(db_conn *c) {
    if (c->busy) return;
    c->refs++;
    db_stmt *s = c->stmts;
    while (s) {
        db_stmt *next = s->next;
        if (s->closing && s->users == 0) {
            if (s->st) sqlite3_finalize(s->st);
            stmt_unlink(s);
            free(s);
            conn_release(c);
        }
        s = next;
    }
    conn_release(c);
}

static void op_free(db_op *op) {
    if (op->anchor != LUA_NOREF) luaL_unref(op->L, LUA_REGISTRYINDEX, op->anchor);
    arena_free(&op->a);
    free(op->vals);
    free(op->err);
    if (op->c) conn_release(op->c);
    free(op);
}

static db_op *op_new(lua_State *L, db_conn *c, enum op_kind kind) {
    db_op *op = calloc(1, sizeof *op);
    if (!op) luaL_error(L, "out of memory");
    op->kind = kind;
    op->c = c;
    op->L = c->L;
    c->refs++;
    op->anchor = LUA_NOREF;
    op->req.data = op;
    return op;
}

static void op_effects(db_op *op) {
    db_conn *c = op->c;
    switch (op->kind) {
    case OP_BEGIN:
        if (op->rc == SQLITE_OK) {
            c->tx_owner = op->owner;
            if (op->task) c->tx_task = tn_task_hold(op->task);
        }
        break;
    case OP_COMMIT:
    case OP_ROLLBACK:
        /* whatever happened, the transaction is over (the worker rolled
         * back a failed commit) */
        c->tx_owner = NULL;
        if (c->tx_task) { tn_task_release(c->tx_task); c->tx_task = NULL; }
        break;
    default:
        break;
    }
    if (op->s) op->s->users--;
    conn_reap(c);
}

static void push_value(lua_State *L, const db_value *v) {
    switch (v->type) {
    case SQLITE_INTEGER: lua_pushinteger(L, (lua_Integer)v->u.i); break;
    case SQLITE_FLOAT: lua_pushnumber(L, (lua_Number)v->u.d); break;
    case SQLITE_TEXT:
    case SQLITE_BLOB: lua_pushlstring(L, v->u.p, v->len); break;
    default: lua_pushnil(L); break;
    }
}

static void push_conn(lua_State *L, db_conn *c) {
    conn_box *b = lua_newuserdatauv(L, sizeof *b, 0);
    b->c = c;
    c->refs++;
    luaL_setmetatable(L, CONN_MT);
}

/* Turn an operation's outcome into Lua values on L (a task's thread or the
 * caller). Loop thread only. */
static int op_push(lua_State *L, db_op *op) {
    if (op->rc != SQLITE_OK) {
        lua_checkstack(L, 3);
        lua_pushnil(L);
        if (op->err) lua_pushstring(L, op->err);
        else lua_pushstring(L, sqlite3_errstr(op->rc));
        lua_pushstring(L, code_name(op->rc));
        return 3;
    }
    lua_checkstack(L, op->ncols + 8);
    switch (op->kind) {
    case OP_OPEN:
        push_conn(L, op->c);
        return 1;
    case OP_QUERY: {
        size_t nrows = op->ncols ? op->nvals / (size_t)op->ncols : 0;
        int top = lua_gettop(L);
        for (int i = 0; i < op->ncols; i++) lua_pushstring(L, op->colnames[i]);
        lua_createtable(L, nrows > INT32_MAX ? INT32_MAX : (int)nrows, 1);
        const db_value *v = op->vals;
        for (size_t r = 0; r < nrows; r++) {
            lua_createtable(L, 0, op->ncols);
            for (int i = 0; i < op->ncols; i++, v++) {
                if (v->type == SQLITE_NULL) continue;
                lua_pushvalue(L, top + 1 + i);
                push_value(L, v);
                lua_rawset(L, -3);
            }
            lua_rawseti(L, -2, (lua_Integer)r + 1);
        }
        lua_createtable(L, op->ncols, 0);
        for (int i = 0; i < op->ncols; i++) {
            lua_pushvalue(L, top + 1 + i);
            lua_rawseti(L, -2, i + 1);
        }
        lua_setfield(L, -2, "columns");
        if (op->ncols) {
            lua_replace(L, top + 1);
            lua_settop(L, top + 1);
        }
        return 1;
    }
    case OP_RUN:
        lua_createtable(L, 0, 2);
        lua_pushinteger(L, (lua_Integer)op->changes);
        lua_setfield(L, -2, "changes");
        lua_pushinteger(L, (lua_Integer)op->last_id);
        lua_setfield(L, -2, "last_id");
        return 1;
    case OP_RUN_MANY:
        lua_pushinteger(L, (lua_Integer)op->changes);
        return 1;
    case OP_PREPARE: {
        db_stmt *s = calloc(1, sizeof *s);
        if (!s) {
            sqlite3_finalize(op->prepared);
            op->prepared = NULL;
            lua_pushnil(L);
            lua_pushliteral(L, "prepare: out of memory");
            lua_pushliteral(L, "SQLITE_NOMEM");
            return 3;
        }
        db_conn *c = op->c;
        s->st = op->prepared;
        op->prepared = NULL;
        s->c = c;
        c->refs++;
        s->next = c->stmts;
        if (c->stmts) c->stmts->prev = s;
        c->stmts = s;
        stmt_box *b = lua_newuserdatauv(L, sizeof *b, 1);
        b->s = s;
        luaL_setmetatable(L, STMT_MT);
        /* the statement keeps its connection's handle alive */
        lua_rawgeti(L, LUA_REGISTRYINDEX, op->anchor);
        lua_setiuservalue(L, -2, 1);
        return 1;
    }
    default:
        lua_pushboolean(L, 1);
        return 1;
    }
}

/* Results nobody will receive: release what they hold. */
static void op_discard(db_op *op) {
    if (op->prepared) { sqlite3_finalize(op->prepared); op->prepared = NULL; }
    if (op->kind == OP_OPEN && op->c->db) { sqlite3_close_v2(op->c->db); op->c->db = NULL; }
}

static void op_after(tn_work *req);

/* Start the next operation: the head of the queue, or while a transaction
 * is held, the holder's first one. */
static void conn_pump(db_conn *c) {
    if (c->busy) return;
    db_op *prev = NULL, *op = c->qhead;
    if (c->tx_owner) {
        while (op && op->owner != c->tx_owner) { prev = op; op = op->next; }
    }
    if (!op) return;
    if (prev) prev->next = op->next;
    else c->qhead = op->next;
    if (c->qtail == op) c->qtail = prev;
    op->next = NULL;
    c->busy = 1;
    tn_work_queue(c->loop, &op->req, op_work, op_after);
}

static void op_after(tn_work *req) {
    db_op *op = req->data;
    db_conn *c = op->c;
    if (op->kind != OP_OPEN) c->busy = 0;
    op_effects(op);
    if (op->task) {
        tn_task *t = op->task;
        if (tn_task_waiting_for(t, op->seq)) {
            int n = op_push(tn_task_thread(t), op);
            tn_task_resume(t, n);
        } else {
            op_discard(op);
        }
        tn_task_release(t);
    } else {
        op_discard(op);
    }
    /* a failed open frees the connection here, with the last reference */
    if (op->kind != OP_OPEN) conn_pump(c);
    op_free(op);
}

/* Run op now (outside a task) or queue it and yield the task. */
static int op_submit(lua_State *L, db_op *op, int anchor_idx) {
    db_conn *c = op->c;
    tn_task *t = tn_task_current(L);
    op->owner = t ? (void *)t : (void *)&sync_owner;
    lua_pushvalue(L, anchor_idx);
    op->anchor = luaL_ref(L, LUA_REGISTRYINDEX);
    if (op->s) op->s->users++;
    if (!t) {
        if (op->kind != OP_OPEN &&
            (c->busy || c->qhead || (c->tx_owner && c->tx_owner != &sync_owner))) {
            if (op->s) op->s->users--;
            op_free(op);
            return luaL_error(L, "core.db: the connection is in use by tasks; call it from a task "
                                 "(core.run/core.spawn) or wait until they are done");
        }
        op_run(op);
        op_effects(op);
        int n = op_push(L, op);
        op_free(op);
        return n;
    }
    op->task = tn_task_hold(t);
    op->seq = tn_task_seq(t);
    if (op->kind == OP_OPEN) {
        tn_work_queue(c->loop, &op->req, op_work, op_after);
    } else {
        if (c->qtail) c->qtail->next = op;
        else c->qhead = op;
        c->qtail = op;
        conn_pump(c);
    }
    lua_settop(L, 0);
    return tn_task_wait(L, t, -1);
}

/* ---- binds from Lua ------------------------------------------------------------ */

/* 0 ok, -1 not bindable, -2 out of memory */
static int value_from_lua(lua_State *L, int idx, db_value *v, arena *a) {
    v->len = 0;
    switch (lua_type(L, idx)) {
    case LUA_TNONE:
    case LUA_TNIL: v->type = SQLITE_NULL; return 0;
    case LUA_TBOOLEAN: v->type = SQLITE_INTEGER; v->u.i = lua_toboolean(L, idx); return 0;
    case LUA_TNUMBER:
        if (lua_isinteger(L, idx)) { v->type = SQLITE_INTEGER; v->u.i = lua_tointeger(L, idx); }
        else { v->type = SQLITE_FLOAT; v->u.d = lua_tonumber(L, idx); }
        return 0;
    case LUA_TSTRING: {
        size_t len;
        const char *s = lua_tolstring(L, idx, &len);
        v->type = SQLITE_TEXT;
        v->len = len;
        v->u.p = arena_strdup(a, s, len);
        return v->u.p ? 0 : -2;
    }
    case LUA_TUSERDATA:
        if (luaL_testudata(L, idx, BLOB_MT)) {
            size_t len;
            lua_getiuservalue(L, idx, 1);
            const char *s = lua_tolstring(L, -1, &len);
            v->type = SQLITE_BLOB;
            v->len = len;
            v->u.p = arena_strdup(a, s, len);
            lua_pop(L, 1);
            return v->u.p ? 0 : -2;
        }
        return -1;
    default:
        return -1;
    }
}

static int bind_raise(lua_State *L, db_op *op, int rc, const char *where, int idx) {
    const char *tname = luaL_typename(L, idx);
    op_free(op);
    if (rc == -2) return luaL_error(L, "out of memory");
    return luaL_error(L, "core.db: cannot bind %s %s (bind nil, booleans, numbers, strings "
                         "or core.db.blob(s))", tname, where);
}

/* The table at idx into b (kvs). Raises on keys or values it cannot bind. */
static void table_binds(lua_State *L, db_op *op, int idx, db_binds *b, const char *row) {
    idx = lua_absindex(L, idx);
    int n = 0;
    lua_pushnil(L);
    while (lua_next(L, idx)) { n++; lua_pop(L, 1); }
    b->mode = BIND_TABLE;
    b->n = 0;
    b->kvs = n ? arena_alloc(&op->a, sizeof(db_kv) * (size_t)n) : NULL;
    if (n && !b->kvs) { op_free(op); luaL_error(L, "out of memory"); }
    lua_pushnil(L);
    while (lua_next(L, idx)) {
        db_kv *kv = &b->kvs[b->n];
        int kt = lua_type(L, -2);
        if (kt == LUA_TSTRING) {
            size_t len;
            const char *k = lua_tolstring(L, -2, &len);
            kv->name = arena_strdup(&op->a, k, len);
            if (!kv->name) { op_free(op); luaL_error(L, "out of memory"); }
            kv->idx = 0;
        } else if (kt == LUA_TNUMBER && lua_isinteger(L, -2)) {
            kv->name = NULL;
            kv->idx = lua_tointeger(L, -2);
        } else {
            const char *tname = luaL_typename(L, -2);
            op_free(op);
            luaL_error(L, "core.db: bind table %skeys must be names or indices, not %s", row, tname);
        }
        int rc = value_from_lua(L, -1, &kv->v, &op->a);
        if (rc) {
            const char *where = kt == LUA_TSTRING
                ? lua_pushfstring(L, "%sfor '%s'", row, lua_tostring(L, -2))
                : lua_pushfstring(L, "%sat index %d", row, (int)lua_tointeger(L, -2));
            bind_raise(L, op, rc, where, -2);
        }
        b->n++;
        lua_pop(L, 1);
    }
}

/* Binds given to query/run: one table (named or by index), or values. */
static void args_binds(lua_State *L, db_op *op, int first, db_binds *b) {
    int top = lua_gettop(L);
    int n = top - first + 1;
    if (n <= 0) { b->mode = BIND_LIST; b->n = 0; return; }
    if (n == 1 && lua_type(L, first) == LUA_TTABLE) { table_binds(L, op, first, b, ""); return; }
    b->mode = BIND_LIST;
    b->n = n;
    b->vals = arena_alloc(&op->a, sizeof(db_value) * (size_t)n);
    if (!b->vals) { op_free(op); luaL_error(L, "out of memory"); }
    for (int i = 0; i < n; i++) {
        int rc = value_from_lua(L, first + i, &b->vals[i], &op->a);
        if (rc) bind_raise(L, op, rc, lua_pushfstring(L, "as value #%d", i + 1), first + i);
    }
}

/* ---- handles ---------------------------------------------------------------- */

/* The connection of the handle at idx, usable by the caller: raises when it
 * is closed or closing (its transaction holder may still finish). */
static db_conn *check_conn(lua_State *L, int idx) {
    conn_box *b = luaL_checkudata(L, idx, CONN_MT);
    db_conn *c = b->c;
    if (!c || !c->db || (c->closing && c->tx_owner != current_owner(L)))
        luaL_error(L, "core.db: the connection is closed");
    return c;
}

static db_stmt *check_stmt(lua_State *L, int idx) {
    stmt_box *b = luaL_checkudata(L, idx, STMT_MT);
    db_stmt *s = b->s;
    if (!s) luaL_error(L, "core.db: the statement is closed");
    db_conn *c = s->c;
    if (!c->db || !s->st || (c->closing && c->tx_owner != current_owner(L)))
        luaL_error(L, "core.db: the statement's connection is closed");
    return s;
}

/* db.open(path [, {readonly=false, busy_timeout_ms=5000}]) -> conn | nil, err, code */
static int l_db_open(lua_State *L) {
    size_t len;
    const char *path = luaL_checklstring(L, 1, &len);
    int readonly = 0;
    lua_Integer busy_ms = 5000;
    if (!lua_isnoneornil(L, 2)) {
        luaL_checktype(L, 2, LUA_TTABLE);
        lua_getfield(L, 2, "readonly");
        if (!lua_isnil(L, -1)) {
            luaL_argexpected(L, lua_isboolean(L, -1), 2, "boolean readonly");
            readonly = lua_toboolean(L, -1);
        }
        lua_getfield(L, 2, "busy_timeout_ms");
        if (!lua_isnil(L, -1)) {
            luaL_argcheck(L, lua_isinteger(L, -1) && lua_tointeger(L, -1) >= 0 &&
                             lua_tointeger(L, -1) <= INT32_MAX, 2,
                          "busy_timeout_ms must be a non-negative integer");
            busy_ms = lua_tointeger(L, -1);
        }
        lua_pop(L, 2);
    }
    if (!sqlite3_threadsafe())
        return luaL_error(L, "core.db: SQLite is built without thread support");
    uv_loop_t *loop = tn_loop(L);
    lua_rawgeti(L, LUA_REGISTRYINDEX, LUA_RIDX_MAINTHREAD);
    lua_State *main = lua_tothread(L, -1);
    lua_pop(L, 1);
    db_conn *c = calloc(1, sizeof *c);
    if (!c) return luaL_error(L, "out of memory");
    c->L = main;
    c->loop = loop;
    /* the operation holds the only reference: a failed open frees c with it */
    db_op *op = op_new(L, c, OP_OPEN);
    op->sql = arena_strdup(&op->a, path, len);
    if (!op->sql) { op_free(op); return luaL_error(L, "out of memory"); }
    op->sql_len = len;
    op->open_flags = readonly ? SQLITE_OPEN_READONLY : (SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE);
    op->busy_ms = (int)busy_ms;
    return op_submit(L, op, 1);
}

/* conn:exec(sql) -> true | nil, err, code: a script of statements, no results */
static int l_conn_exec(lua_State *L) {
    db_conn *c = check_conn(L, 1);
    size_t len;
    const char *sql = luaL_checklstring(L, 2, &len);
    db_op *op = op_new(L, c, OP_EXEC);
    op->sql = arena_strdup(&op->a, sql, len);
    if (!op->sql) { op_free(op); return luaL_error(L, "out of memory"); }
    op->sql_len = len;
    return op_submit(L, op, 1);
}

static int conn_oneshot(lua_State *L, enum op_kind kind) {
    db_conn *c = check_conn(L, 1);
    size_t len;
    const char *sql = luaL_checklstring(L, 2, &len);
    db_op *op = op_new(L, c, kind);
    op->sql = arena_strdup(&op->a, sql, len);
    if (!op->sql) { op_free(op); return luaL_error(L, "out of memory"); }
    op->sql_len = len;
    args_binds(L, op, 3, &op->binds);
    return op_submit(L, op, 1);
}

/* conn:query(sql, ...) -> rows | nil, err, code */
static int l_conn_query(lua_State *L) { return conn_oneshot(L, OP_QUERY); }
/* conn:run(sql, ...) -> {changes=, last_id=} | nil, err, code */
static int l_conn_run(lua_State *L) { return conn_oneshot(L, OP_RUN); }

/* conn:prepare(sql) -> stmt | nil, err, code */
static int l_conn_prepare(lua_State *L) {
    db_conn *c = check_conn(L, 1);
    size_t len;
    const char *sql = luaL_checklstring(L, 2, &len);
    db_op *op = op_new(L, c, OP_PREPARE);
    op->sql = arena_strdup(&op->a, sql, len);
    if (!op->sql) { op_free(op); return luaL_error(L, "out of memory"); }
    op->sql_len = len;
    return op_submit(L, op, 1);
}

/* begin(conn) -> true | nil, err, code: the first half of conn:transaction */
static int l_tx_begin(lua_State *L) {
    db_conn *c = check_conn(L, 1);
    if (c->tx_owner && c->tx_owner == current_owner(L))
        return luaL_error(L, "core.db: transaction inside a transaction on the same connection "
                             "(nested transactions are not supported; use SAVEPOINT in exec)");
    return op_submit(L, op_new(L, c, OP_BEGIN), 1);
}

/* finish(conn, commit) -> true | nil, err, code */
static int l_tx_finish(lua_State *L) {
    db_conn *c = check_conn(L, 1);
    int commit = lua_toboolean(L, 2);
    if (c->tx_owner != current_owner(L))
        return luaL_error(L, "core.db: no transaction of this caller to finish");
    lua_settop(L, 1);
    return op_submit(L, op_new(L, c, commit ? OP_COMMIT : OP_ROLLBACK), 1);
}

/* Close now if idle, else queue the close behind the work already waiting.
 * wait: yield the calling task until it is done (close() in a task). */
static int conn_close(lua_State *L, conn_box *b, int wait) {
    db_conn *c = b->c;
    if (!c || c->closing || !c->db) return 0;
    tn_task *t = tn_task_current(L);
    c->closing = 1;
    /* A transaction's holder between two statements leaves the connection
     * with nothing queued, yet it is not idle: closing now would roll the
     * transaction back under the holder. */
    int idle = !c->busy && !c->qhead && !c->tx_owner;
    if (idle && !(wait && t)) {
        close_db(c);
        conn_reap(c);
        return 0;
    }
    db_op *op = op_new(L, c, OP_CLOSE);
    if (wait && t) return op_submit(L, op, 1);
    /* nobody waits for it; it runs after what is queued (and after the
     * transaction in progress, since it belongs to no holder) */
    op->owner = NULL;
    if (c->qtail) c->qtail->next = op;
    else c->qhead = op;
    c->qtail = op;
    conn_pump(c);
    return 0;
}

/* conn:close() -> true. Closing is orderly: operations already queued by
 * other tasks (and a transaction in progress) finish first; from then on the
 * connection raises. In a task, close waits for all that; outside a task it
 * returns at once and the close completes when the loop has run the queued
 * work. Closing inside one's own transaction raises. */
static int l_conn_close(lua_State *L) {
    conn_box *b = luaL_checkudata(L, 1, CONN_MT);
    db_conn *c = b->c;
    if (c && c->db && !c->closing && c->tx_owner && c->tx_owner == current_owner(L))
        return luaL_error(L, "core.db: close inside this caller's own transaction "
                             "(return from the transaction function first)");
    lua_settop(L, 1);
    int n = conn_close(L, b, 1);
    if (n) return n;
    lua_pushboolean(L, 1);
    return 1;
}

/* __close: like close, never waits (a __close must not yield) */
static int l_conn_tbc(lua_State *L) {
    conn_box *b = luaL_checkudata(L, 1, CONN_MT);
    conn_close(L, b, 0);
    return 0;
}

static int l_conn_gc(lua_State *L) {
    conn_box *b = luaL_checkudata(L, 1, CONN_MT);
    db_conn *c = b->c;
    if (!c) return 0;
    if (c->db && !c->closing) {
        if (c->busy || c->qhead) {
            /* Only at lua_close: operations anchor the handle otherwise.
             * A worker may still use the connection: leave it to the exit. */
            b->c = NULL;
            return 0;
        }
        c->closing = 1;
        close_db(c);
        conn_reap(c);
    }
    b->c = NULL;
    conn_release(c);
    return 0;
}

static int l_conn_tostring(lua_State *L) {
    conn_box *b = luaL_checkudata(L, 1, CONN_MT);
    if (b->c && b->c->db && !b->c->closing)
        lua_pushfstring(L, "tenement.db.conn (%s)", b->c->file ? b->c->file : "?");
    else lua_pushliteral(L, "tenement.db.conn (closed)");
    return 1;
}

/* stmt:query(...) -> rows | nil, err, code; stmt:run(...) -> {changes, last_id} */
static int stmt_exec(lua_State *L, enum op_kind kind) {
    db_stmt *s = check_stmt(L, 1);
    db_op *op = op_new(L, s->c, kind);
    op->s = s;
    args_binds(L, op, 2, &op->binds);
    return op_submit(L, op, 1);
}

static int l_stmt_query(lua_State *L) { return stmt_exec(L, OP_QUERY); }
static int l_stmt_run(lua_State *L) { return stmt_exec(L, OP_RUN); }

/* stmt:run_many({binds, ...}) -> total changes | nil, err, code. One worker
 * trip, one transaction: all rows or none. */
static int l_stmt_run_many(lua_State *L) {
    db_stmt *s = check_stmt(L, 1);
    luaL_checktype(L, 2, LUA_TTABLE);
    lua_Integer n = luaL_len(L, 2);
    db_op *op = op_new(L, s->c, OP_RUN_MANY);
    op->s = s;
    op->nrows = (size_t)(n > 0 ? n : 0);
    if (op->nrows) {
        op->rows = arena_alloc(&op->a, sizeof(db_binds) * op->nrows);
        if (!op->rows) { op_free(op); return luaL_error(L, "out of memory"); }
    }
    luaL_checkstack(L, 8, NULL);
    for (size_t r = 0; r < op->nrows; r++) {
        char row[32];
        snprintf(row, sizeof row, "row %zu ", r + 1);
        if (lua_rawgeti(L, 2, (lua_Integer)r + 1) != LUA_TTABLE) {
            const char *tname = luaL_typename(L, -1);
            op_free(op);
            return luaL_error(L, "core.db: run_many: row %d is a %s, not a table of binds",
                              (int)r + 1, tname);
        }
        table_binds(L, op, -1, &op->rows[r], row);
        lua_pop(L, 1);
    }
    if (op->nrows == 0) { op_free(op); lua_pushinteger(L, 0); return 1; }
    lua_settop(L, 1);
    return op_submit(L, op, 1);
}

static void stmt_close(lua_State *L, stmt_box *b) {
    (void)L;
    db_stmt *s = b->s;
    if (!s) return;
    b->s = NULL;
    s->closing = 1;
    conn_reap(s->c); /* now, or when the connection is next idle */
}

/* stmt:close() -> true; idempotent */
static int l_stmt_close(lua_State *L) {
    stmt_close(L, luaL_checkudata(L, 1, STMT_MT));
    lua_pushboolean(L, 1);
    return 1;
}

static int l_stmt_gc(lua_State *L) {
    stmt_close(L, luaL_checkudata(L, 1, STMT_MT));
    return 0;
}

static int l_stmt_tostring(lua_State *L) {
    stmt_box *b = luaL_checkudata(L, 1, STMT_MT);
    if (b->s && b->s->st) lua_pushfstring(L, "tenement.db.stmt (%s)", sqlite3_sql(b->s->st));
    else lua_pushliteral(L, "tenement.db.stmt (closed)");
    return 1;
}

/* db.blob(s) -> a value that binds as a BLOB instead of TEXT */
static int l_db_blob(lua_State *L) {
    luaL_checktype(L, 1, LUA_TSTRING);
    lua_newuserdatauv(L, 0, 1);
    lua_pushvalue(L, 1);
    lua_setiuservalue(L, -2, 1);
    luaL_setmetatable(L, BLOB_MT);
    return 1;
}

static int l_blob_tostring(lua_State *L) {
    luaL_checkudata(L, 1, BLOB_MT);
    lua_getiuservalue(L, 1, 1);
    return 1;
}

static int l_blob_len(lua_State *L) {
    luaL_checkudata(L, 1, BLOB_MT);
    lua_getiuservalue(L, 1, 1);
    lua_pushinteger(L, (lua_Integer)lua_rawlen(L, -1));
    return 1;
}

/* conn:transaction(fn) -> results of fn | nil, err, code. BEGIN IMMEDIATE,
 * fn(conn), COMMIT. ROLLBACK when fn returns nil (then: nil, err[, code] of
 * fn) or raises (the error is re-raised after the rollback). fn returning
 * nothing gives true. Runs fn in Lua, where it may yield. */
static const char tx_lua[] =
    "local begin, finish = ...\n"
    "local pack, unpack, pcall, error, type = table.pack, table.unpack, pcall, error, type\n"
    "return function(conn, fn)\n"
    "  if type(fn) ~= 'function' then\n"
    "    error(\"bad argument #1 to 'transaction' (function expected, got \" .. type(fn) .. ')', 2)\n"
    "  end\n"
    "  local ok, err, code = begin(conn)\n"
    "  if not ok then return nil, err, code end\n"
    "  local r = pack(pcall(fn, conn))\n"
    "  if not r[1] then\n"
    "    finish(conn, false)\n"
    "    error(r[2], 0)\n"
    "  end\n"
    "  if r.n >= 2 and r[2] == nil then\n"
    "    finish(conn, false)\n"
    "    return nil, r[3] == nil and 'transaction: aborted by the function' or r[3], r[4]\n"
    "  end\n"
    "  ok, err, code = finish(conn, true)\n"
    "  if not ok then return nil, err, code end\n"
    "  if r.n == 1 then return true end\n"
    "  return unpack(r, 2, r.n)\n"
    "end\n";

/* ---- db.tokens: what the full-text index makes of a text ---------------- */

/* A connection of its own, in memory, used on the loop's thread only: FTS5
 * hands its tokenizers out through a connection, and the store's may be busy
 * on a pool thread. Opened once, kept for the process. */
static sqlite3 *tokens_db;
static fts5_tokenizer tokens_api;
static void *tokens_ud;

static int tokens_ready(const char **err) {
    if (tokens_db) return 1;
    sqlite3 *db = NULL;
    int rc = sqlite3_open_v2(":memory:", &db, SQLITE_OPEN_READWRITE, NULL);
    if (rc != SQLITE_OK) {
        *err = sqlite3_errstr(rc); /* static: the connection's message goes with it */
        sqlite3_close_v2(db);
        return 0;
    }
    fts5_api *api = fts5_of(db);
    if (!api || add_no_escapes(db) != SQLITE_OK
        || api->xFindTokenizer(api, "no_escapes", &tokens_ud, &tokens_api) != SQLITE_OK) {
        *err = "this SQLite has no FTS5 unicode61 tokenizer";
        sqlite3_close_v2(db);
        return 0;
    }
    tokens_db = db;
    return 1;
}

/* The tokens, each as where it is in the text (start, end), its length,
 * then its bytes: gathered in C, since a Lua error raised inside the
 * tokenizer would jump over its xDelete. */
typedef struct { char *p; size_t len, cap; } tokens_buf;

static int tokens_cb(void *ctx, int flags, const char *token, int len, int start, int end) {
    (void)flags;
    tokens_buf *o = ctx;
    uint32_t n = (uint32_t)len, at[2] = { (uint32_t)start, (uint32_t)end };
    size_t need = o->len + sizeof at + sizeof n + n;
    if (need > o->cap) {
        size_t cap = o->cap ? o->cap : 256;
        while (cap < need) cap *= 2;
        char *p = realloc(o->p, cap);
        if (!p) return SQLITE_NOMEM;
        o->p = p;
        o->cap = cap;
    }
    memcpy(o->p + o->len, at, sizeof at);
    memcpy(o->p + o->len + sizeof at, &n, sizeof n);
    memcpy(o->p + o->len + sizeof at + sizeof n, token, n);
    o->len = need;
    return SQLITE_OK;
}

/* db.tokens(text [, spans]) -> { token... } [, { first, last, ... }]: the
 * tokens the log index (no_escapes over FTS5's unicode61, as the store
 * configures it) makes of text, as a query would. A word that gives none
 * (punctuation, in any script) matches no line. With spans, also where each
 * token lies in text (string.sub positions, two per token), which
 * highlighting needs. */
static int l_db_tokens(lua_State *L) {
    size_t len;
    const char *text = luaL_checklstring(L, 1, &len);
    int spans = lua_toboolean(L, 2);
    if (len > INT_MAX) return luaL_argerror(L, 1, "too long");
    const char *err = NULL;
    if (!tokens_ready(&err)) return luaL_error(L, "core.db.tokens: %s", err);
    Fts5Tokenizer *t = NULL;
    if (tokens_api.xCreate(tokens_ud, NULL, 0, &t) != SQLITE_OK)
        return luaL_error(L, "core.db.tokens: cannot make a unicode61 tokenizer");
    static _Thread_local tokens_buf out; /* kept: its capacity serves the next call */
    out.len = 0;
    int rc = tokens_api.xTokenize(t, &out, FTS5_TOKENIZE_QUERY, text, (int)len, tokens_cb);
    tokens_api.xDelete(t);
    if (rc != SQLITE_OK) return luaL_error(L, "core.db.tokens: %s", sqlite3_errstr(rc));
    lua_newtable(L);
    if (spans) lua_newtable(L);
    int tokens = spans ? -2 : -1;
    for (size_t at = 0, i = 1; at < out.len; i++) {
        uint32_t where[2], n;
        memcpy(where, out.p + at, sizeof where);
        memcpy(&n, out.p + at + sizeof where, sizeof n);
        lua_pushlstring(L, out.p + at + sizeof where + sizeof n, n);
        lua_rawseti(L, tokens - 1, (lua_Integer)i);
        if (spans) {
            lua_pushinteger(L, (lua_Integer)where[0] + 1);
            lua_rawseti(L, -2, (lua_Integer)(2 * i - 1));
            lua_pushinteger(L, (lua_Integer)where[1]);
            lua_rawseti(L, -2, (lua_Integer)(2 * i));
        }
        at += sizeof where + sizeof n + n;
    }
    return spans ? 2 : 1;
}

int tn_open_db(lua_State *L) {
    static const luaL_Reg conn_methods[] = {
        {"exec", l_conn_exec}, {"query", l_conn_query}, {"run", l_conn_run},
        {"prepare", l_conn_prepare}, {"close", l_conn_close}, {"__close", l_conn_tbc},
        {"__gc", l_conn_gc}, {"__tostring", l_conn_tostring}, {NULL, NULL},
    };
    static const luaL_Reg stmt_methods[] = {
        {"query", l_stmt_query}, {"run", l_stmt_run}, {"run_many", l_stmt_run_many},
        {"close", l_stmt_close}, {"__close", l_stmt_gc}, {"__gc", l_stmt_gc},
        {"__tostring", l_stmt_tostring}, {NULL, NULL},
    };
    static const luaL_Reg blob_methods[] = {
        {"__tostring", l_blob_tostring}, {"__len", l_blob_len}, {NULL, NULL},
    };
    static const luaL_Reg fns[] = {
        {"open", l_db_open}, {"blob", l_db_blob}, {"tokens", l_db_tokens}, {NULL, NULL},
    };
    tn_new_class(L, CONN_MT, conn_methods);
    tn_new_class(L, STMT_MT, stmt_methods);
    tn_new_class(L, BLOB_MT, blob_methods);

    luaL_getmetatable(L, CONN_MT);
    if (luaL_loadbuffer(L, tx_lua, sizeof tx_lua - 1, "=core.db.transaction") != LUA_OK)
        return lua_error(L);
    lua_pushcfunction(L, l_tx_begin);
    lua_pushcfunction(L, l_tx_finish);
    lua_call(L, 2, 1);
    lua_setfield(L, -2, "transaction");
    lua_pop(L, 1);

    luaL_newlib(L, fns);
    lua_pushstring(L, sqlite3_libversion());
    lua_setfield(L, -2, "sqlite_version");
    return 1;
}
