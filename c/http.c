/*
 * core.http: HTTP/1.1 on llhttp (strict: no lenient flag is ever set), a
 * server, a client, and the reverse proxy of the front door.
 *
 * Server. The connection state machine lives here in C; Lua is called once
 * per request. Each request head is parsed into an http_head (method,
 * target, version and headers with their names as sent, in one arena, so
 * the proxy can re-serialise it), then the parser pauses and a task calls
 * the Lua handler with a request object. The body is parsed only when the
 * handler asks for it (req:body, req:proxy) or, after the response, to
 * discard it. The next pipelined request is parsed only once the response
 * went out, so responses keep request order and a client cannot queue up
 * work (while a handler runs, up to 16 KiB more are read and kept, which
 * is how a client that goes away is noticed).
 *
 *   phase HEAD   reading a head (timer: header timeout once a byte came,
 *                or idle timeout between keep-alive requests)
 *   phase BODY   the handler runs; the parser is paused at the end of the
 *                head until body(), proxy() or the finished response
 *                resumes it
 *   phase LINGER after a response with Connection: close (or an error): FIN
 *                sent, input read and dropped until EOF or a short timer, so
 *                the client sees the response rather than a reset
 *   phase TUNNEL after a proxied 101: raw bytes both ways
 *
 * A plain head with no body (a request) or one framed by Content-Length (a
 * response to the proxy) is read by the lean parser of head.c instead,
 * which fills the same http_head (target, names and values in its arena)
 * and hands every other head back to llhttp untouched: conn_exec_plain,
 * px_up_plain.
 *
 * llhttp lets a few things through that a proxy in front of other servers
 * must refuse (request smuggling): obsolete line folding, bare LF, white
 * space before the colon, HTTP versions other than 1.0 and 1.1, and any
 * Transfer-Encoding other than exactly "chunked". Those are checked here,
 * on the raw bytes of the head and on the parsed head, before the handler
 * (so before any req:proxy).
 *
 * Client. One exchange per connection (Connection: close): http.request.
 *
 * Proxy. In a handler (best with the server option lazy_body = true, so the
 * body is still unread):
 *
 *   req:proxy(opts) -> stats | nil, err, code
 *     opts.path            Unix socket of the upstream (or opts.host and
 *                          opts.port for TCP; host numeric or "localhost")
 *     opts.timeout         ms without progress (default 60000): waiting for
 *                          the response head, or a stalled body either way
 *     opts.connect_timeout ms to connect (default 5000)
 *     opts.headers         extra request headers, set (they replace the
 *                          client's of the same name): { name = value } or
 *                          { {name, value}, ... }; framing and hop-by-hop
 *                          names raise
 *     opts.forwarded_proto "http" (default) or "https", for X-Forwarded-Proto
 *     opts.idle_pool       idle keep-alive connections kept for this
 *                          upstream (default 16)
 *   Unknown options raise. It yields the calling task until the exchange is
 *   over and returns stats = { status, bytes_in (request body bytes, and
 *   client->upstream bytes of a tunnel), bytes_out (bytes written to the
 *   client), upstream_ms (to the response head, float), reused (a pooled
 *   connection), upgraded }.
 *   Failures return nil, err, code; req.responded tells whether the client
 *   got anything:
 *     - not responded (the handler answers, e.g. 502, or retries req:proxy,
 *       the body still unread): connect errors ("ENOENT", "ECONNREFUSED",
 *       "ETIMEDOUT" after connect_timeout), the upstream closing or failing
 *       before its response head ("ECONNRESET"), a malformed response head
 *       ("EPROTO");
 *     - responded: "timeout"/"ETIMEDOUT" (the proxy answered 504, or 408 when
 *       the client's body stalled), a malformed or too large request body
 *       ("EPROTO"/"E2BIG", answered 400/413), a failure after the response
 *       started (the client connection is closed, "ECONNRESET" or
 *       "ETIMEDOUT");
 *     - "client closed"/"ECONNABORTED": the client went away (a FIN with no
 *       pipelined request behind it counts, as in nginx); the upstream
 *       connection is closed too and there is nobody left to answer.
 *   A pooled connection found closed by the upstream before any response
 *   byte is retried once on a fresh one when no body byte was sent yet
 *   (a body the handler had read, lazy_body off, can always be sent again).
 *   The head sent upstream is rebuilt from the parsed one: the original
 *   target, HTTP/1.1, every header but the hop-by-hop ones (Connection,
 *   Keep-Alive, Proxy-Connection, TE, Trailer, Transfer-Encoding, Upgrade
 *   unless tunnelling, Expect, and those the client's Connection names),
 *   Host as sent, X-Forwarded-For (appended to), X-Forwarded-Proto and
 *   X-Forwarded-Host (replaced), Connection: keep-alive. Bodies stream both
 *   ways with backpressure; Content-Length is kept, chunked is decoded and
 *   re-chunked (trailers dropped); a response without a length goes to
 *   HTTP/1.1 clients chunked and to HTTP/1.0 ones delimited by the close.
 *   1xx interim responses are dropped (the proxy answers 100-continue
 *   itself when it starts reading the body). A 101 to a request with
 *   Connection: upgrade + Upgrade turns both connections into a tunnel
 *   until either side closes. The server's max_body still applies.
 *
 *   http.pool_stats() -> { [path or "ip:port"] = { idle = n, active = n } }
 *   http.pool_close(path | {path=} | {host=, port=}) -> n idle connections
 *     closed; those in use are closed when their exchange ends.
 *   Idle pooled connections close after 30 s, or when the upstream closes
 *   them.
 *
 * Lifetimes. A connection's memory goes in the close callback of its last
 * libuv handle. A request (http_req) is reference counted: the connection
 * holds it while it is current, the Lua request object and a proxy
 * exchange while they live. The server struct is counted by its Lua object
 * and each connection; its Lua object is anchored in the registry while it
 * accepts, so a server nobody references keeps serving until closed.
 */
#include "head.h"
#include "net.h"

#include <llhttp.h>

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#define SERVER_MT "tenement.http.server"
#define REQUEST_MT "tenement.http.request"

#define LINGER_MS 2000
#define SCRATCH_SIZE (64 * 1024)

static _Thread_local char scratch[SCRATCH_SIZE];
static char spawn_key;  /* registry: core.spawn, for starting handler tasks from C */

/* ---- growable byte buffers ------------------------------------------- */

typedef struct buf { char *p; size_t len, cap; } buf;

static int buf_reserve(buf *b, size_t extra) {
    if (b->cap - b->len >= extra) return 0;
    size_t cap = b->cap ? b->cap : 256;
    while (cap - b->len < extra) cap *= 2;
    char *p = realloc(b->p, cap);
    if (!p) return -1;
    b->p = p;
    b->cap = cap;
    return 0;
}

static int buf_add(buf *b, const void *p, size_t n) {
    if (n == 0) return 0;
    if (buf_reserve(b, n)) return -1;
    memcpy(b->p + b->len, p, n);
    b->len += n;
    return 0;
}

static int buf_addstr(buf *b, const char *s) { return buf_add(b, s, strlen(s)); }

static int buf_printf(buf *b, const char *fmt, ...) {
    char tmp[256];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    if (n < 0) return -1;
    return buf_add(b, tmp, (size_t)n < sizeof tmp ? (size_t)n : sizeof tmp - 1);
}

/* "name: value\r\n" with one reservation (heads are built field by field). */
static void buf_field(buf *b, const char *name, size_t nl, const char *val, size_t vl) {
    size_t need = nl + vl + 4;
    if (b->cap - b->len < need && buf_reserve(b, need)) return;
    char *d = b->p + b->len;
    memcpy(d, name, nl);
    d += nl;
    *d++ = ':';
    *d++ = ' ';
    memcpy(d, val, vl);
    d += vl;
    *d++ = '\r';
    *d++ = '\n';
    b->len += need;
}

static void buf_uint(buf *b, uint64_t v) {
    char tmp[24];
    int i = sizeof tmp;
    do {
        tmp[--i] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    buf_add(b, tmp + i, sizeof tmp - (size_t)i);
}

/* A chunk-size line, "1a2b\r\n", into out (at least 20 bytes); its length. */
static size_t chunk_line(char *out, size_t n) {
    static const char hex[] = "0123456789abcdef";
    char tmp[20];
    int i = sizeof tmp;
    do {
        tmp[--i] = hex[n & 15];
        n >>= 4;
    } while (n);
    size_t len = sizeof tmp - (size_t)i;
    memcpy(out, tmp + i, len);
    out[len] = '\r';
    out[len + 1] = '\n';
    return len + 2;
}

static void buf_free(buf *b) {
    free(b->p);
    b->p = NULL;
    b->len = b->cap = 0;
}

/* ---- tokens, reasons, dates ------------------------------------------- */

static int is_tchar(unsigned char ch) { return head_class[ch] & HEAD_TCHAR; }

static int is_token(const char *s, size_t n) {
    if (n == 0) return 0;
    for (size_t i = 0; i < n; i++)
        if (!is_tchar((unsigned char)s[i])) return 0;
    return 1;
}

/* A header value may not hold CR, LF or NUL: they would split the message. */
static int is_field_value(const char *s, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (s[i] == '\r' || s[i] == '\n' || s[i] == '\0') return 0;
    return 1;
}

/* a[0, n) is lower[0, n) (given in lower case), ignoring case */
static int ieq_n(const char *a, const char *lower, size_t n) {
    for (size_t i = 0; i < n; i++) {
        char x = a[i];
        if (x >= 'A' && x <= 'Z') x = (char)(x + 32);
        if (x != lower[i]) return 0;
    }
    return 1;
}

static int ieq(const char *a, size_t an, const char *b) { return an == strlen(b) && ieq_n(a, b, an); }

/* Walk a Lua headers table: { name = value | {values...} } or an array of
 * { name, value } pairs. Names must be tokens, values strings or numbers
 * without CR, LF or NUL; anything else raises (a caller's bug). */
typedef void (*header_fn)(const char *name, size_t nl, const char *val, size_t vl, void *ud);

static void header_entry(lua_State *L, int nidx, int vidx, const char *who, header_fn fn, void *ud) {
    if (lua_type(L, nidx) != LUA_TSTRING) luaL_error(L, "%s: a header name must be a string", who);
    size_t nl;
    const char *name = lua_tolstring(L, nidx, &nl);
    if (!is_token(name, nl)) luaL_error(L, "%s: invalid header name '%s'", who, name);
    int multi = lua_istable(L, vidx);
    int n = multi ? (int)lua_rawlen(L, vidx) : 1;
    for (int k = 1; k <= n; k++) {
        if (multi) lua_rawgeti(L, vidx, k);
        else lua_pushvalue(L, vidx);
        int vt = lua_type(L, -1);
        if (vt != LUA_TSTRING && vt != LUA_TNUMBER)
            luaL_error(L, "%s: the value of header '%s' must be a string or a number", who, name);
        size_t vl;
        const char *val = lua_tolstring(L, -1, &vl);
        if (!is_field_value(val, vl))
            luaL_error(L, "%s: the value of header '%s' holds CR, LF or NUL", who, name);
        fn(name, nl, val, vl, ud);
        lua_pop(L, 1);
    }
}

static void each_header(lua_State *L, int hidx, const char *who, header_fn fn, void *ud) {
    hidx = lua_absindex(L, hidx);
    luaL_checkstack(L, 8, "headers");
    if (lua_rawgeti(L, hidx, 1) == LUA_TTABLE) {
        lua_pop(L, 1);
        for (lua_Integer i = 1; lua_rawgeti(L, hidx, i) != LUA_TNIL; i++) {
            if (!lua_istable(L, -1))
                luaL_error(L, "%s: headers entry %d is not a {name, value} pair", who, (int)i);
            lua_rawgeti(L, -1, 1);
            lua_rawgeti(L, -2, 2);
            int top = lua_gettop(L);
            header_entry(L, top - 1, top, who, fn, ud);
            lua_pop(L, 3);
        }
        lua_pop(L, 1);
        return;
    }
    lua_pop(L, 1);
    lua_pushnil(L);
    while (lua_next(L, hidx)) {
        int top = lua_gettop(L);
        header_entry(L, top - 1, top, who, fn, ud);
        lua_pop(L, 1);
    }
}

static const char *reason_phrase(int status) {
    switch (status) {
    case 100: return "Continue";
    case 101: return "Switching Protocols";
    case 200: return "OK";
    case 201: return "Created";
    case 202: return "Accepted";
    case 204: return "No Content";
    case 206: return "Partial Content";
    case 301: return "Moved Permanently";
    case 302: return "Found";
    case 303: return "See Other";
    case 304: return "Not Modified";
    case 307: return "Temporary Redirect";
    case 308: return "Permanent Redirect";
    case 400: return "Bad Request";
    case 401: return "Unauthorized";
    case 403: return "Forbidden";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 408: return "Request Timeout";
    case 409: return "Conflict";
    case 410: return "Gone";
    case 411: return "Length Required";
    case 413: return "Content Too Large";
    case 414: return "URI Too Long";
    case 415: return "Unsupported Media Type";
    case 422: return "Unprocessable Content";
    case 429: return "Too Many Requests";
    case 431: return "Request Header Fields Too Large";
    case 500: return "Internal Server Error";
    case 501: return "Not Implemented";
    case 502: return "Bad Gateway";
    case 503: return "Service Unavailable";
    case 504: return "Gateway Timeout";
    case 505: return "HTTP Version Not Supported";
    default:
        if (status < 200) return "Informational";
        if (status < 300) return "Success";
        if (status < 400) return "Redirection";
        if (status < 500) return "Client Error";
        return "Server Error";
    }
}

/* The Date header, formatted once per second. */
static const char *http_date(void) {
    static _Thread_local time_t last;
    static _Thread_local char text[40];
    time_t now = time(NULL);
    if (now != last) {
        struct tm tm;
        gmtime_r(&now, &tm);
        strftime(text, sizeof text, "%a, %d %b %Y %H:%M:%S GMT", &tm);
        last = now;
    }
    return text;
}

/* ---- parsed heads ------------------------------------------------------ */


typedef struct http_head {
    buf arena;            /* target (or reason), then names (lower case) and values */
    http_header *hdr;
    int nhdr, hcap;
    uint32_t first_len;   /* arena[0, first_len): the target, or a response's reason */
    int method, major, minor, status;
    /* A request head the lean parser read: arena[first_len, arena_len) is
     * the head as received from the space after the target on, with no
     * Transfer-Encoding or Expect, and host is the index + 1 of its one
     * Host (0: none). lines_as_sent: no hop-by-hop or X-Forwarded-* header
     * either, so its header lines can go upstream as they came. */
    unsigned lean : 1, lines_as_sent : 1;
    int host;
} http_head;

static void head_reset(http_head *h) {
    h->arena.len = 0;
    h->nhdr = 0;
    h->first_len = 0;
    h->lean = h->lines_as_sent = 0;
    h->host = 0;
}

static void head_free(http_head *h) {
    buf_free(&h->arena);
    free(h->hdr);
    h->hdr = NULL;
    h->nhdr = h->hcap = 0;
}

static const char *head_str(const http_head *h, uint32_t off) { return h->arena.p + off; }

/* Names are kept as sent (a proxy re-serialises them); every lookup
 * ignores case. */
static int name_is(const http_head *h, const http_header *x, const char *lower, size_t len) {
    return x->name_len == len && ieq_n(head_str(h, x->name), lower, len);
}

/* The first header named `name` (given in lower case); NULL when absent.
 * *count gets how many there are. */
static const http_header *head_find(const http_head *h, const char *name, int *count) {
    const http_header *found = NULL;
    int n = 0;
    size_t len = strlen(name);
    for (int i = 0; i < h->nhdr; i++) {
        const http_header *x = &h->hdr[i];
        if (name_is(h, x, name, len)) {
            if (!found) found = x;
            n++;
        }
    }
    if (count) *count = n;
    return found;
}

/* Push the headers as a table: lower-case name -> value, repeated headers
 * joined with ", " ("; " for cookie), set-cookie always an array. */
static void push_headers(lua_State *L, const http_head *h) {
    lua_createtable(L, 0, h->nhdr);
    for (int i = 0; i < h->nhdr; i++) {
        const http_header *x = &h->hdr[i];
        const char *name = head_str(h, x->name);
        luaL_Buffer lb;
        char *low = luaL_buffinitsize(L, &lb, x->name_len);
        for (uint32_t k = 0; k < x->name_len; k++) {
            char ch = name[k];
            low[k] = (ch >= 'A' && ch <= 'Z') ? (char)(ch + 32) : ch;
        }
        luaL_pushresultsize(&lb, x->name_len);
        lua_pushvalue(L, -1);
        int t = lua_rawget(L, -3);
        int is_cookie_set = name_is(h, x, "set-cookie", 10);
        if (is_cookie_set) {
            if (t == LUA_TNIL) {
                lua_pop(L, 1);
                lua_createtable(L, 1, 0);
            }
            lua_pushlstring(L, head_str(h, x->value), x->value_len);
            lua_rawseti(L, -2, (lua_Integer)lua_rawlen(L, -2) + 1);
        } else if (t == LUA_TNIL) {
            lua_pop(L, 1);
            lua_pushlstring(L, head_str(h, x->value), x->value_len);
        } else {
            int is_cookie = name_is(h, x, "cookie", 6);
            lua_pushstring(L, is_cookie ? "; " : ", ");
            lua_pushlstring(L, head_str(h, x->value), x->value_len);
            lua_concat(L, 3);
        }
        lua_rawset(L, -3);
    }
}

/* ---- the shared parsing state ----------------------------------------- */

enum { PAUSE_NONE, PAUSE_HEAD, PAUSE_DONE };

/* First member of both a server connection and a client exchange, so the
 * llhttp callbacks that build a head serve both. */
typedef struct http_parse {
    llhttp_t parser;
    http_head head;
    int in_head;          /* between message begin and the end of the head */
    int field_open;       /* a header name is being received */
    uint32_t span;        /* where the current name or value began */
    size_t max_head;
    int max_headers;
    int error_status;     /* set by a callback that refused the message */
    const char *error_msg;
    int pause;            /* why the parser paused */
} http_parse;

static int parse_fail(http_parse *p, int status, const char *msg) {
    p->error_status = status;
    p->error_msg = msg;
    llhttp_set_error_reason(&p->parser, msg);
    return HPE_USER;
}

static int span_add(http_parse *p, const char *at, size_t n) {
    buf *a = &p->head.arena;
    if (a->len + n > p->max_head)
        return parse_fail(p, 431, p->parser.type == HTTP_REQUEST ? "request head too large"
                                                                  : "response head too large");
    if (buf_reserve(a, n)) return parse_fail(p, 500, "out of memory");
    memcpy(a->p + a->len, at, n);
    a->len += n;
    return 0;
}

static int cb_message_begin(llhttp_t *ps) {
    http_parse *p = ps->data;
    head_reset(&p->head);
    p->in_head = 1;
    p->field_open = 0;
    return 0;
}

static int cb_first_line_span(llhttp_t *ps, const char *at, size_t n) {
    http_parse *p = ps->data;
    int rc = span_add(p, at, n);
    if (!rc) p->head.first_len += (uint32_t)n;
    return rc;
}

static int cb_header_field(llhttp_t *ps, const char *at, size_t n) {
    http_parse *p = ps->data;
    if (!p->in_head) return 0; /* a trailer: dropped */
    if (!p->field_open) {
        if (p->head.nhdr >= p->max_headers) return parse_fail(p, 431, "too many header fields");
        p->field_open = 1;
        p->span = (uint32_t)p->head.arena.len;
    }
    return span_add(p, at, n);
}

static int cb_header_field_complete(llhttp_t *ps) {
    http_parse *p = ps->data;
    if (!p->in_head) return 0;
    http_head *h = &p->head;
    uint32_t len = (uint32_t)h->arena.len - p->span;
    /* llhttp keeps white space before the colon in the name: refuse it. */
    if (!is_token(h->arena.p + p->span, len))
        return parse_fail(p, 400, "invalid character in a header name");
    if (h->nhdr == h->hcap) {
        int cap = h->hcap ? h->hcap * 2 : 16;
        http_header *nh = realloc(h->hdr, (size_t)cap * sizeof *nh);
        if (!nh) return parse_fail(p, 500, "out of memory");
        h->hdr = nh;
        h->hcap = cap;
    }
    http_header *x = &h->hdr[h->nhdr++];
    x->name = p->span;
    x->name_len = len;
    x->value = (uint32_t)h->arena.len;
    x->value_len = 0;
    p->field_open = 0;
    return 0;
}

static int cb_header_value(llhttp_t *ps, const char *at, size_t n) {
    http_parse *p = ps->data;
    if (!p->in_head) return 0;
    return span_add(p, at, n);
}

static int cb_header_value_complete(llhttp_t *ps) {
    http_parse *p = ps->data;
    if (!p->in_head || p->head.nhdr == 0) return 0;
    http_head *h = &p->head;
    http_header *x = &h->hdr[h->nhdr - 1];
    uint32_t len = (uint32_t)h->arena.len - x->value;
    while (len > 0 && (h->arena.p[x->value + len - 1] == ' ' || h->arena.p[x->value + len - 1] == '\t'))
        len--;
    x->value_len = len;
    return 0;
}

static void settings_common(llhttp_settings_t *s) {
    llhttp_settings_init(s);
    s->on_message_begin = cb_message_begin;
    s->on_header_field = cb_header_field;
    s->on_header_field_complete = cb_header_field_complete;
    s->on_header_value = cb_header_value;
    s->on_header_value_complete = cb_header_value_complete;
}

/* ====================================================================== */
/* Server                                                                 */
/* ====================================================================== */

typedef struct http_limits {
    size_t max_head;
    int max_headers;
    size_t max_body;
    int64_t header_timeout;
    int64_t idle_timeout;
    int64_t body_timeout;
    int64_t send_timeout;
    int max_connections;
    int lazy_body;          /* call the handler at the head; it reads the body */
} http_limits;

enum { PHASE_HEAD, PHASE_BODY, PHASE_LINGER, PHASE_TUNNEL };
enum { TIMER_NONE, TIMER_HEADER, TIMER_IDLE, TIMER_BODY, TIMER_SEND, TIMER_LINGER };

typedef struct http_server http_server;
typedef struct http_conn http_conn;
typedef struct http_req http_req;
typedef struct px_upstream px_upstream;
typedef struct srv_route srv_route;

struct http_server {
    lua_State *L;          /* the main thread */
    tn_listener *lis;      /* while it accepts for this server */
    tn_listener *lis_mem;  /* a reference on its memory, until stopped */
    int lis_ref, self_ref, handler_ref, on_error_ref;
    http_limits lim;
    http_conn *conns;
    http_conn *idle_head, *idle_tail; /* between requests, longest idle first */
    lua_Integer reclaimed;  /* idle connections closed to admit new ones */
    int open;
    int lingering;         /* open connections past their last response */
    int refs;
    int closed;            /* no longer accepting */
    int blocked;           /* at max_connections with a connection waiting */
    lua_Integer accepted, requests;
    tn_task *drainer;
    uint64_t dseq;
    /* direct routes: a Host header as sent -> the upstream its requests go
     * to without a handler (srv:route) */
    srv_route **routes;
    size_t route_buckets, nroutes;
    lua_Integer direct;    /* requests a direct route took */
    lua_Integer direct_set; /* of those, the ones a service's set took */
    lua_Integer proxy_errors; /* exchanges through an upstream it failed */
};

struct http_conn {
    http_parse p;          /* first: llhttp's data pointer is the connection */
    tn_io io;
    uv_timer_t timer;
    http_server *srv;
    http_conn *prev, *next;
    http_conn *idle_prev, *idle_next;
    int in_idle;           /* on the server's idle list */
    http_req *req;         /* the request being handled */
    buf in;                /* bytes read, parsed up to in_off */
    size_t in_off;
    size_t head_bytes;     /* raw bytes of the current head so far */
    int is_pipe;
    int handles;           /* libuv handles not yet closed */
    int closing, reading, paused, flush, running, rerun, eof, dead;
    int phase, timer_kind, got_bytes, shut;
    uint64_t deadline;     /* of timer_kind, in uv_now time */
    uint64_t timer_due;    /* when the libuv timer fires; 0 when stopped */
    int throttled;         /* a proxy's upstream is not taking the body fast enough */
    int eof_body_open;     /* a body delimited by the close is under way: see conn_close */
    int plain_done;        /* the lean parser read a head with no body: see conn_exec */
    char scan_prev;        /* last raw head byte seen, across reads */
    const char *bad_head;  /* a framing problem found in the raw head bytes */
    char peer[160];
    int peer_pid;          /* a Unix socket client's pid (SO_PEERCRED), else 0 */
};

struct http_req {
    int refs;
    http_req *next_free;   /* in the free list */
    http_conn *conn;       /* NULL once the connection moved on or closed */
    http_server *srv;
    http_head head;
    buf body;
    size_t body_max;
    size_t seen;           /* body bytes parsed, kept or dropped */
    int want_body, msg_complete, responded, written, keep_alive, discard, head_method;
    int expects_body, dispatched, expect_continue, continue_sent;
    int streaming, chunked_out; /* req:stream: the body goes out piece by piece */
    int stream_headed;     /* req:stream on HEAD: the head went out, and that was all */
    const char *body_err;
    struct px *px;         /* a proxy exchange in progress (req:proxy) */
    tn_task *waiter;
    uint64_t wseq;
    char peer[160];
    int peer_pid;
};

typedef struct { http_req *r; } req_box;
typedef struct { http_server *s; } server_box;

static llhttp_settings_t server_settings;

static void conn_run(http_conn *c);
static void conn_eof(http_conn *c);
static void conn_close(http_conn *c);

/* The proxy (below) hooks into the server connection at these points. */
struct px;
static void px_client_body(struct px *x, const char *at, size_t n);
static void px_client_body_end(struct px *x);
static void px_client_body_failed(struct px *x);
static void px_client_gone(struct px *x);
static void px_client_eof(struct px *x);
static void px_tunnel_client_read(struct px *x, ssize_t nread, const char *p);
static struct px *px_hold_of(http_conn *c);
static void px_after_parse(struct px *x);
static void conn_detach_req(http_conn *c);
static void conn_linger(http_conn *c);
static void srv_accept(http_server *s);
static px_upstream *srv_route_lookup(http_server *s, const http_head *h, const http_header *host, int *is_set);
static int px_start_direct(http_req *r, px_upstream *u, int chunked);
static void srv_routes_clear(http_server *s);

static void srv_unref(http_server *s) {
    if (--s->refs > 0) return;
    srv_routes_clear(s);
    free(s->routes);
    luaL_unref(s->L, LUA_REGISTRYINDEX, s->handler_ref);
    luaL_unref(s->L, LUA_REGISTRYINDEX, s->on_error_ref);
    free(s);
}

/* Memory every request needs is kept for the next one: request structs
 * with their head arenas, and 8 KiB connection input buffers. */
#define REQ_FREE_MAX 1024
#define INBUF_SIZE 8192
#define INBUF_FREE_MAX 256

static _Thread_local http_req *req_free;
static _Thread_local int req_nfree;
static _Thread_local char *inbuf_free[INBUF_FREE_MAX];
static _Thread_local int inbuf_nfree;

static http_req *req_new(void) {
    http_req *r = req_free;
    if (!r) return calloc(1, sizeof *r);
    req_free = r->next_free;
    req_nfree--;
    http_head head = r->head;
    buf body = r->body;
    memset(r, 0, sizeof *r);
    r->head = head;
    r->body = body;
    return r;
}

static void req_unref(http_req *r) {
    if (--r->refs > 0) return;
    srv_unref(r->srv);
    if (req_nfree < REQ_FREE_MAX && r->head.arena.cap <= 16 * 1024 && r->head.hcap <= 64 &&
        r->body.cap <= 64 * 1024) {
        head_reset(&r->head);
        r->body.len = 0;
        r->next_free = req_free;
        req_free = r;
        req_nfree++;
        return;
    }
    head_free(&r->head);
    buf_free(&r->body);
    free(r);
}

static void inbuf_release(buf *b) {
    if (b->cap == INBUF_SIZE && inbuf_nfree < INBUF_FREE_MAX) {
        inbuf_free[inbuf_nfree++] = b->p;
        b->p = NULL;
        b->len = b->cap = 0;
        return;
    }
    buf_free(b);
}

/* ---- logging ----------------------------------------------------------- */

/* Report a failure (a handler's, or an upstream's the proxy answered for):
 * to the server's on_error function if it has one, else to stderr. Never
 * raises. */
static void srv_log(lua_State *L, http_server *s, const char *what, const char *msg) {
    if (s->on_error_ref != LUA_NOREF && lua_checkstack(L, 3)) {
        lua_rawgeti(L, LUA_REGISTRYINDEX, s->on_error_ref);
        lua_pushstring(L, msg);
        if (lua_pcall(L, 1, 0, 0) == LUA_OK) return;
        fprintf(stderr, "ten: http on_error failed: %s\n", lua_tostring(L, -1));
        lua_pop(L, 1);
    }
    fprintf(stderr, "ten: http %s: %s\n", what, msg);
}

/* ---- timers and reading ------------------------------------------------ */

static void conn_timer_cb(uv_timer_t *t);

/* Deadlines are kept here and the libuv timer is re-armed lazily: moving
 * a deadline later leaves the timer where it is (it fires, finds the new
 * deadline and sleeps again), so the timer heap stays out of the path of
 * every request. */
static void conn_timer_arm(http_conn *c, uint64_t deadline) {
    if (c->timer_due && c->timer_due <= deadline) return;
    uint64_t now = uv_now(c->timer.loop);
    uv_timer_start(&c->timer, conn_timer_cb, deadline > now ? deadline - now : 0, 0);
    c->timer_due = deadline;
}

static void conn_timer(http_conn *c, int kind, int64_t ms) {
    if (kind == TIMER_NONE || ms < 0) {
        c->timer_kind = TIMER_NONE;
        return;
    }
    c->timer_kind = kind;
    c->deadline = uv_now(c->timer.loop) + (uint64_t)ms;
    conn_timer_arm(c, c->deadline);
}

static void conn_alloc(uv_handle_t *h, size_t hint, uv_buf_t *b) {
    (void)hint;
    http_conn *c = h->data;
    if (c->phase == PHASE_LINGER || c->phase == PHASE_TUNNEL) {
        b->base = scratch;
        b->len = sizeof scratch;
        return;
    }
    if (c->in_off == c->in.len) {
        c->in_off = c->in.len = 0;
    } else if (c->in_off > 0) {
        memmove(c->in.p, c->in.p + c->in_off, c->in.len - c->in_off);
        c->in.len -= c->in_off;
        c->in_off = 0;
    }
    size_t want = c->phase == PHASE_BODY && !c->paused ? 64 * 1024 : 8 * 1024;
    if (!c->in.p && inbuf_nfree > 0) {
        c->in.p = inbuf_free[--inbuf_nfree];
        c->in.cap = INBUF_SIZE;
    }
    if (buf_reserve(&c->in, want)) {
        b->base = NULL;
        b->len = 0;
        return;
    }
    b->base = c->in.p + c->in.len;
    b->len = c->in.cap - c->in.len;
}

static void conn_read_cb(uv_stream_t *h, ssize_t nread, const uv_buf_t *b);

/* Read exactly when the parser can use input: it is not paused waiting for
 * the handler, or the connection lingers. */
static void conn_update_reading(http_conn *c) {
    /* While a handler runs with the parser paused, the client is read
     * anyway, a little (what comes is body or the next pipelined request,
     * parsed later): a client that goes away is seen (req:proxy then drops
     * the upstream request, as nginx does), and the socket is not taken
     * out of epoll and put back for every request. */
    int watch = c->paused && !c->dead && c->phase == PHASE_BODY && c->req && c->req->dispatched &&
                c->in.len - c->in_off < 16 * 1024;
    int want = !c->closing && !c->eof && !c->throttled &&
               (c->phase == PHASE_LINGER ? c->shut :
                c->phase == PHASE_TUNNEL ? 1 : ((!c->paused && !c->dead) || watch));
    if (want && !c->reading) {
        tn_io_read_start(&c->io, conn_alloc, conn_read_cb);
        c->reading = 1;
    } else if (!want && c->reading) {
        tn_io_read_stop(&c->io);
        c->reading = 0;
    }
}

/* ---- writing ----------------------------------------------------------- */

enum { AFTER_NOTHING, AFTER_RESPONSE };

typedef struct conn_write_op {
    tn_io_req req;
    http_conn *c;
    int after;
    char data[];
} conn_write_op;

static void response_written(http_conn *c);

static void conn_write_cb(tn_io_req *req, int status) {
    conn_write_op *w = req->data;
    http_conn *c = w->c;
    int after = w->after;
    free(w);
    if (c->closing) return;
    if (status < 0) { conn_close(c); return; }
    if (c->timer_kind == TIMER_SEND) {
        /* a body still being read before the handler keeps its deadline */
        if (c->req && !c->req->dispatched && c->phase == PHASE_BODY)
            conn_timer(c, TIMER_BODY, c->srv->lim.body_timeout);
        else
            conn_timer(c, TIMER_NONE, 0);
    }
    if (after == AFTER_RESPONSE) response_written(c);
}

/* Write head and body. Returns 1 when the kernel took everything now, 0 when
 * the rest is queued (after runs when it is written), -1 when the
 * connection failed and was closed. */
static int conn_write(http_conn *c, const char *h, size_t hl, const char *b, size_t bl, int after) {
    uv_buf_t bufs[2] = { uv_buf_init((char *)h, (unsigned)hl), uv_buf_init((char *)b, (unsigned)bl) };
    int nb = bl ? 2 : 1;
    size_t total = hl + bl;
    int n = tn_io_try_write(&c->io, bufs, (unsigned)nb);
    if (n >= 0 && (size_t)n == total) return 1;
    if (n < 0 && n != UV_EAGAIN) { conn_close(c); return -1; }
    size_t done = n > 0 ? (size_t)n : 0;
    size_t rest = total - done;
    conn_write_op *w = malloc(sizeof *w + rest);
    if (!w) { conn_close(c); return -1; }
    w->c = c;
    w->after = after;
    w->req.data = w;
    char *dst = w->data;
    /* b may be NULL with bl 0 (a head alone, an empty last write) */
    if (done < hl) {
        memcpy(dst, h + done, hl - done);
        dst += hl - done;
        if (bl) memcpy(dst, b, bl);
    } else if (bl > done - hl) {
        memcpy(dst, b + (done - hl), bl - (done - hl));
    }
    if (tn_io_write(&c->io, &w->req, w->data, rest, conn_write_cb) != 0) {
        free(w);
        conn_close(c);
        return -1;
    }
    conn_timer(c, TIMER_SEND, c->srv->lim.send_timeout);
    return 0;
}

/* A response the server makes itself (400, 408, 413, 431, 500, 503). */
static int simple_response(buf *out, int status, const char *detail, int close) {
    char body[256];
    int bl = snprintf(body, sizeof body, "%d %s%s%s\n", status, reason_phrase(status),
                      detail ? ": " : "", detail ? detail : "");
    if (bl < 0) bl = 0;
    if ((size_t)bl >= sizeof body) bl = sizeof body - 1;
    out->len = 0;
    buf_printf(out, "HTTP/1.1 %d %s\r\nServer: tenement\r\nDate: %s\r\n", status,
               reason_phrase(status), http_date());
    buf_printf(out, "Content-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\n", bl);
    if (close) buf_addstr(out, "Connection: close\r\n");
    buf_addstr(out, "\r\n");
    return buf_add(out, body, (size_t)bl);
}

/* Answer an unusable request head and close: the handler never sees it. */
static void conn_reject(http_conn *c, int status, const char *detail) {
    if (c->closing || c->phase == PHASE_LINGER) return;
    buf out = { 0 };
    c->dead = 1;
    conn_detach_req(c);
    if (simple_response(&out, status, detail, 1) == 0 &&
        conn_write(c, out.p, out.len, NULL, 0, AFTER_NOTHING) >= 0)
        conn_linger(c);
    buf_free(&out);
}

/* ---- closing ----------------------------------------------------------- */

static void conn_handle_closed(uv_handle_t *h) {
    http_conn *c = h->data;
    if (--c->handles > 0) return;
    inbuf_release(&c->in);
    head_free(&c->p.head);
    srv_unref(c->srv);
    free(c);
}

static void req_wake(http_req *r);

/* The request stops being the connection's: a body() waiting for it gets
 * nil, "closed". */
static void conn_detach_req(http_conn *c) {
    http_req *r = c->req;
    if (!r) return;
    if (r->px) px_client_gone(r->px);
    c->req = NULL;
    r->conn = NULL;
    req_wake(r);
    req_unref(r);
}

static void drain_wake(http_server *s) {
    tn_task *t = s->drainer;
    if (!t || s->open - s->lingering > 0) return;
    s->drainer = NULL;
    if (tn_task_waiting_for(t, s->dseq)) {
        lua_pushboolean(tn_task_thread(t), 1);
        tn_task_resume(t, 1);
    }
    tn_task_release(t);
}

/* A keep-alive connection between requests, the only kind the server may
 * close on its own to admit a new one when at max_connections: HTTP lets
 * a client retry a request on a fresh connection when an idle one closes. */
static void conn_idle_enter(http_conn *c) {
    http_server *s = c->srv;
    if (c->in_idle) return;
    c->in_idle = 1;
    c->idle_next = NULL;
    c->idle_prev = s->idle_tail;
    if (s->idle_tail) s->idle_tail->idle_next = c;
    else s->idle_head = c;
    s->idle_tail = c;
}

static void conn_idle_leave(http_conn *c) {
    http_server *s = c->srv;
    if (!c->in_idle) return;
    c->in_idle = 0;
    if (c->idle_prev) c->idle_prev->idle_next = c->idle_next;
    else s->idle_head = c->idle_next;
    if (c->idle_next) c->idle_next->idle_prev = c->idle_prev;
    else s->idle_tail = c->idle_prev;
    c->idle_prev = c->idle_next = NULL;
}

static void conn_close(http_conn *c) {
    if (c->closing) return;
    if (c->eof_body_open) {
        /* The body ends where the connection does, and it is not whole
         * (whichever way the close came: a handler, the upstream, a timer,
         * the drain): a FIN would tell the client it is, a reset tells it
         * the body is cut. What the kernel still held for it goes too. */
        struct linger now = {.l_onoff = 1, .l_linger = 0};
        setsockopt(c->io.fd, SOL_SOCKET, SO_LINGER, &now, sizeof now);
    }
    conn_idle_leave(c);
    c->closing = 1;
    c->reading = 0;
    uv_timer_stop(&c->timer);
    tn_io_close(&c->io, conn_handle_closed);
    uv_close((uv_handle_t *)&c->timer, conn_handle_closed);
    http_server *s = c->srv;
    if (c->prev) c->prev->next = c->next;
    else s->conns = c->next;
    if (c->next) c->next->prev = c->prev;
    c->prev = c->next = NULL;
    s->open--;
    if (c->phase == PHASE_LINGER) s->lingering--;
    conn_detach_req(c);
    if (s->blocked && !s->closed) {
        s->blocked = 0;
        srv_accept(s);
    }
    drain_wake(s);
}

static void conn_shutdown_cb(tn_io_req *req, int status) {
    http_conn *c = req->data;
    free(req);
    if (c->closing) return;
    if (status < 0 || c->eof) { conn_close(c); return; }
    c->shut = 1;
    conn_timer(c, TIMER_LINGER, LINGER_MS);
    conn_update_reading(c);
}

/* Stop taking requests: once what is queued is written, send FIN, then
 * drop whatever the client still sends until it closes or LINGER_MS pass. */
static void conn_linger(http_conn *c) {
    if (c->closing || c->phase == PHASE_LINGER) return;
    conn_idle_leave(c);
    c->phase = PHASE_LINGER;
    c->srv->lingering++;
    c->dead = 1;
    conn_detach_req(c);
    drain_wake(c->srv);
    if (c->closing) return;
    tn_io_req *req = malloc(sizeof *req);
    if (!req) { conn_close(c); return; }
    req->data = c;
    if (tn_io_shutdown(&c->io, req, conn_shutdown_cb) != 0) {
        free(req);
        conn_close(c);
        return;
    }
    if (c->timer_kind != TIMER_SEND) conn_timer(c, TIMER_SEND, c->srv->lim.send_timeout);
    conn_update_reading(c);
}

static void conn_timer_cb(uv_timer_t *t) {
    http_conn *c = t->data;
    c->timer_due = 0;
    if (c->closing || c->timer_kind == TIMER_NONE) return;
    if (uv_now(t->loop) < c->deadline) {
        conn_timer_arm(c, c->deadline);
        return;
    }
    int kind = c->timer_kind;
    c->timer_kind = TIMER_NONE;
    if (kind == TIMER_HEADER && c->phase == PHASE_HEAD && c->got_bytes)
        conn_reject(c, 408, "the request head did not arrive in time");
    else if (kind == TIMER_BODY && c->req && !c->req->dispatched)
        conn_reject(c, 408, "the request body did not arrive in time");
    else
        conn_close(c);
}

/* ---- the request object ------------------------------------------------ */

static req_box *check_req_box(lua_State *L, int idx) {
    return luaL_checkudata(L, idx, REQUEST_MT);
}

static http_req *check_req(lua_State *L, int idx) {
    req_box *b = check_req_box(L, idx);
    if (!b->r) luaL_error(L, "request is gone");
    return b->r;
}

static int push_body_result(lua_State *L, http_req *r) {
    if (!r->expects_body) {
        lua_pushliteral(L, "");
        return 1;
    }
    if (r->body_err) {
        lua_pushnil(L);
        lua_pushstring(L, r->body_err);
        return 2;
    }
    if (r->msg_complete) {
        lua_pushlstring(L, r->body.p ? r->body.p : "", r->body.len);
        return 1;
    }
    lua_pushnil(L);
    lua_pushliteral(L, "closed");
    return 2;
}

/* Give a task waiting in body() its answer. The request is held across the
 * resume: the task may drop it and the collector free it meanwhile. */
static void req_wake(http_req *r) {
    tn_task *t = r->waiter;
    if (!t) return;
    r->waiter = NULL;
    r->refs++;
    if (tn_task_waiting_for(t, r->wseq)) {
        lua_State *co = tn_task_thread(t);
        tn_task_resume(t, push_body_result(co, r));
    }
    tn_task_release(t);
    req_unref(r);
}

static void body_cancel(void *arg) {
    http_req *r = arg;
    if (r->waiter) {
        tn_task_release(r->waiter);
        r->waiter = NULL;
    }
    /* The rest of the body is unknown now: no further request can be
     * framed on this connection. */
    r->keep_alive = 0;
    r->want_body = 0;
}

/* Let the parser read r's body: answer "Expect: 100-continue" first. */
static void start_body(http_conn *c, http_req *r) {
    if (r->expect_continue && !r->continue_sent) {
        static const char cont[] = "HTTP/1.1 100 Continue\r\n\r\n";
        r->continue_sent = 1;
        if (conn_write(c, cont, sizeof cont - 1, NULL, 0, AFTER_NOTHING) < 0) return;
    }
    if (c->paused) {
        llhttp_resume(&c->p.parser);
        c->paused = 0;
        c->flush = 1;
    }
}

/* req:body([max [, timeout_ms]]) -> string | nil, err */
static int l_req_body(lua_State *L) {
    http_req *r = check_req(L, 1);
    http_server *s = r->srv;
    if (r->px) return luaL_error(L, "req:proxy is forwarding this request's body");
    lua_Integer max = luaL_optinteger(L, 2, (lua_Integer)s->lim.max_body);
    lua_Integer timeout = luaL_optinteger(L, 3, s->lim.body_timeout);
    if (max < 0) return luaL_argerror(L, 2, "negative size");
    if ((size_t)max > s->lim.max_body) max = (lua_Integer)s->lim.max_body;
    if (!r->expects_body || r->msg_complete || r->body_err) {
        if (!r->body_err && r->body.len > (size_t)max) {
            lua_pushnil(L);
            lua_pushfstring(L, "request body too large (more than %d bytes)", (int)max);
            return 2;
        }
        return push_body_result(L, r);
    }
    http_conn *c = r->conn;
    if (!c || c->closing || c->req != r) return push_body_result(L, r);
    if (r->waiter) return luaL_error(L, "another task is already reading this request's body");
    if (r->discard) return luaL_error(L, "the body was dropped: a response was already sent");
    tn_task *t = tn_task_check(L);
    r->body_max = (size_t)max;
    r->want_body = 1;
    start_body(c, r);
    conn_run(c);
    if (r->msg_complete || r->body_err || r->conn != c || c->closing) return push_body_result(L, r);
    r->waiter = tn_task_hold(t);
    r->wseq = tn_task_seq(t);
    return tn_task_wait_cancel(L, t, timeout, body_cancel, r);
}

/* Response head into out. Raises on a bad header (a handler bug, which the
 * task turns into a logged 500): out is scratch memory that the next
 * response reuses, so raising here leaks nothing. */
typedef struct { buf *out; int has_server, has_date, close; } resp_ctx;

static void resp_header(const char *name, size_t nl, const char *val, size_t vl, void *ud) {
    resp_ctx *x = ud;
    if (ieq(name, nl, "content-length") || ieq(name, nl, "transfer-encoding") ||
        ieq(name, nl, "keep-alive"))
        return; /* framing is the server's job */
    if (ieq(name, nl, "connection")) {
        if (strcasestr(val, "close")) x->close = 1;
        return;
    }
    if (ieq(name, nl, "server")) x->has_server = 1;
    if (ieq(name, nl, "date")) x->has_date = 1;
    buf_add(x->out, name, nl);
    buf_add(x->out, ": ", 2);
    buf_add(x->out, val, vl);
    buf_add(x->out, "\r\n", 2);
}

static void build_response_head(lua_State *L, buf *out, http_req *r, int status, int hidx,
                                 size_t body_len, int *keep) {
    resp_ctx x = { out, 0, 0, !*keep };
    out->len = 0;
    buf_printf(out, "HTTP/1.1 %d %s\r\n", status, reason_phrase(status));
    if (hidx) each_header(L, hidx, "respond", resp_header, &x);
    if (!x.has_server) buf_addstr(out, "Server: tenement\r\n");
    if (!x.has_date) buf_printf(out, "Date: %s\r\n", http_date());
    if (status >= 200 && status != 204 && status != 304)
        buf_printf(out, "Content-Length: %zu\r\n", body_len);
    if (x.close) buf_addstr(out, "Connection: close\r\n");
    else if (r->head.minor == 0) buf_addstr(out, "Connection: keep-alive\r\n");
    buf_addstr(out, "\r\n");
    if (out->p == NULL) luaL_error(L, "out of memory");
    *keep = !x.close;
}

static void request_finished(http_conn *c);

/* The response is in the kernel: go on with the next request, after
 * dropping whatever the handler left unread of this one's body. */
static void response_written(http_conn *c) {
    http_req *r = c->req;
    if (!r || c->closing) return;
    r->written = 1;
    c->eof_body_open = 0; /* whole: the close that ends it is a FIN */
    if (!r->keep_alive || c->srv->closed) { conn_linger(c); return; }
    if (r->msg_complete) {
        request_finished(c);
    } else if (r->expect_continue && !r->continue_sent) {
        /* the client may hold the body back or send it: nothing can be
         * framed after it */
        conn_linger(c);
        return;
    } else {
        r->discard = 1;
        if (c->paused) {
            llhttp_resume(&c->p.parser);
            c->paused = 0;
            c->flush = 1;
        }
    }
    conn_run(c);
}

/* Send a response for r. Returns 0, or -1 when the connection is gone. */
static int req_send(http_req *r, const char *head, size_t hl, const char *body, size_t bl) {
    http_conn *c = r->conn;
    r->responded = 1;
    if (!c || c->closing || c->req != r) return -1;
    int rc = conn_write(c, head, hl, body, bl, AFTER_RESPONSE);
    if (rc == 1) response_written(c);
    return rc < 0 ? -1 : 0;
}

static void req_internal_error(http_req *r) {
    static _Thread_local buf out;
    r->keep_alive = r->keep_alive && r->conn && !r->srv->closed;
    if (simple_response(&out, 500, NULL, !r->keep_alive) != 0) {
        if (r->conn) conn_close(r->conn);
        return;
    }
    req_send(r, out.p, out.len, NULL, 0);
}

/* req:respond(status [, headers [, body]]) -> true | nil, "closed" */
static int l_req_respond(lua_State *L) {
    static _Thread_local buf out;
    http_req *r = check_req(L, 1);
    lua_Integer status = luaL_checkinteger(L, 2);
    if (status < 200 || status > 599) return luaL_argerror(L, 2, "status must be within 200-599");
    int hidx = 0;
    if (!lua_isnoneornil(L, 3)) {
        luaL_checktype(L, 3, LUA_TTABLE);
        hidx = 3;
    }
    size_t bl = 0;
    const char *body = "";
    if (!lua_isnoneornil(L, 4)) body = luaL_checklstring(L, 4, &bl);
    if (bl > 0x7fffffff) return luaL_argerror(L, 4, "body larger than 2 GiB");
    if (r->px) return luaL_error(L, "req:proxy is answering this request");
    if (r->responded) return luaL_error(L, "a response was already sent for this request");
    int keep = r->keep_alive && !r->srv->closed;
    build_response_head(L, &out, r, (int)status, hidx, bl, &keep);
    r->keep_alive = keep;
    int no_body = r->head_method || status == 204 || status == 304;
    if (req_send(r, out.p, out.len, body, no_body ? 0 : bl) < 0) {
        lua_pushnil(L);
        lua_pushliteral(L, "closed");
        return 2;
    }
    lua_pushboolean(L, 1);
    return 1;
}

/* Streaming responses (Server-Sent Events, long downloads made in Lua).
 *
 *   req:stream(status [, headers]) -> req | nil, "closed"   sends the head
 *   req:write(data)  -> true | nil, "closed"                 one piece
 *   req:queued()     -> bytes written but not yet taken by the client
 *   req:finish()     -> true | nil, "closed"                 the end
 * A handler that returns (or fails) before req:finish has its connection
 * closed, with what was still queued: an HTTP/1.1 client sees the body cut
 * (no last chunk); an HTTP/1.0 one, whose body ends at the close, gets a
 * reset instead of the FIN (conn_close).
 * To HEAD, req:stream sends the head and ends the response: writes after it
 * return nil, "closed".
 *
 * The body is chunked to HTTP/1.1 clients and delimited by the close to
 * HTTP/1.0 ones; the connection closes after the end (a stream is long and
 * rare: keep-alive after it is not worth its state). Writes never wait: a
 * producer paces itself with req:queued(), so a slow client holds the
 * producer back instead of the server's memory growing. */
static int stream_closed(lua_State *L) {
    lua_pushnil(L);
    lua_pushliteral(L, "closed");
    return 2;
}

static http_conn *stream_conn(http_req *r) {
    http_conn *c = r->conn;
    if (!c || c->closing || c->req != r) return NULL;
    return c;
}

static int l_req_stream(lua_State *L) {
    static _Thread_local buf out;
    http_req *r = check_req(L, 1);
    lua_Integer status = luaL_checkinteger(L, 2);
    if (status < 200 || status > 599 || status == 204 || status == 304)
        return luaL_argerror(L, 2, "status must be within 200-599, not 204 or 304");
    int hidx = 0;
    if (!lua_isnoneornil(L, 3)) {
        luaL_checktype(L, 3, LUA_TTABLE);
        hidx = 3;
    }
    if (r->px) return luaL_error(L, "req:proxy is answering this request");
    if (r->responded) return luaL_error(L, "a response was already sent for this request");
    r->responded = 1;
    r->streaming = 1;
    r->keep_alive = 0;
    r->chunked_out = r->head.minor >= 1;
    int keep = 0;
    build_response_head(L, &out, r, (int)status, hidx, 0, &keep);
    /* build_response_head framed it with a length: swap that line for the
     * stream's framing */
    static _Thread_local buf head;
    static const char length_line[] = "Content-Length: 0\r\n";
    const char *framing = r->chunked_out ? "Transfer-Encoding: chunked\r\n" : "";
    char *cl = memmem(out.p, out.len, length_line, sizeof length_line - 1);
    head.len = 0;
    if (cl) {
        size_t before = (size_t)(cl - out.p), after = out.len - before - (sizeof length_line - 1);
        if (buf_add(&head, out.p, before) != 0 || buf_addstr(&head, framing) != 0 ||
            buf_add(&head, cl + sizeof length_line - 1, after) != 0)
            return luaL_error(L, "out of memory");
    } else if (buf_add(&head, out.p, out.len) != 0) {
        return luaL_error(L, "out of memory");
    }
    http_conn *c = stream_conn(r);
    if (r->head_method) {
        /* the head a GET would get, and the response is whole: the writes
         * that follow are refused as to a client that left, so a producer
         * stops at once instead of making a body nobody is sent */
        r->streaming = 0;
        r->stream_headed = 1;
        int rc = c ? conn_write(c, head.p, head.len, NULL, 0, AFTER_RESPONSE) : -1;
        if (rc == 1) response_written(c);
        if (rc < 0) return stream_closed(L);
        lua_settop(L, 1);
        return 1;
    }
    if (!c || conn_write(c, head.p, head.len, NULL, 0, AFTER_NOTHING) < 0) return stream_closed(L);
    c->eof_body_open = !r->chunked_out;
    lua_settop(L, 1);
    return 1;
}

static int l_req_write(lua_State *L) {
    static _Thread_local buf out;
    http_req *r = check_req(L, 1);
    size_t n;
    const char *data = luaL_checklstring(L, 2, &n);
    if (r->stream_headed) return stream_closed(L);
    if (!r->streaming) return luaL_error(L, "req:write needs req:stream first");
    http_conn *c = stream_conn(r);
    if (!c) return stream_closed(L);
    if (n == 0) { lua_pushboolean(L, 1); return 1; }
    int rc;
    if (r->chunked_out) {
        out.len = 0;
        buf_printf(&out, "%zx\r\n", n);
        if (buf_add(&out, data, n) != 0 || buf_add(&out, "\r\n", 2) != 0) return luaL_error(L, "out of memory");
        rc = conn_write(c, out.p, out.len, NULL, 0, AFTER_NOTHING);
    } else {
        rc = conn_write(c, data, n, NULL, 0, AFTER_NOTHING);
    }
    if (rc < 0) return stream_closed(L);
    lua_pushboolean(L, 1);
    return 1;
}

static int l_req_queued(lua_State *L) {
    http_req *r = check_req(L, 1);
    http_conn *c = stream_conn(r);
    lua_pushinteger(L, c ? (lua_Integer)tn_io_queued(&c->io) : 0);
    return 1;
}

static int l_req_finish(lua_State *L) {
    http_req *r = check_req(L, 1);
    if (r->stream_headed) { lua_pushboolean(L, 1); return 1; }
    if (!r->streaming) return luaL_error(L, "req:finish needs req:stream first");
    r->streaming = 0;
    http_conn *c = stream_conn(r);
    if (!c) return stream_closed(L);
    const char *end = r->chunked_out ? "0\r\n\r\n" : "";
    int rc = conn_write(c, end, strlen(end), NULL, 0, AFTER_RESPONSE);
    if (rc == 1) response_written(c);
    if (rc < 0) return stream_closed(L);
    lua_pushboolean(L, 1);
    return 1;
}

static int req_path_len(const http_req *r) {
    const char *t = r->head.arena.p;
    const char *q = memchr(t, '?', r->head.first_len);
    return q ? (int)(q - t) : (int)r->head.first_len;
}

/* req:header(name) -> value | nil: one header, case-insensitively. */
static int l_req_header(lua_State *L) {
    http_req *r = check_req(L, 1);
    size_t n;
    const char *name = luaL_checklstring(L, 2, &n);
    char low[128];
    if (n >= sizeof low) { lua_pushnil(L); return 1; }
    for (size_t i = 0; i <= n; i++)
        low[i] = (name[i] >= 'A' && name[i] <= 'Z') ? (char)(name[i] + 32) : name[i];
    int count;
    const http_header *x = head_find(&r->head, low, &count);
    if (!x) { lua_pushnil(L); return 1; }
    if (count == 1) {
        lua_pushlstring(L, head_str(&r->head, x->value), x->value_len);
        return 1;
    }
    push_headers(L, &r->head);
    lua_getfield(L, -1, low);
    return 1;
}

/* The table of fields set on the request at index 1, made on first use. */
static void req_fields(lua_State *L) {
    if (lua_getiuservalue(L, 1, 1) == LUA_TTABLE) return;
    lua_pop(L, 1);
    lua_newtable(L);
    lua_pushvalue(L, -1);
    lua_setiuservalue(L, 1, 1);
}

static int l_req_index(lua_State *L) {
    req_box *b = check_req_box(L, 1);
    /* fields a handler set on the request, and cached ones */
    if (lua_getiuservalue(L, 1, 1) == LUA_TTABLE) {
        lua_pushvalue(L, 2);
        if (lua_rawget(L, -2) != LUA_TNIL) return 1;
        lua_pop(L, 1);
    }
    lua_pop(L, 1);
    /* methods */
    lua_getmetatable(L, 1);
    lua_pushvalue(L, 2);
    if (lua_rawget(L, -2) != LUA_TNIL) return 1;
    lua_pop(L, 2);
    http_req *r = b->r;
    if (!r || lua_type(L, 2) != LUA_TSTRING) return 0;
    const char *k = lua_tostring(L, 2);
    const http_head *h = &r->head;
    if (strcmp(k, "method") == 0) {
        lua_pushstring(L, llhttp_method_name((llhttp_method_t)h->method));
    } else if (strcmp(k, "target") == 0) {
        lua_pushlstring(L, h->arena.p, h->first_len);
    } else if (strcmp(k, "path") == 0) {
        lua_pushlstring(L, h->arena.p, (size_t)req_path_len(r));
    } else if (strcmp(k, "query") == 0) {
        int pl = req_path_len(r);
        if ((uint32_t)pl == h->first_len) return 0;
        lua_pushlstring(L, h->arena.p + pl + 1, h->first_len - (uint32_t)pl - 1);
    } else if (strcmp(k, "version") == 0) {
        lua_pushfstring(L, "%d.%d", h->major, h->minor);
    } else if (strcmp(k, "peer") == 0) {
        lua_pushstring(L, r->peer);
    } else if (strcmp(k, "peer_pid") == 0) {
        if (r->peer_pid > 0) lua_pushinteger(L, r->peer_pid);
        else lua_pushnil(L);
    } else if (strcmp(k, "host") == 0) {
        /* as sent: routing normalises it (and keys direct routes by it) */
        int n;
        const http_header *x = head_find(h, "host", &n);
        if (!x || n != 1) return 0;
        lua_pushlstring(L, head_str(h, x->value), x->value_len);
    } else if (strcmp(k, "responded") == 0) {
        lua_pushboolean(L, r->responded);
    } else if (strcmp(k, "client_closed") == 0) {
        /* the client sent its FIN, or the connection is gone: a handler
         * that waits for something to say (a long poll) may stop waiting */
        lua_pushboolean(L, !r->conn || r->conn->eof || r->conn->closing);
    } else if (strcmp(k, "headers") == 0) {
        push_headers(L, h);
        req_fields(L);
        lua_pushliteral(L, "headers");
        lua_pushvalue(L, -3);
        lua_rawset(L, -3);
        lua_pop(L, 1);
    } else {
        return 0;
    }
    return 1;
}

/* Handlers may note things on a request (req.route = ...). */
static int l_req_newindex(lua_State *L) {
    check_req_box(L, 1);
    req_fields(L);
    lua_pushvalue(L, 2);
    lua_pushvalue(L, 3);
    lua_rawset(L, -3);
    return 0;
}

static int l_req_gc(lua_State *L) {
    req_box *b = check_req_box(L, 1);
    http_req *r = b->r;
    if (!r) return 0;
    b->r = NULL;
    req_unref(r);
    return 0;
}

static int l_req_tostring(lua_State *L) {
    req_box *b = check_req_box(L, 1);
    if (!b->r) { lua_pushliteral(L, "tenement.http.request (gone)"); return 1; }
    const http_head *h = &b->r->head;
    lua_pushfstring(L, "tenement.http.request (%s ", llhttp_method_name((llhttp_method_t)h->method));
    lua_pushlstring(L, h->arena.p, h->first_len);
    lua_pushliteral(L, ")");
    lua_concat(L, 3);
    return 1;
}

static void req_push(lua_State *L, http_req *r) {
    req_box *b = lua_newuserdatauv(L, sizeof *b, 1);
    b->r = NULL;
    luaL_setmetatable(L, REQUEST_MT);
    b->r = r;
    r->refs++;
}

/* ---- the handler task -------------------------------------------------- */

static int handler_msgh(lua_State *L) {
    const char *msg = lua_tostring(L, 1);
    if (!msg) msg = luaL_tolstring(L, 1, NULL);
    luaL_traceback(L, L, msg, 1);
    return 1;
}

static void req_log_failure(lua_State *L, http_req *r, const char *what) {
    lua_pushfstring(L, "%s ", llhttp_method_name((llhttp_method_t)r->head.method));
    lua_pushlstring(L, r->head.arena.p, r->head.first_len);
    lua_pushfstring(L, ": %s", what);
    lua_concat(L, 3);
    srv_log(L, r->srv, "handler failed", lua_tostring(L, -1));
    lua_pop(L, 1);
}

/* A handler that ended (or failed) in the middle of a stream: the head is
 * out, so the connection closes without the last chunk (and without what
 * was still queued), which tells an HTTP/1.1 client the body is cut, where
 * finishing would pass it as whole; an HTTP/1.0 one is reset (conn_close). */
static void stream_abandon(http_req *r) {
    if (!r->streaming) return;
    r->streaming = 0;
    http_conn *c = stream_conn(r);
    if (c) conn_close(c);
}

/* Stack: 1 request, 2 handler, 3 message handler, then the handler's
 * results or its error. */
static int req_task_k(lua_State *L, int status, lua_KContext k) {
    (void)k;
    http_req *r = check_req(L, 1);
    if (status != LUA_OK && status != LUA_YIELD) {
        req_log_failure(L, r, lua_tostring(L, -1) ? lua_tostring(L, -1) : "(error object)");
        stream_abandon(r);
        if (!r->responded) req_internal_error(r);
        return 0;
    }
    stream_abandon(r);
    int nres = lua_gettop(L) - 3;
    if (nres > 0 && !lua_isnil(L, 4)) {
        int nargs = nres > 3 ? 3 : nres;
        lua_pushcfunction(L, l_req_respond);
        lua_pushvalue(L, 1);
        for (int i = 0; i < nargs; i++) lua_pushvalue(L, 4 + i);
        if (lua_pcall(L, 1 + nargs, 0, 3) != LUA_OK) {
            req_log_failure(L, r, lua_tostring(L, -1));
            if (!r->responded) req_internal_error(r);
        }
    } else if (!r->responded) {
        req_log_failure(L, r, "the handler returned no response and did not call req:respond");
        req_internal_error(r);
    }
    return 0;
}

static int req_task_main(lua_State *L) {
    lua_settop(L, 2);
    lua_pushcfunction(L, handler_msgh);
    lua_pushvalue(L, 2);
    lua_pushvalue(L, 1);
    int st = lua_pcallk(L, 1, LUA_MULTRET, 3, 0, req_task_k);
    return req_task_k(L, st, 0);
}

static int dispatch_protected(lua_State *L) {
    http_req *r = lua_touserdata(L, 1);
    lua_rawgetp(L, LUA_REGISTRYINDEX, &spawn_key);
    lua_pushcfunction(L, req_task_main);
    req_push(L, r);
    lua_rawgeti(L, LUA_REGISTRYINDEX, r->srv->handler_ref);
    lua_call(L, 3, 0);
    return 0;
}

/* ---- the connection's parser ------------------------------------------ */

/* RFC 9112 framing the parser lets through; checked on the raw head bytes:
 * every LF must follow a CR, and no line may start with white space
 * (obsolete folding). */
static void head_scan(http_conn *c, const char *p, size_t n) {
    if (c->bad_head || n == 0) return;
    /* line by line (memchr), not byte by byte: this runs for every request */
    static const char *const bare_lf = "bare LF in the request head";
    static const char *const folded = "obsolete line folding in the request head";
    const char *end = p + n;
    if (c->scan_prev == '\n' && (p[0] == ' ' || p[0] == '\t')) { c->bad_head = folded; return; }
    for (const char *lf = memchr(p, '\n', n); lf; lf = memchr(lf + 1, '\n', (size_t)(end - lf - 1))) {
        if ((lf > p ? lf[-1] : c->scan_prev) != '\r') { c->bad_head = bare_lf; return; }
        if (lf + 1 < end && (lf[1] == ' ' || lf[1] == '\t')) { c->bad_head = folded; return; }
    }
    c->scan_prev = end[-1];
}

/* Start the handler's task for r. */
static void req_dispatch(http_conn *c, http_req *r) {
    http_server *s = c->srv;
    r->dispatched = 1;
    lua_State *L = s->L;
    int top = lua_gettop(L);
    if (!lua_checkstack(L, 4)) { conn_reject(c, 503, "out of memory"); return; }
    lua_pushcfunction(L, dispatch_protected);
    lua_pushlightuserdata(L, r);
    if (lua_pcall(L, 1, 0, 0) != LUA_OK) {
        srv_log(L, s, "handler failed", lua_tostring(L, -1));
        lua_settop(L, top);
        r->keep_alive = 0;
        req_internal_error(r);
        return;
    }
    lua_settop(L, top);
}

/* The head is complete: refuse what must not reach a handler, then start
 * the handler's task (or read the body first). */
static void on_head(http_conn *c, const head_facts *f) {
    http_server *s = c->srv;
    http_head *h = &c->p.head;
    if (c->bad_head) { conn_reject(c, 400, c->bad_head); return; }
    if (c->head_bytes > s->lim.max_head) { conn_reject(c, 431, "request head too large"); return; }
    if (f->major != 1 || f->minor > 1) {
        conn_reject(c, 400, "only HTTP/1.0 and HTTP/1.1 are spoken here");
        return;
    }
    if (f->method == HTTP_CONNECT) { conn_reject(c, 400, "CONNECT is not supported"); return; }
    int n;
    /* the lean parser took no Transfer-Encoding and found any Host */
    const http_header *te = h->lean ? NULL : head_find(h, "transfer-encoding", &n);
    if (te && (n > 1 || !ieq(head_str(h, te->value), te->value_len, "chunked"))) {
        conn_reject(c, 400, "the only transfer coding accepted is a single \"chunked\"");
        return;
    }
    /* HTTP/1.0 has no transfer codings: a 1.0 peer that sends one frames its
     * body in a way the next hop may read differently (RFC 9112, 6.1) */
    if (te && f->minor == 0) {
        conn_reject(c, 400, "Transfer-Encoding in an HTTP/1.0 request");
        return;
    }
    /* (the header array moves to the request below with its head: host
     * stays valid there) */
    const http_header *host = h->lean ? (h->host ? &h->hdr[h->host - 1] : NULL) : head_find(h, "host", &n);
    if (h->lean) n = host != NULL;
    if (n > 1 || (n == 0 && f->minor == 1)) {
        conn_reject(c, 400, "an HTTP/1.1 request needs exactly one Host header");
        return;
    }
    int chunked = te != NULL;
    if (!chunked && f->has_length && f->content_length > s->lim.max_body) {
        conn_reject(c, 413, "the request body is larger than the server accepts");
        return;
    }

    http_req *r = req_new();
    if (!r) { conn_reject(c, 503, "out of memory"); return; }
    r->refs = 1; /* the connection */
    r->conn = c;
    r->srv = s;
    s->refs++;
    h->method = f->method;
    h->major = f->major;
    h->minor = f->minor;
    /* the request takes the parsed head; the connection parses the next
     * one into the arena a finished request left behind */
    http_head spare = r->head;
    r->head = *h;
    *h = spare;
    head_reset(h);
    r->keep_alive = f->keep_alive;
    r->head_method = f->method == HTTP_HEAD;
    r->expects_body = chunked || f->content_length > 0;
    const http_header *ex = r->head.lean ? NULL : head_find(&r->head, "expect", NULL);
    r->expect_continue = f->minor == 1 && ex &&
                         ieq(head_str(&r->head, ex->value), ex->value_len, "100-continue");
    memcpy(r->peer, c->peer, sizeof r->peer);
    r->peer_pid = c->peer_pid;
    c->req = r;
    c->phase = PHASE_BODY;
    conn_timer(c, TIMER_NONE, 0);
    s->requests++;
    if (r->expects_body && !s->lim.lazy_body) {
        /* The body is read before the handler runs, so a malformed or
         * oversized one never reaches it. */
        r->want_body = 1;
        r->body_max = s->lim.max_body;
        conn_timer(c, TIMER_BODY, s->lim.body_timeout);
        start_body(c, r);
        return;
    }
    if (s->nroutes) {
        int is_set = 0;
        px_upstream *u = host ? srv_route_lookup(s, &r->head, host, &is_set) : NULL;
        if (u && px_start_direct(r, u, chunked) == 0) {
            s->direct++;
            s->direct_set += is_set;
            return;
        }
    }
    req_dispatch(c, r);
}

static void on_message_done(http_conn *c) {
    http_req *r = c->req;
    if (!r) return;
    r->msg_complete = 1;
    r->want_body = 0;
    if (r->px) px_client_body_end(r->px);
    if (!r->dispatched) {
        /* the parser stays paused here until the response is written */
        conn_timer(c, TIMER_NONE, 0);
        req_dispatch(c, r);
        return;
    }
    req_wake(r);
    if (c->closing || c->req != r) return;
    if (r->written) request_finished(c);
}

/* Ready for the next request on this connection. */
static void request_finished(http_conn *c) {
    http_req *r = c->req;
    int keep = r && r->keep_alive;
    c->req = NULL;
    if (r) {
        r->conn = NULL;
        req_unref(r);
    }
    if (!keep || c->srv->closed) { conn_linger(c); return; }
    llhttp_resume(&c->p.parser);
    c->paused = 0;
    c->flush = 1;
    c->phase = PHASE_HEAD;
    c->head_bytes = 0;
    c->got_bytes = 0;
    c->scan_prev = 0;
    c->bad_head = NULL;
    c->p.error_status = 0;
    c->p.error_msg = NULL;
    conn_timer(c, TIMER_IDLE, c->srv->lim.idle_timeout);
    /* an idle connection keeps no input buffer; one with a pipelined
     * request buffered is not idle */
    if (c->in_off == c->in.len) {
        inbuf_release(&c->in);
        c->in_off = 0;
        conn_idle_enter(c);
        /* a connection waits to be accepted: an idle one makes room */
        http_server *s = c->srv;
        if (s->blocked && !s->closed) {
            s->blocked = 0;
            srv_accept(s);
        }
    }
}

/* The body of the current request could not be read to its end: no later
 * request can be framed on this connection. */
static void conn_body_failed(http_conn *c, const char *msg) {
    http_req *r = c->req;
    c->dead = 1;
    if (!r) { conn_close(c); return; }
    r->keep_alive = 0;
    if (!r->body_err) r->body_err = msg;
    if (r->px) { px_client_body_failed(r->px); return; }
    req_wake(r);
    if (c->closing) return;
    if (r->written || r->discard) conn_close(c);
}

/* What llhttp found in the head it paused after. */
static void facts_of(const llhttp_t *ps, head_facts *f) {
    f->method = ps->method;
    f->major = ps->http_major;
    f->minor = ps->http_minor;
    f->keep_alive = llhttp_should_keep_alive(ps) && !ps->upgrade;
    f->has_length = (ps->flags & F_CONTENT_LENGTH) != 0;
    f->content_length = ps->content_length;
}

/* Room for the lean parser to read a head into h, from n bytes read. The
 * arena grows to at most 4 KiB here (a read may hold a large body behind a
 * small head); a larger head goes to llhttp, which grows it further for
 * the next one. */
static int head_room(http_head *h, size_t n, size_t max_head, int max_headers, head_fast *f) {
    head_reset(h);
    size_t want = n < 4096 ? n : 4096;
    if (want > max_head) want = max_head;
    if (buf_reserve(&h->arena, want)) return -1;
    if (h->hcap < 16) {
        http_header *nh = realloc(h->hdr, 16 * sizeof *nh);
        if (!nh) return -1;
        h->hdr = nh;
        h->hcap = 16;
    }
    f->arena = h->arena.p;
    f->arena_cap = h->arena.cap;
    f->max_head = max_head;
    f->hdr = h->hdr;
    f->hdr_cap = h->hcap < max_headers ? h->hcap : max_headers;
    return 0;
}

static void head_take(http_head *h, const head_fast *f) {
    h->arena.len = f->arena_len;
    h->nhdr = f->nhdr;
    h->first_len = f->first_len;
    if (f->is_request) {
        h->lean = 1;
        h->lines_as_sent = !f->facts.hop && !f->forwarded;
        h->host = f->host;
    }
}

/* `used` more bytes of the current head are consumed (head_scan has
 * looked at them when llhttp was the one reading) */
static void conn_head_bytes(http_conn *c, size_t used) {
    c->head_bytes += used;
    if (!c->got_bytes) {
        c->got_bytes = 1;
        conn_idle_leave(c);
        conn_timer(c, TIMER_HEADER, c->srv->lim.header_timeout);
    }
}

/* A whole plain head with no body at the start of p: the lean parser
 * (head.c) reads it, and llhttp never sees this message. Returns 1 when it
 * did. */
static int conn_exec_plain(http_conn *c, const char *p, size_t n) {
    head_fast f = { .is_request = 1 };
    if (head_room(&c->p.head, n, c->p.max_head, c->p.max_headers, &f)) return 0;
    size_t used = head_fast_parse(&f, p, n);
    if (used == 0 || f.facts.content_length > 0) return 0;
    head_take(&c->p.head, &f);
    c->in_off += used;
    conn_head_bytes(c, used);
    /* as llhttp would: paused at the end of the head, and the message
     * complete once resumed */
    c->paused = 1;
    c->plain_done = 1;
    on_head(c, &f.facts);
    return 1;
}

static void conn_exec(http_conn *c, const char *p, size_t n) {
    if (c->plain_done) {
        c->plain_done = 0;
        c->paused = 1;
        on_message_done(c);
        return;
    }
    if (c->phase == PHASE_HEAD && c->head_bytes == 0 && n > 0 && conn_exec_plain(c, p, n)) return;
    /* A proxy batches body bytes that point into c->in: they go out (or
     * are copied) before anything can move that buffer. */
    struct px *x = px_hold_of(c);
    llhttp_errno_t e = llhttp_execute(&c->p.parser, p, n);
    if (x) px_after_parse(x);
    size_t used = n;
    if (e != HPE_OK) {
        const char *pos = llhttp_get_error_pos(&c->p.parser);
        used = pos && pos >= p && pos <= p + n ? (size_t)(pos - p) : n;
    }
    c->in_off += used;
    if (c->phase == PHASE_HEAD && used > 0) {
        head_scan(c, p, used);
        conn_head_bytes(c, used);
    }
    switch (e) {
    case HPE_OK:
        if (c->phase == PHASE_HEAD) {
            if (c->bad_head) conn_reject(c, 400, c->bad_head);
            else if (c->head_bytes > c->srv->lim.max_head) conn_reject(c, 431, "request head too large");
        }
        return;
    case HPE_PAUSED: {
        int why = c->p.pause;
        c->p.pause = PAUSE_NONE;
        c->paused = 1;
        if (why == PAUSE_HEAD) {
            head_facts f;
            facts_of(&c->p.parser, &f);
            on_head(c, &f);
        } else {
            on_message_done(c);
        }
        return;
    }
    case HPE_PAUSED_UPGRADE:
        /* an upgrade request was answered; nothing follows it here */
        c->paused = 1;
        c->dead = 1;
        return;
    default:
        break;
    }
    const char *msg = c->p.error_msg ? c->p.error_msg : llhttp_get_error_reason(&c->p.parser);
    if (c->phase == PHASE_HEAD || !c->req || !c->req->dispatched) {
        conn_reject(c, c->p.error_status ? c->p.error_status : 400, msg);
    } else {
        conn_body_failed(c, c->p.error_status == 413 ? "request body too large"
                                                       : "malformed request body");
    }
}

/* Parse what is buffered as long as the parser may go on. Re-entered from a
 * task woken inside (body() returning, a response written at once): the
 * inner call only asks the outer loop to look again. */
static void conn_run(http_conn *c) {
    if (c->running) { c->rerun = 1; return; }
    c->running = 1;
    do {
        c->rerun = 0;
        while (!c->closing && !c->paused && !c->dead && c->phase != PHASE_LINGER) {
            size_t avail = c->in.len - c->in_off;
            if (avail == 0 && !c->flush) break;
            c->flush = 0;
            conn_exec(c, c->in.p ? c->in.p + c->in_off : "", avail);
        }
        if (!c->closing && c->in_off == c->in.len) c->in_off = c->in.len = 0;
        conn_update_reading(c);
    } while (c->rerun && !c->closing);
    c->running = 0;
    /* The client half-closed and everything it sent is parsed: once back
     * at a head it is all answered; a body still waiting cannot end. */
    if (!c->closing && c->eof && !c->dead && c->in_off >= c->in.len) {
        if (c->phase == PHASE_HEAD) conn_close(c);
        else if (c->phase == PHASE_BODY && !c->paused) conn_eof(c);
    }
}

static void conn_eof(http_conn *c) {
    /* Requests it pipelined before the FIN are still answered (conn_run
     * closes once they are); EOF with nothing pending while req:proxy
     * waits means the client is gone, as nginx takes it. */
    int pending = c->in.len > c->in_off;
    if (c->req && c->req->px) {
        if (!pending) px_client_eof(c->req->px);
        return;
    }
    switch (c->phase) {
    case PHASE_LINGER:
    case PHASE_HEAD:
        conn_close(c);
        return;
    default: {
        http_req *r = c->req;
        if (r && !r->dispatched) {
            conn_close(c);
        } else if (r && (r->msg_complete || !r->expects_body || pending)) {
            /* a client may half-close once its requests are out: they are
             * answered, then the connection closes (conn_run) */
        } else {
            /* a request body ended early; llhttp_finish cannot complete one */
            conn_body_failed(c, "the connection closed before the request body ended");
        }
        return;
    }
    }
}

static void conn_read_cb(uv_stream_t *h, ssize_t nread, const uv_buf_t *b) {
    http_conn *c = h->data;
    if (c->closing || nread == 0) return;
    if (c->phase == PHASE_TUNNEL) {
        if (c->req && c->req->px) px_tunnel_client_read(c->req->px, nread, b->base);
        else conn_close(c);
        return;
    }
    if (nread > 0) {
        if (c->phase == PHASE_LINGER) return;
        c->in.len += (size_t)nread;
        conn_run(c);
        return;
    }
    if (nread != UV_EOF) { conn_close(c); return; }
    c->eof = 1;
    uv_read_stop(h);
    c->reading = 0;
    conn_eof(c);
}

static int srv_on_headers_complete(llhttp_t *ps) {
    http_parse *p = ps->data;
    p->in_head = 0;
    p->pause = PAUSE_HEAD;
    return HPE_PAUSED;
}

static int srv_on_body(llhttp_t *ps, const char *at, size_t n) {
    http_conn *c = (http_conn *)ps->data;
    http_req *r = c->req;
    if (!r) return 0;
    r->seen += n;
    if (r->seen > c->srv->lim.max_body) return parse_fail(&c->p, 413, "request body too large");
    if (r->px) { px_client_body(r->px, at, n); return 0; }
    if (!r->want_body) return 0; /* dropped after the response */
    if (r->seen > r->body_max) {
        r->body_err = "request body too large";
        r->want_body = 0;
        r->keep_alive = 0;
        buf_free(&r->body);
        return parse_fail(&c->p, 413, "request body too large");
    }
    if (buf_add(&r->body, at, n)) return parse_fail(&c->p, 500, "out of memory");
    return 0;
}

static int srv_on_message_complete(llhttp_t *ps) {
    http_parse *p = ps->data;
    p->pause = PAUSE_DONE;
    return HPE_PAUSED;
}

/* ---- the server -------------------------------------------------------- */

static void srv_accept(http_server *s) {
    while (!s->closed && s->lis && s->lis->pending) {
        if (s->open >= s->lim.max_connections) {
            /* the connection idle the longest makes room, as in nginx */
            if (s->idle_head) {
                s->reclaimed++;
                conn_close(s->idle_head);
                continue;
            }
            /* libuv holds the connection and stops watching the socket
             * until it is accepted: the kernel's backlog waits. */
            s->blocked = 1;
            return;
        }
        http_conn *c = calloc(1, sizeof *c);
        if (!c) return;
        uv_loop_t *loop = s->lis->sock.handle.loop;
        c->is_pipe = s->lis->is_pipe;
        if (tn_sock_init(loop, &c->io.sock, c->is_pipe) != 0) { free(c); return; }
        uv_timer_init(loop, &c->timer);
        c->io.sock.handle.data = c;
        c->timer.data = c;
        c->handles = 2;
        c->srv = s;
        s->refs++;
        c->next = s->conns;
        if (s->conns) s->conns->prev = c;
        s->conns = c;
        s->open++;
        int rc = tn_listener_accept(s->lis, &c->io.sock);
        if (!rc) rc = tn_io_open(&c->io);
        if (rc) { conn_close(c); return; }
        s->accepted++;
        tn_sock_peer(&c->io.sock, c->is_pipe, c->peer, sizeof c->peer);
        if (c->is_pipe) {
            /* who connected, as the kernel saw it: the control socket must
             * tell an operator from an instance that found the path */
            struct ucred cred;
            socklen_t clen = sizeof cred;
            if (getsockopt(c->io.fd, SOL_SOCKET, SO_PEERCRED, &cred, &clen) == 0) c->peer_pid = cred.pid;
        }
        /* responses go out whole or as streamed pieces: none should wait
         * for the client's delayed ACK (Nagle) */
        if (!c->is_pipe) uv_tcp_nodelay(&c->io.sock.tcp, 1);
        llhttp_init(&c->p.parser, HTTP_REQUEST, &server_settings);
        c->p.parser.data = c;
        c->p.max_head = s->lim.max_head;
        c->p.max_headers = s->lim.max_headers;
        c->phase = PHASE_HEAD;
        /* the first request gets the header timeout from the start: a
         * connection that sends nothing is dropped as soon */
        conn_timer(c, TIMER_HEADER, s->lim.header_timeout);
        conn_update_reading(c);
    }
}

static void srv_on_conn(tn_listener *l, int status) {
    http_server *s = l->owner;
    if (status < 0) return; /* EMFILE and the like: libuv retries */
    srv_accept(s);
}

static void srv_on_listener_close(tn_listener *l, int status) {
    (void)status;
    http_server *s = l->owner;
    s->lis = NULL;
}

/* Stop accepting; idle connections close now, busy ones after their
 * current response (which then says Connection: close). */
static void srv_stop(http_server *s) {
    if (s->closed) return;
    s->closed = 1;
    s->blocked = 0;
    if (s->lis) {
        tn_listener *l = s->lis;
        s->lis = NULL;
        l->on_conn = NULL;
        l->on_close = NULL;
        l->owner = NULL;
        tn_listener_close(l);
    }
    if (s->lis_mem) {
        tn_listener_release(s->lis_mem);
        s->lis_mem = NULL;
    }
    luaL_unref(s->L, LUA_REGISTRYINDEX, s->lis_ref);
    s->lis_ref = LUA_NOREF;
    luaL_unref(s->L, LUA_REGISTRYINDEX, s->self_ref);
    s->self_ref = LUA_NOREF;
    http_conn *c = s->conns;
    while (c) {
        http_conn *next = c->next;
        if (c->phase == PHASE_HEAD && !c->got_bytes && !c->req) conn_close(c);
        c = next;
    }
}

static http_server *check_server(lua_State *L) {
    server_box *b = luaL_checkudata(L, 1, SERVER_MT);
    if (!b->s) luaL_error(L, "server is gone");
    return b->s;
}

static lua_Integer opt_limit(lua_State *L, int idx, const char *name, lua_Integer def,
                             lua_Integer lo, lua_Integer hi) {
    if (idx == 0) return def;
    lua_getfield(L, idx, name);
    if (lua_isnil(L, -1)) { lua_pop(L, 1); return def; }
    if (!lua_isinteger(L, -1)) luaL_error(L, "http.serve: %s must be an integer", name);
    lua_Integer v = lua_tointeger(L, -1);
    lua_pop(L, 1);
    if (v < lo || v > hi) luaL_error(L, "http.serve: %s out of range", name);
    return v;
}

/* http.serve(listener, handler [, options]) -> server */
static int l_serve(lua_State *L) {
    tn_listener *l = tn_listener_check(L, 1);
    luaL_checktype(L, 2, LUA_TFUNCTION);
    int oidx = 0;
    if (!lua_isnoneornil(L, 3)) {
        luaL_checktype(L, 3, LUA_TTABLE);
        oidx = 3;
    }
    if (l->on_conn) return luaL_error(L, "http.serve: the listener already has a server");
    if (l->waiter) return luaL_error(L, "http.serve: a task is accepting on the listener");
    http_limits lim;
    const lua_Integer big = (lua_Integer)1 << 40;
    lim.max_head = (size_t)opt_limit(L, oidx, "max_head", 16 * 1024, 256, 1 << 24);
    lim.max_headers = (int)opt_limit(L, oidx, "max_headers", 100, 1, 10000);
    lim.max_body = (size_t)opt_limit(L, oidx, "max_body", 10 * 1024 * 1024, 0, big);
    lim.header_timeout = opt_limit(L, oidx, "header_timeout", 10000, 1, big);
    lim.idle_timeout = opt_limit(L, oidx, "idle_timeout", 60000, 1, big);
    lim.body_timeout = opt_limit(L, oidx, "body_timeout", 60000, 1, big);
    lim.send_timeout = opt_limit(L, oidx, "send_timeout", 60000, 1, big);
    lim.max_connections = (int)opt_limit(L, oidx, "max_connections", 4096, 1, 1 << 20);
    lim.lazy_body = 0;
    if (oidx) {
        lua_getfield(L, oidx, "lazy_body");
        lim.lazy_body = lua_toboolean(L, -1);
        lua_pop(L, 1);
    }
    int has_on_error = 0;
    if (oidx) {
        lua_getfield(L, oidx, "on_error");
        if (!lua_isnil(L, -1)) {
            luaL_argexpected(L, lua_isfunction(L, -1), 3, "on_error to be a function");
            has_on_error = 1;
        } else {
            lua_pop(L, 1);
        }
    }

    http_server *s = calloc(1, sizeof *s);
    if (!s) return luaL_error(L, "out of memory");
    s->lim = lim;
    s->refs = 1; /* the Lua object */
    s->on_error_ref = has_on_error ? luaL_ref(L, LUA_REGISTRYINDEX) : LUA_NOREF;
    lua_pushvalue(L, 2);
    s->handler_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    lua_pushvalue(L, 1);
    s->lis_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    lua_rawgeti(L, LUA_REGISTRYINDEX, LUA_RIDX_MAINTHREAD);
    s->L = lua_tothread(L, -1);
    lua_pop(L, 1);
    s->lis = l;
    s->lis_mem = l;
    tn_listener_hold(l);
    server_box *b = lua_newuserdatauv(L, sizeof *b, 0);
    b->s = s;
    luaL_setmetatable(L, SERVER_MT);
    lua_pushvalue(L, -1);
    s->self_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    l->owner = s;
    l->on_conn = srv_on_conn;
    l->on_close = srv_on_listener_close;
    srv_accept(s); /* a connection may already be waiting */
    return 1;
}

static int l_server_close(lua_State *L) {
    srv_stop(check_server(L));
    return 0;
}

/* Every connection closed now, requests in flight with them. */
static void srv_cut(http_server *s) {
    s->refs++;
    while (s->conns) conn_close(s->conns);
    srv_unref(s);
}

static void drain_cancel(void *arg) {
    http_server *s = arg;
    tn_task *t = s->drainer;
    s->drainer = NULL;
    if (t) tn_task_release(t);
    /* The deadline passed: what is still open is cut. */
    srv_cut(s);
}

/* server:cut(): stop accepting and close every connection at once; a drain
 * under way ends (true) as when its last connection finishes. For an
 * operator who asked a second time to stop. */
static int l_server_cut(lua_State *L) {
    http_server *s = check_server(L);
    srv_stop(s);
    srv_cut(s);
    return 0;
}

/* server:drain([timeout_ms]) -> true | nil, "timeout". True once every
 * connection sent its last response (some may still be saying goodbye);
 * at the deadline every connection still open is closed. */
static int l_server_drain(lua_State *L) {
    http_server *s = check_server(L);
    lua_Integer timeout = luaL_optinteger(L, 2, -1);
    srv_stop(s);
    if (s->open - s->lingering == 0) { lua_pushboolean(L, 1); return 1; }
    if (s->drainer) return luaL_error(L, "another task is already draining this server");
    tn_task *t = tn_task_check(L);
    s->drainer = tn_task_hold(t);
    s->dseq = tn_task_seq(t);
    return tn_task_wait_cancel(L, t, timeout, drain_cancel, s);
}

static void set_int(lua_State *L, const char *k, uint64_t v) {
    lua_pushinteger(L, (lua_Integer)v);
    lua_setfield(L, -2, k);
}

static int l_server_stats(lua_State *L) {
    http_server *s = check_server(L);
    lua_createtable(L, 0, 3);
    set_int(L, "connections_open", (uint64_t)s->open);
    set_int(L, "connections_accepted", (uint64_t)s->accepted);
    set_int(L, "requests", (uint64_t)s->requests);
    set_int(L, "direct_requests", (uint64_t)s->direct);
    set_int(L, "direct_service_requests", (uint64_t)s->direct_set);
    set_int(L, "connections_reclaimed", (uint64_t)s->reclaimed);
    set_int(L, "proxy_errors", (uint64_t)s->proxy_errors);
    set_int(L, "routes", s->nroutes);
    return 1;
}

/* Collected only once closed (it is anchored while it accepts), or when the
 * state closes: then no task may be resumed, so connections are left to the
 * process exit. */
static int l_server_gc(lua_State *L) {
    server_box *b = luaL_checkudata(L, 1, SERVER_MT);
    http_server *s = b->s;
    if (!s) return 0;
    b->s = NULL;
    if (!s->closed) {
        s->closed = 1;
        if (s->lis) {
            s->lis->on_conn = NULL;
            s->lis->on_close = NULL;
            s->lis = NULL;
        }
    }
    if (s->lis_mem) {
        tn_listener_release(s->lis_mem);
        s->lis_mem = NULL;
    }
    srv_unref(s);
    return 0;
}

static int l_server_tostring(lua_State *L) {
    server_box *b = luaL_checkudata(L, 1, SERVER_MT);
    if (!b->s) lua_pushliteral(L, "tenement.http.server (gone)");
    else lua_pushfstring(L, "tenement.http.server (%s, %d open)",
                         b->s->closed ? "closed" : "serving", b->s->open);
    return 1;
}

/* ====================================================================== */
/* Client                                                                 */
/* ====================================================================== */

typedef struct http_client {
    http_parse p;          /* first: llhttp's data pointer */
    tn_sock sock;
    int is_pipe;
    uv_connect_t creq;
    uv_write_t wreq;
    tn_task *t;
    uint64_t seq;
    lua_State *L;          /* the main thread */
    char *out;             /* the serialised request */
    size_t out_len;
    buf body;
    size_t max_body;
    int head_method;
    int complete, finished, closing, writing;
    int err;               /* a libuv error, or 0 */
    const char *errmsg;    /* a protocol error, with errcode */
    const char *errcode;
    char what[200];
} http_client;

static llhttp_settings_t client_settings;

static void client_free_cb(uv_handle_t *h) {
    http_client *cl = h->data;
    free(cl->out);
    buf_free(&cl->body);
    head_free(&cl->p.head);
    free(cl);
}

static void client_close(http_client *cl) {
    if (cl->closing) return;
    cl->closing = 1;
    uv_close(&cl->sock.handle, client_free_cb);
}

static int client_build_result(lua_State *L) {
    http_client *cl = lua_touserdata(L, 1);
    http_head *h = &cl->p.head;
    lua_createtable(L, 0, 5);
    lua_pushinteger(L, cl->p.parser.status_code);
    lua_setfield(L, -2, "status");
    lua_pushlstring(L, h->arena.p ? h->arena.p : "", h->first_len);
    lua_setfield(L, -2, "reason");
    lua_pushfstring(L, "%d.%d", cl->p.parser.http_major, cl->p.parser.http_minor);
    lua_setfield(L, -2, "version");
    push_headers(L, h);
    lua_setfield(L, -2, "headers");
    lua_pushlstring(L, cl->body.p ? cl->body.p : "", cl->body.len);
    lua_setfield(L, -2, "body");
    return 1;
}

/* Resume the task with the response or the failure, once. */
static void client_finish(http_client *cl) {
    if (cl->finished) return;
    cl->finished = 1;
    tn_task *t = cl->t;
    if (tn_task_waiting_for(t, cl->seq)) {
        lua_State *co = tn_task_thread(t);
        int n;
        if (cl->complete) {
            /* Built on the main thread under pcall: a memory error must not
             * escape into libuv. */
            lua_State *L = cl->L;
            int top = lua_gettop(L);
            lua_pushcfunction(L, client_build_result);
            lua_pushlightuserdata(L, cl);
            if (lua_pcall(L, 1, 1, 0) == LUA_OK) {
                lua_xmove(L, co, 1);
                n = 1;
            } else {
                lua_pushnil(co);
                lua_pushliteral(co, "out of memory");
                n = 2;
            }
            lua_settop(L, top);
        } else if (cl->err) {
            n = tn_fail_uv(co, cl->what, cl->err);
        } else {
            lua_pushnil(co);
            lua_pushfstring(co, "%s: %s", cl->what, cl->errmsg ? cl->errmsg : "failed");
            lua_pushstring(co, cl->errcode ? cl->errcode : "EPROTO");
            n = 3;
        }
        client_close(cl);
        tn_task_resume(t, n);
    } else {
        client_close(cl);
    }
    tn_task_release(t);
}

static void client_fail_uv(http_client *cl, const char *verb, int err) {
    if (cl->finished) return;
    char what[sizeof cl->what];
    snprintf(what, sizeof what, "%s", cl->what);
    snprintf(cl->what, sizeof cl->what, "%.16s %.180s", verb, what);
    cl->err = err;
    client_finish(cl);
}

static void client_fail(http_client *cl, const char *msg, const char *code) {
    if (cl->finished) return;
    cl->errmsg = msg;
    cl->errcode = code;
    client_finish(cl);
}

static void client_exec(http_client *cl, const char *p, size_t n) {
    llhttp_errno_t e = llhttp_execute(&cl->p.parser, p, n);
    if (e == HPE_OK) return;
    if (e == HPE_PAUSED && cl->complete) { client_finish(cl); return; }
    if (cl->p.error_status == 413) client_fail(cl, "response body too large", "E2BIG");
    else if (cl->p.error_status == 431) client_fail(cl, cl->p.error_msg, "E2BIG");
    else client_fail(cl, cl->p.error_msg ? cl->p.error_msg : llhttp_get_error_reason(&cl->p.parser),
                     "EPROTO");
}

static void client_read_cb(uv_stream_t *h, ssize_t nread, const uv_buf_t *b) {
    http_client *cl = h->data;
    if (cl->finished || nread == 0) return;
    if (nread > 0) { client_exec(cl, b->base, (size_t)nread); return; }
    if (nread != UV_EOF) { client_fail_uv(cl, "read from", (int)nread); return; }
    /* EOF ends a body read until close, and nothing else. */
    llhttp_errno_t e = llhttp_finish(&cl->p.parser);
    if ((e == HPE_OK || e == HPE_PAUSED) && cl->complete) { client_finish(cl); return; }
    client_fail(cl, "the connection closed before the response ended", "ECONNRESET");
}

static void client_alloc(uv_handle_t *h, size_t hint, uv_buf_t *b) {
    (void)h; (void)hint;
    b->base = scratch;
    b->len = sizeof scratch;
}

static void client_write_cb(uv_write_t *req, int status) {
    http_client *cl = req->data;
    cl->writing = 0;
    /* A server may answer and close before it read the whole request: a
     * complete response wins over the failed write. */
    if (status < 0 && status != UV_ECANCELED && !cl->complete) client_fail_uv(cl, "write to", status);
}

static void client_connect_cb(uv_connect_t *req, int status) {
    http_client *cl = req->data;
    if (cl->finished) return;
    if (status < 0) { client_fail_uv(cl, "connect", status); return; }
    uv_buf_t b = uv_buf_init(cl->out, (unsigned)cl->out_len);
    cl->wreq.data = cl;
    int rc = uv_write(&cl->wreq, &cl->sock.stream, &b, 1, client_write_cb);
    if (rc == 0) {
        cl->writing = 1;
        rc = uv_read_start(&cl->sock.stream, client_alloc, client_read_cb);
    }
    if (rc) client_fail_uv(cl, "write to", rc);
}

static int cl_on_headers_complete(llhttp_t *ps) {
    http_client *cl = (http_client *)ps->data;
    cl->p.in_head = 0;
    return cl->head_method ? 1 : 0;
}

static int cl_on_body(llhttp_t *ps, const char *at, size_t n) {
    http_client *cl = (http_client *)ps->data;
    if (cl->body.len + n > cl->max_body) return parse_fail(&cl->p, 413, "response body too large");
    if (buf_add(&cl->body, at, n)) return parse_fail(&cl->p, 500, "out of memory");
    return 0;
}

static int cl_on_message_complete(llhttp_t *ps) {
    http_client *cl = (http_client *)ps->data;
    int st = ps->status_code;
    if (st >= 100 && st < 200 && st != 101) {
        /* an interim response (100 Continue, 103 Early Hints): the real one follows */
        cl->body.len = 0;
        return 0;
    }
    cl->complete = 1;
    return HPE_PAUSED;
}

static void client_cancel(void *arg) {
    http_client *cl = arg;
    if (cl->finished) return;
    cl->finished = 1;
    tn_task_release(cl->t);
    client_close(cl);
}

/* Serialise the request into out (scratch that may be left half built when
 * this raises). */
typedef struct { buf *out; int has_host, chunked; } reqh_ctx;

static void reqh_header(const char *name, size_t nl, const char *val, size_t vl, void *ud) {
    reqh_ctx *x = ud;
    if (ieq(name, nl, "transfer-encoding")) {
        if (ieq(val, vl, "chunked")) x->chunked = 1;
        else x->chunked = -1;
        return;
    }
    if (ieq(name, nl, "content-length") || ieq(name, nl, "connection") || ieq(name, nl, "keep-alive"))
        return; /* framing and the connection are the client's job */
    if (ieq(name, nl, "host")) x->has_host = 1;
    buf_add(x->out, name, nl);
    buf_add(x->out, ": ", 2);
    buf_add(x->out, val, vl);
    buf_add(x->out, "\r\n", 2);
}

static void add_chunk(buf *out, const char *p, size_t n) {
    if (n == 0) return;
    buf_printf(out, "%zx\r\n", n);
    buf_add(out, p, n);
    buf_add(out, "\r\n", 2);
}

static void build_request(lua_State *L, buf *out, const tn_addr *a, const char *method,
                          const char *target, int hidx, int bidx) {
    reqh_ctx x = { out, 0, 0 };
    out->len = 0;
    buf_addstr(out, method);
    buf_addstr(out, " ");
    buf_addstr(out, target);
    buf_addstr(out, " HTTP/1.1\r\n");
    if (hidx) each_header(L, hidx, "http.request", reqh_header, &x);
    if (x.chunked < 0) luaL_error(L, "http.request: the only transfer coding sent is \"chunked\"");
    if (!x.has_host) buf_printf(out, "Host: %s\r\n", a->is_pipe ? "localhost" : a->text);
    int chunked = x.chunked || (bidx && lua_istable(L, bidx));
    if (chunked) {
        buf_addstr(out, "Transfer-Encoding: chunked\r\n");
    } else if (bidx) {
        buf_printf(out, "Content-Length: %zu\r\n", lua_rawlen(L, bidx));
    } else if (strcmp(method, "POST") == 0 || strcmp(method, "PUT") == 0 || strcmp(method, "PATCH") == 0) {
        buf_addstr(out, "Content-Length: 0\r\n");
    }
    buf_addstr(out, "Connection: close\r\n\r\n");
    if (bidx && lua_istable(L, bidx)) {
        lua_Integer n = (lua_Integer)lua_rawlen(L, bidx);
        for (lua_Integer i = 1; i <= n; i++) {
            if (lua_rawgeti(L, bidx, i) != LUA_TSTRING)
                luaL_error(L, "http.request: body chunk %d is not a string", (int)i);
            size_t cl;
            const char *chunk = lua_tolstring(L, -1, &cl);
            add_chunk(out, chunk, cl);
            lua_pop(L, 1);
        }
    } else if (bidx) {
        size_t bl;
        const char *body = lua_tolstring(L, bidx, &bl);
        if (chunked) add_chunk(out, body, bl);
        else buf_add(out, body, bl);
    }
    if (chunked) buf_addstr(out, "0\r\n\r\n");
    if (!out->p) luaL_error(L, "out of memory");
}

/* http.request{ path= | host=, port=, method=, target=, headers=, body=,
 *               timeout=, max_body= } -> res | nil, err, code */
static int l_request(lua_State *L) {
    static _Thread_local buf out;
    tn_addr a;
    int n = tn_addr_from_table(L, 1, &a, "connect");
    if (n) return n;
    lua_getfield(L, 1, "method");
    const char *method = luaL_optstring(L, -1, "GET");
    if (!is_token(method, strlen(method))) return luaL_error(L, "http.request: invalid method '%s'", method);
    lua_getfield(L, 1, "target");
    size_t tl;
    const char *target = luaL_optlstring(L, -1, "/", &tl);
    for (size_t i = 0; i < tl; i++)
        if ((unsigned char)target[i] <= ' ' || target[i] == 0x7f)
            return luaL_error(L, "http.request: the target holds a space or a control character");
    if (tl == 0) return luaL_error(L, "http.request: empty target");
    int hidx = 0, bidx = 0;
    if (lua_getfield(L, 1, "headers") != LUA_TNIL) {
        luaL_argexpected(L, lua_istable(L, -1), 1, "headers to be a table");
        hidx = lua_gettop(L);
    }
    int bt = lua_getfield(L, 1, "body");
    if (bt != LUA_TNIL) {
        luaL_argexpected(L, bt == LUA_TSTRING || bt == LUA_TTABLE, 1,
                         "body to be a string or an array of strings");
        bidx = lua_gettop(L);
    }
    lua_getfield(L, 1, "timeout");
    lua_Integer timeout = luaL_optinteger(L, -1, 30000);
    lua_getfield(L, 1, "max_body");
    lua_Integer max_body = luaL_optinteger(L, -1, 10 * 1024 * 1024);
    lua_getfield(L, 1, "max_head");
    lua_Integer max_head = luaL_optinteger(L, -1, 64 * 1024);
    lua_pop(L, 3);
    if (max_body < 0 || max_head < 256) return luaL_error(L, "http.request: limits out of range");
    tn_task *t = tn_task_check(L);
    build_request(L, &out, &a, method, target, hidx, bidx);

    http_client *cl = calloc(1, sizeof *cl);
    char *copy = malloc(out.len);
    if (!cl || !copy) { free(cl); free(copy); return luaL_error(L, "out of memory"); }
    memcpy(copy, out.p, out.len);
    cl->out = copy;
    cl->out_len = out.len;
    cl->max_body = (size_t)max_body;
    cl->is_pipe = a.is_pipe;
    cl->head_method = strcmp(method, "HEAD") == 0;
    snprintf(cl->what, sizeof cl->what, "%s", a.text);
    lua_rawgeti(L, LUA_REGISTRYINDEX, LUA_RIDX_MAINTHREAD);
    cl->L = lua_tothread(L, -1);
    lua_pop(L, 1);
    llhttp_init(&cl->p.parser, HTTP_RESPONSE, &client_settings);
    cl->p.parser.data = cl;
    cl->p.max_head = (size_t)max_head;
    cl->p.max_headers = 1000;
    int rc = tn_sock_init(tn_loop(L), &cl->sock, a.is_pipe);
    if (rc) { free(cl->out); free(cl); return tn_fail_uv(L, "connect", rc); }
    cl->sock.handle.data = cl;
    cl->creq.data = cl;
    rc = tn_sock_connect(&cl->creq, &cl->sock, &a, client_connect_cb);
    if (rc) {
        char what[200];
        snprintf(what, sizeof what, "connect %s", a.text);
        client_close(cl);
        return tn_fail_uv(L, what, rc);
    }
    cl->t = tn_task_hold(t);
    cl->seq = tn_task_seq(t);
    return tn_task_wait_cancel(L, t, timeout, client_cancel, cl);
}

/* ====================================================================== */
/* Proxy                                                                  */
/* ====================================================================== */

/*
 * One exchange (px) joins a server request (http_req on its http_conn) to
 * an upstream connection (px_up, from a keep-alive pool per address). Bytes
 * flow in C only: the request body is parsed by the server's llhttp and
 * re-framed towards the upstream from within the parser callbacks, the
 * response is parsed by the upstream's llhttp (HTTP_RESPONSE) and re-framed
 * towards the client. Pieces of a read buffer are gathered in a px_batch and
 * written with one writev before the read callback returns; only what the
 * kernel does not take at once is copied. Above PX_HIGH_WATER queued bytes
 * the reading side stops until the writing side drains below PX_LOW_WATER,
 * so a body of any size passes in bounded memory.
 *
 * Finishing (px_end) only records the outcome and detaches; handing it to
 * Lua (the task's resumption, and the follow-up on the client connection)
 * runs from the top of a libuv callback or from an idle handle, never from
 * inside a parser callback, where Lua could re-enter the parser.
 */

#define PX_HIGH_WATER (256 * 1024)
#define PX_LOW_WATER (64 * 1024)
#define PX_IDLE_MS 30000         /* an idle pooled connection is closed after this */
#define PX_LOOK_MS 1000          /* a response past its timeout: time to see the client read */
#define PX_NIOV 16
#define PX_STAGE 4096
#define PX_COPY_MAX 256          /* smaller pieces are copied into the stage */
#define PX_FREE_MAX 1024         /* exchanges kept for reuse while busy */
#define PX_FREE_IDLE 64          /* ... and once none was under way for PX_TRIM_MS */
#define PX_TRIM_MS 1000
#define PX_MAX_EXTRA 32          /* headers in opts.headers */
#define PX_MAX_TOKENS 16         /* tokens of a Connection header honoured */

typedef struct px px;
typedef struct px_up px_up;
typedef struct px_pool px_pool;
typedef struct px_state px_state;

typedef struct px_batch {
    int n;
    size_t len, stage_len;
    uv_buf_t iov[PX_NIOV];
    char stage[PX_STAGE];
} px_batch;

/* Per Lua state: the pools, finished exchanges waiting to be handed to Lua,
 * and exchanges kept for reuse. Lives as long as the process. */
struct px_state {
    uv_loop_t *loop;
    lua_State *L;            /* the main thread */
    uv_idle_t idle;
    int draining;
    px *done_head, *done_tail;
    uv_timer_t sweep;        /* closes idle connections past PX_IDLE_MS, trims free_px */
    uint64_t sweep_due;
    uint64_t trim_at;        /* when free_px goes down to PX_FREE_IDLE if none is under way; 0: no trim owed */
    px_up *lru_head, *lru_tail; /* idle connections, oldest first */
    px_pool **buckets;
    size_t nbuckets, npools;
    px *free_px;
    int nfree;
    int live;                /* exchanges allocated and not yet released */
};

struct px_pool {
    px_pool *next;           /* hash chain */
    px_state *st;
    uint32_t hash;
    unsigned gen;            /* bumped by pool_close: older connections are not kept */
    int refs;                /* connections, exchanges and upstreams using the pool */
    int nidle, active;
    int exchanges;           /* requests under way to this address */
    px_up *idle;             /* most recently used first */
    size_t tlen;
    tn_addr addr;
};

struct px_up {
    http_parse p;            /* first: llhttp's data pointer is the connection */
    tn_io io;
    uv_timer_t timer;        /* connect timeout and exchange inactivity (lazy) */
    uint64_t timer_due;      /* when it fires; 0 when stopped */
    uv_connect_t creq;
    px_state *st;
    px_pool *pool;
    px *x;                   /* the exchange it serves; NULL while idle */
    px_up *prev, *next;      /* in the pool's idle list */
    px_up *lru_prev, *lru_next;
    uint64_t idle_since;
    unsigned gen;
    int handles, closing, connected, reading, idle, throttled, wpending;
};

enum { PXB_NONE, PXB_BUFFERED, PXB_LENGTH, PXB_CHUNKED };   /* request body */
enum { PXR_NONE, PXR_LENGTH, PXR_CHUNKED, PXR_EOF };        /* response body to the client */
enum { PXA_NONE, PXA_WRITTEN, PXA_CLOSE, PXA_RESPOND };     /* follow-up on the client */
enum { PX_UP, PX_CLI };

struct px {
    /* reset for each exchange, up to `head` */
    int refs;
    px_state *st;
    px *next;                /* in the done queue or the free list */
    http_req *r;
    px_up *up;
    px_pool *pool;
    px_upstream *ups;        /* whose counters the exchange feeds, if any */
    tn_task *task;
    uint64_t seq;
    int64_t timeout, connect_timeout;
    int idle_pool;
    uint64_t connect_deadline;
    uint64_t t0;             /* uv_hrtime at the start */
    uint64_t last;           /* uv_now at the last progress */
    uint64_t sent_seen;      /* px_sent when the timer last looked */
    int sent_looked;
    int body_mode, resp_mode;
    int in_call, done, tunnel_wanted, upgraded, switching, interim, reused, retried;
    int head_method, body_started, body_done, resp_started, resp_done, resp_bytes;
    int plain_body, plain_keep; /* the lean parser read the response head */
    uint64_t plain_left;     /* ... and this much of its body is to come */
    int cli_keep, up_keep, up_failed, cli_pending, shutting;
    int after, respond_status, ok, status;
    uint64_t bytes_in, bytes_out;
    double upstream_ms;
    const char *code;
    char err[240];
    tn_io_req shut;
    /* kept across exchanges */
    buf head;                /* the request head, kept for a retry */
    buf rhead;               /* the response head for the client */
    px_batch to_up, to_cli;
};

static char px_state_key;
static llhttp_settings_t px_settings;

static void px_idle_cb(uv_idle_t *h);
static void px_up_close(px_up *up);
static void px_cli_flush(px *x);
static void px_up_flush(px *x);
static void px_send_head(px *x);
static void px_connect(px *x);
static void px_up_write_failed(px *x, int err);

/* ---- state, pools, exchanges ------------------------------------------ */

static px_state *px_state_peek(lua_State *L) {
    lua_rawgetp(L, LUA_REGISTRYINDEX, &px_state_key);
    px_state *st = lua_touserdata(L, -1);
    lua_pop(L, 1);
    return st;
}

static px_state *px_state_get(lua_State *L) {
    px_state *st = px_state_peek(L);
    if (st) return st;
    st = calloc(1, sizeof *st);
    px_pool **b = calloc(64, sizeof *b);
    if (!st || !b) { free(st); free(b); luaL_error(L, "out of memory"); }
    st->buckets = b;
    st->nbuckets = 64;
    st->loop = tn_loop(L);
    lua_rawgeti(L, LUA_REGISTRYINDEX, LUA_RIDX_MAINTHREAD);
    st->L = lua_tothread(L, -1);
    lua_pop(L, 1);
    uv_idle_init(st->loop, &st->idle);
    st->idle.data = st;
    uv_timer_init(st->loop, &st->sweep);
    st->sweep.data = st;
    uv_unref((uv_handle_t *)&st->sweep);
    lua_pushlightuserdata(L, st);
    lua_rawsetp(L, LUA_REGISTRYINDEX, &px_state_key);
    return st;
}

static uint32_t px_hash(int is_pipe, const char *s, size_t n) {
    uint32_t h = 2166136261u ^ (uint32_t)is_pipe;
    for (size_t i = 0; i < n; i++) {
        h ^= (unsigned char)s[i];
        h *= 16777619u;
    }
    return h;
}

static px_pool *px_pool_find(px_state *st, int is_pipe, const char *text, size_t n, uint32_t h) {
    for (px_pool *p = st->buckets[h & (st->nbuckets - 1)]; p; p = p->next)
        if (p->hash == h && p->addr.is_pipe == is_pipe && p->tlen == n && memcmp(p->addr.text, text, n) == 0)
            return p;
    return NULL;
}

static px_pool *px_pool_add(px_state *st, const tn_addr *a, uint32_t h) {
    if (st->npools >= st->nbuckets) {
        size_t nb = st->nbuckets * 2;
        px_pool **b = calloc(nb, sizeof *b);
        if (b) {
            for (size_t i = 0; i < st->nbuckets; i++) {
                px_pool *p = st->buckets[i];
                while (p) {
                    px_pool *next = p->next;
                    p->next = b[p->hash & (nb - 1)];
                    b[p->hash & (nb - 1)] = p;
                    p = next;
                }
            }
            free(st->buckets);
            st->buckets = b;
            st->nbuckets = nb;
        }
    }
    px_pool *p = calloc(1, sizeof *p);
    if (!p) return NULL;
    p->st = st;
    p->hash = h;
    p->addr = *a;
    p->tlen = strlen(a->text);
    px_pool **head = &st->buckets[h & (st->nbuckets - 1)];
    p->next = *head;
    *head = p;
    st->npools++;
    return p;
}

static void px_pool_unref(px_pool *p) {
    if (--p->refs > 0) return;
    px_state *st = p->st;
    px_pool **pp = &st->buckets[p->hash & (st->nbuckets - 1)];
    while (*pp && *pp != p) pp = &(*pp)->next;
    if (*pp) *pp = p->next;
    st->npools--;
    free(p);
}

/* ---- upstreams ----------------------------------------------------------
 * An upstream is one service instance as the proxy sees it: where it
 * listens, how long to wait for it, and the counters of the requests it
 * served (every request proxied through it, by a handler with
 * req:proxy(upstream) or by a direct route, is counted here in C, so the
 * hot path builds no Lua table). Its memory is counted by its Lua object,
 * the direct routes naming it and the exchanges under way. */

#define UPSTREAM_MT "tenement.http.upstream"
#define UPS_MAX_BUCKETS 32

struct px_upstream {
    int refs;
    px_state *st;
    px_pool *pool;           /* where it proxies to; NULL until a path is set */
    unsigned epoch;          /* bumped by invalidate(): older direct routes are stale */
    int64_t timeout, connect_timeout;
    int idle_pool;
    const char *proto;
    lua_Integer inflight;
    uint64_t last_active;    /* uv_now when a request last started or ended */
    uint64_t requests, errors, bytes_in, bytes_out, by_class[5];
    int nbuckets;
    double bounds[UPS_MAX_BUCKETS];
    uint64_t counts[UPS_MAX_BUCKETS]; /* observations <= bounds[i], not cumulative */
    uint64_t observed;
    double sum;
    char name[128];
};

typedef struct { px_upstream *u; } ups_box;

static void ups_unref(px_upstream *u) {
    if (--u->refs > 0) return;
    if (u->pool) px_pool_unref(u->pool);
    free(u);
}

static px_upstream *ups_check(lua_State *L, int idx) {
    ups_box *b = luaL_checkudata(L, idx, UPSTREAM_MT);
    if (!b->u) luaL_error(L, "the upstream is closed");
    return b->u;
}

static void ups_observe(px_upstream *u, double secs) {
    u->observed++;
    u->sum += secs;
    for (int i = 0; i < u->nbuckets; i++) {
        if (secs <= u->bounds[i]) { u->counts[i]++; return; }
    }
}

/* Points u at a Unix socket path. Returns 0, or pushes nil, err, code and
 * returns 3. */
static int ups_target(lua_State *L, px_upstream *u, const char *path, size_t n) {
    if (n == 0) return luaL_error(L, "http.upstream: path is empty");
    if (u->pool && u->pool->tlen == n && memcmp(u->pool->addr.text, path, n) == 0) return 0;
    if (n >= sizeof ((tn_addr *)0)->path) {
        lua_pushnil(L);
        lua_pushfstring(L, "connect %s: ENAMETOOLONG: a Unix socket path must be shorter than 108 bytes", path);
        lua_pushliteral(L, "ENAMETOOLONG");
        return 3;
    }
    px_state *st = u->st;
    uint32_t h = px_hash(1, path, n);
    px_pool *p = px_pool_find(st, 1, path, n, h);
    if (!p) {
        tn_addr a;
        memset(&a, 0, sizeof a);
        a.is_pipe = 1;
        memcpy(a.path, path, n + 1);
        snprintf(a.text, sizeof a.text, "%s", path);
        p = px_pool_add(st, &a, h);
        if (!p) return luaL_error(L, "out of memory");
    }
    p->refs++;
    if (u->pool) px_pool_unref(u->pool);
    u->pool = p;
    u->epoch++; /* a direct route must not keep sending to the old path */
    return 0;
}

static int ups_int_opt(lua_State *L, const char *name, lua_Integer lo, lua_Integer hi, int64_t *out) {
    if (!lua_isinteger(L, -1)) return luaL_error(L, "http.upstream: %s must be an integer", name);
    lua_Integer v = lua_tointeger(L, -1);
    if (v < lo || v > hi) return luaL_error(L, "http.upstream: %s out of range", name);
    *out = v;
    return 0;
}

/* The options at idx onto u: every name known, a misspelt one raises.
 * Returns 0, or 3 with nil, err, code pushed (an unusable path). */
static int ups_set(lua_State *L, px_upstream *u, int idx) {
    const lua_Integer big = (lua_Integer)1 << 40;
    const char *path = NULL;
    size_t path_len = 0;
    lua_pushnil(L);
    while (lua_next(L, idx)) {
        if (lua_type(L, -2) != LUA_TSTRING) return luaL_error(L, "http.upstream: option names are strings");
        size_t kl;
        const char *k = lua_tolstring(L, -2, &kl);
        int64_t v = 0; /* set by ups_int_opt, which raises otherwise: -O3 cannot see that */
#define IS(lit) (kl == sizeof(lit) - 1 && memcmp(k, lit, kl) == 0)
        if (IS("path")) {
            if (lua_type(L, -1) != LUA_TSTRING) return luaL_error(L, "http.upstream: path must be a string");
            path = lua_tolstring(L, -1, &path_len);
        } else if (IS("name")) {
            if (lua_type(L, -1) != LUA_TSTRING) return luaL_error(L, "http.upstream: name must be a string");
            snprintf(u->name, sizeof u->name, "%s", lua_tostring(L, -1));
        } else if (IS("timeout")) {
            ups_int_opt(L, "timeout", 1, big, &u->timeout);
        } else if (IS("connect_timeout")) {
            ups_int_opt(L, "connect_timeout", 1, big, &u->connect_timeout);
        } else if (IS("idle_pool")) {
            ups_int_opt(L, "idle_pool", 0, 1 << 20, &v);
            u->idle_pool = (int)v;
        } else if (IS("forwarded_proto")) {
            const char *s = lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1) : "";
            if (strcmp(s, "http") == 0) u->proto = "http";
            else if (strcmp(s, "https") == 0) u->proto = "https";
            else return luaL_error(L, "http.upstream: forwarded_proto must be \"http\" or \"https\"");
        } else if (IS("buckets")) {
            /* fixed once counted: changing them would mix two histograms */
            if (u->observed) return luaL_error(L, "http.upstream: buckets cannot change once counting began");
            if (!lua_istable(L, -1)) return luaL_error(L, "http.upstream: buckets must be a list of numbers");
            int n = (int)lua_rawlen(L, -1);
            if (n > UPS_MAX_BUCKETS) return luaL_error(L, "http.upstream: at most %d buckets", UPS_MAX_BUCKETS);
            for (int i = 1; i <= n; i++) {
                lua_rawgeti(L, -1, i);
                int isnum;
                double b = lua_tonumberx(L, -1, &isnum);
                lua_pop(L, 1);
                if (!isnum || (i > 1 && b <= u->bounds[i - 2]))
                    return luaL_error(L, "http.upstream: buckets must be increasing numbers");
                u->bounds[i - 1] = b;
            }
            u->nbuckets = n;
        } else {
            return luaL_error(L, "http.upstream: unknown option '%s'", k);
        }
#undef IS
        lua_pop(L, 1);
    }
    if (path) return ups_target(L, u, path, path_len);
    return 0;
}

/* http.upstream{ name, path, timeout, connect_timeout, idle_pool,
 * forwarded_proto, buckets } -> upstream | nil, err, code */
static int l_upstream(lua_State *L) {
    luaL_checktype(L, 1, LUA_TTABLE);
    lua_settop(L, 1);
    px_state *st = px_state_get(L);
    ups_box *b = lua_newuserdatauv(L, sizeof *b, 0);
    b->u = NULL;
    luaL_setmetatable(L, UPSTREAM_MT);
    px_upstream *u = calloc(1, sizeof *u);
    if (!u) return luaL_error(L, "out of memory");
    u->refs = 1;
    u->st = st;
    u->timeout = 60000;
    u->connect_timeout = 5000;
    u->idle_pool = 16;
    u->proto = "http";
    snprintf(u->name, sizeof u->name, "upstream");
    b->u = u; /* from here on __gc frees it, also when ups_set raises */
    int n = ups_set(L, u, 1);
    if (n) return n;
    lua_settop(L, 2);
    return 1;
}

/* upstream:set{...} -> true | nil, err, code: the options of http.upstream */
static int l_ups_set(lua_State *L) {
    px_upstream *u = ups_check(L, 1);
    luaL_checktype(L, 2, LUA_TTABLE);
    lua_settop(L, 2);
    int n = ups_set(L, u, 2);
    if (n) return n;
    lua_pushboolean(L, 1);
    return 1;
}

/* upstream:invalidate(): the direct routes to it are dropped (each at its
 * next lookup), so requests go through the handler again. */
static int l_ups_invalidate(lua_State *L) {
    ups_check(L, 1)->epoch++;
    return 0;
}

static int l_ups_inflight(lua_State *L) {
    lua_pushinteger(L, ups_check(L, 1)->inflight);
    return 1;
}

/* upstream:last_active() -> ms on core.now()'s clock, or nil if never used */
static int l_ups_last_active(lua_State *L) {
    px_upstream *u = ups_check(L, 1);
    if (!u->last_active) lua_pushnil(L);
    else lua_pushinteger(L, (lua_Integer)u->last_active);
    return 1;
}

/* upstream:stats() -> { requests, errors, bytes_in, bytes_out, inflight,
 * path, by_class = { ["2xx"] = n, ... }, latency = { buckets, counts, sum,
 * count } } (latency in seconds, counts per bucket, not cumulative) */
static int l_ups_stats(lua_State *L) {
    px_upstream *u = ups_check(L, 1);
    lua_createtable(L, 0, 8);
    set_int(L, "requests", u->requests);
    set_int(L, "errors", u->errors);
    set_int(L, "bytes_in", u->bytes_in);
    set_int(L, "bytes_out", u->bytes_out);
    set_int(L, "inflight", (uint64_t)u->inflight);
    if (u->pool) {
        lua_pushstring(L, u->pool->addr.text);
        lua_setfield(L, -2, "path");
    }
    lua_createtable(L, 0, 5);
    for (int i = 0; i < 5; i++) {
        char k[4] = { (char)('1' + i), 'x', 'x', 0 };
        set_int(L, k, u->by_class[i]);
    }
    lua_setfield(L, -2, "by_class");
    lua_createtable(L, 0, 4);
    lua_createtable(L, u->nbuckets, 0);
    lua_createtable(L, u->nbuckets, 0);
    for (int i = 0; i < u->nbuckets; i++) {
        lua_pushnumber(L, u->bounds[i]);
        lua_rawseti(L, -3, i + 1);
        lua_pushinteger(L, (lua_Integer)u->counts[i]);
        lua_rawseti(L, -2, i + 1);
    }
    lua_setfield(L, -3, "counts");
    lua_setfield(L, -2, "buckets");
    lua_pushnumber(L, u->sum);
    lua_setfield(L, -2, "sum");
    set_int(L, "count", u->observed);
    lua_setfield(L, -2, "latency");
    return 1;
}

static int l_ups_gc(lua_State *L) {
    ups_box *b = luaL_checkudata(L, 1, UPSTREAM_MT);
    if (b->u) {
        ups_unref(b->u);
        b->u = NULL;
    }
    return 0;
}

static int l_ups_tostring(lua_State *L) {
    ups_box *b = luaL_checkudata(L, 1, UPSTREAM_MT);
    if (!b->u) lua_pushliteral(L, "tenement.http.upstream (closed)");
    else lua_pushfstring(L, "tenement.http.upstream (%s -> %s)", b->u->name,
                         b->u->pool ? b->u->pool->addr.text : "nowhere");
    return 1;
}

/* What an exchange through u did, counted once at its end. A client that
 * went away is a request but not the upstream's failure. */
static void ups_account(px *x) {
    px_upstream *u = x->ups;
    u->inflight--;
    u->requests++;
    u->last_active = uv_now(x->st->loop);
    if (x->ok) {
        int c = x->status / 100;
        if (c >= 1 && c <= 5) u->by_class[c - 1]++;
        u->bytes_in += x->bytes_in;
        u->bytes_out += x->bytes_out;
        ups_observe(u, (double)(uv_hrtime() - x->t0) / 1e9);
    } else if (!x->code || strcmp(x->code, "ECONNABORTED") != 0) {
        u->errors++;
        u->by_class[4]++;
        x->r->srv->proxy_errors++;
    }
}

/* ---- direct routes ------------------------------------------------------
 * A handler that decided where a Host goes may tell the server (srv:route),
 * and the server then proxies that Host's requests itself, with no task,
 * no request object and no Lua at all, until one of the upstreams involved
 * is invalidated. A route is one upstream, or several with weights (one
 * is drawn per request), and an optional guard: an upstream used only for
 * its epoch, which the handler invalidates when the set itself changes (an
 * instance added to a service, a weight moved). The key is the Host header
 * exactly as sent: normalising belongs to the handler, and every spelling
 * it routed gets an entry of its own. The table is bounded: past
 * ROUTES_MAX entries it starts over. */

#define ROUTES_MAX 4096
#define ROUTE_MEMBERS_MAX 256

typedef struct route_member {
    px_upstream *u;
    unsigned epoch;
    uint32_t weight;
} route_member;

struct srv_route {
    srv_route *next;
    px_upstream *guard;      /* or NULL */
    unsigned guard_epoch;
    uint32_t hash, total;    /* total: the sum of the weights */
    int n;
    int is_set;              /* a service's weighted set (a list), not one instance */
    size_t hl;
    char *host;              /* after the members, in the same allocation */
    route_member m[];
};

static uint32_t route_hash(const char *s, size_t n) { return px_hash(2, s, n); }

static void srv_route_free(srv_route *e) {
    for (int i = 0; i < e->n; i++) ups_unref(e->m[i].u);
    if (e->guard) ups_unref(e->guard);
    free(e);
}

static void srv_routes_clear(http_server *s) {
    for (size_t i = 0; i < s->route_buckets; i++) {
        srv_route *e = s->routes[i];
        while (e) {
            srv_route *next = e->next;
            srv_route_free(e);
            e = next;
        }
        s->routes[i] = NULL;
    }
    s->nroutes = 0;
}

static srv_route **srv_route_slot(http_server *s, const char *host, size_t hl, uint32_t h) {
    srv_route **pp = &s->routes[h & (s->route_buckets - 1)];
    while (*pp && !((*pp)->hash == h && (*pp)->hl == hl && memcmp((*pp)->host, host, hl) == 0))
        pp = &(*pp)->next;
    return pp;
}

static int route_stale(const srv_route *e) {
    if (e->guard && e->guard->epoch != e->guard_epoch) return 1;
    for (int i = 0; i < e->n; i++)
        if (e->m[i].u->epoch != e->m[i].epoch || !e->m[i].u->pool) return 1;
    return 0;
}

/* xorshift: the draw among weighted upstreams needs to be cheap, not
 * unpredictable */
static uint32_t route_draw(uint32_t total) {
    static _Thread_local uint32_t x = 2463534242u;
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    return x % total;
}

/* host: h's one Host header (on_head has checked there is exactly one) */
static px_upstream *srv_route_lookup(http_server *s, const http_head *h, const http_header *host, int *is_set) {
    const char *v = head_str(h, host->value);
    uint32_t hash = route_hash(v, host->value_len);
    srv_route **pp = srv_route_slot(s, v, host->value_len, hash);
    srv_route *e = *pp;
    if (!e) return NULL;
    if (route_stale(e)) {
        *pp = e->next;
        s->nroutes--;
        srv_route_free(e);
        return NULL;
    }
    *is_set = e->is_set;
    if (e->n == 1) return e->m[0].u;
    uint32_t r = route_draw(e->total);
    for (int i = 0; i < e->n; i++) {
        if (r < e->m[i].weight) return e->m[i].u;
        r -= e->m[i].weight;
    }
    return e->m[e->n - 1].u;
}

/* srv:route(host, target [, guard]): requests whose Host header is exactly
 * host go straight to target, an upstream or a list { up1, weight1, up2,
 * weight2, ... } drawn from by weight, until any of them (or the guard) is
 * invalidated; a nil target removes the route. */
static int l_server_route(lua_State *L) {
    http_server *s = check_server(L);
    size_t hl;
    const char *host = luaL_checklstring(L, 2, &hl);
    int n = 0;
    if (lua_istable(L, 3)) {
        lua_Integer len = (lua_Integer)lua_rawlen(L, 3);
        if (len < 2 || len % 2 || len / 2 > ROUTE_MEMBERS_MAX)
            return luaL_argerror(L, 3, "a list of upstream, weight pairs (at most 256)");
        n = (int)(len / 2);
        for (int i = 0; i < n; i++) {
            lua_rawgeti(L, 3, 2 * i + 1);
            ups_check(L, -1);
            lua_rawgeti(L, 3, 2 * i + 2);
            lua_Integer w = lua_isinteger(L, -1) ? lua_tointeger(L, -1) : 0;
            if (w < 1 || w > 1000000) return luaL_argerror(L, 3, "weights are integers in 1..1000000");
            lua_pop(L, 2);
        }
    } else if (!lua_isnoneornil(L, 3)) {
        ups_check(L, 3);
        n = 1;
    }
    px_upstream *guard = lua_isnoneornil(L, 4) ? NULL : ups_check(L, 4);
    if (!s->routes) {
        s->routes = calloc(1024, sizeof *s->routes);
        if (!s->routes) return luaL_error(L, "out of memory");
        s->route_buckets = 1024;
    }
    uint32_t h = route_hash(host, hl);
    srv_route **pp = srv_route_slot(s, host, hl, h);
    if (*pp) {
        srv_route *e = *pp;
        *pp = e->next;
        s->nroutes--;
        srv_route_free(e);
    }
    if (n == 0 || s->closed) return 0;
    if (s->nroutes >= ROUTES_MAX) {
        srv_routes_clear(s);
        pp = srv_route_slot(s, host, hl, h);
    }
    srv_route *e = calloc(1, sizeof *e + (size_t)n * sizeof e->m[0] + hl);
    if (!e) return luaL_error(L, "out of memory");
    e->n = n;
    e->is_set = lua_istable(L, 3);
    for (int i = 0; i < n; i++) {
        px_upstream *u;
        uint32_t w = 1;
        if (lua_istable(L, 3)) {
            lua_rawgeti(L, 3, 2 * i + 1);
            u = ((ups_box *)lua_touserdata(L, -1))->u;
            lua_rawgeti(L, 3, 2 * i + 2);
            w = (uint32_t)lua_tointeger(L, -1);
            lua_pop(L, 2);
        } else {
            u = ((ups_box *)lua_touserdata(L, 3))->u;
        }
        e->m[i].u = u;
        e->m[i].epoch = u->epoch;
        e->m[i].weight = w;
        e->total += w;
        u->refs++;
    }
    if (guard) {
        e->guard = guard;
        e->guard_epoch = guard->epoch;
        guard->refs++;
    }
    e->host = (char *)&e->m[n];
    memcpy(e->host, host, hl);
    e->hl = hl;
    e->hash = h;
    e->next = *pp;
    *pp = e;
    s->nroutes++;
    return 0;
}

/* srv:clear_routes(): every request goes through the handler again. */
static int l_server_clear_routes(lua_State *L) {
    srv_routes_clear(check_server(L));
    return 0;
}

static void batch_reset(px_batch *b) { b->n = 0; b->len = b->stage_len = 0; }

static px *px_new(px_state *st) {
    px *x = st->free_px;
    if (x) {
        st->free_px = x->next;
        st->nfree--;
        memset(x, 0, offsetof(px, head));
    } else {
        x = calloc(1, sizeof *x);
        if (!x) return NULL;
    }
    x->st = st;
    x->refs = 1;
    st->live++;
    st->trim_at = 0; /* a trim waits for PX_TRIM_MS with none under way */
    x->head.len = x->rhead.len = 0;
    batch_reset(&x->to_up);
    batch_reset(&x->to_cli);
    return x;
}

static void px_hold(px *x) { x->refs++; }

static void px_free(px *x) {
    buf_free(&x->head);
    buf_free(&x->rhead);
    free(x);
}

static void px_sweep_arm(px_state *st);

/* Kept for the next exchange: under load as many as were busy at once (a
 * fresh one is a 9 KiB calloc and two buffers grown again), and a few once
 * none has been under way for PX_TRIM_MS (px_trim). */
static void px_release(px *x) {
    if (--x->refs > 0) return;
    px_state *st = x->st;
    st->live--;
    if (st->nfree < PX_FREE_MAX && x->head.cap <= 64 * 1024 && x->rhead.cap <= 64 * 1024) {
        x->next = st->free_px;
        st->free_px = x;
        st->nfree++;
    } else {
        px_free(x);
    }
    /* Not at once: under load the count of exchanges under way touches 0
     * between bursts, and a trim there made the next burst calloc hundreds
     * of 9 KiB exchanges (cold memory, every line a cache miss). */
    if (st->live == 0 && st->nfree > PX_FREE_IDLE && !st->trim_at) {
        st->trim_at = uv_now(st->loop) + PX_TRIM_MS;
        if (!st->sweep_due || st->sweep_due > st->trim_at) px_sweep_arm(st);
    }
}

static void px_trim(px_state *st) {
    st->trim_at = 0;
    while (st->live == 0 && st->nfree > PX_FREE_IDLE) {
        px *spare = st->free_px;
        st->free_px = spare->next;
        st->nfree--;
        px_free(spare);
    }
}

/* ---- upstream connections ---------------------------------------------- */

static void px_up_closed_cb(uv_handle_t *h) {
    px_up *up = h->data;
    if (--up->handles > 0) return;
    head_free(&up->p.head);
    free(up);
}

static px_up *px_up_new(px_state *st, px_pool *pool) {
    px_up *up = calloc(1, sizeof *up);
    if (!up) return NULL;
    if (tn_sock_init(st->loop, &up->io.sock, pool->addr.is_pipe) != 0) { free(up); return NULL; }
    uv_timer_init(st->loop, &up->timer);
    up->io.sock.handle.data = up;
    up->timer.data = up;
    up->handles = 2;
    up->st = st;
    up->pool = pool;
    up->gen = pool->gen;
    pool->refs++;
    pool->active++;
    llhttp_init(&up->p.parser, HTTP_RESPONSE, &px_settings);
    up->p.parser.data = up;
    up->p.max_head = 64 * 1024;
    up->p.max_headers = 256;
    return up;
}

static void px_idle_unlink(px_up *up) {
    px_pool *pool = up->pool;
    px_state *st = up->st;
    if (up->prev) up->prev->next = up->next;
    else pool->idle = up->next;
    if (up->next) up->next->prev = up->prev;
    up->prev = up->next = NULL;
    if (up->lru_prev) up->lru_prev->lru_next = up->lru_next;
    else st->lru_head = up->lru_next;
    if (up->lru_next) up->lru_next->lru_prev = up->lru_prev;
    else st->lru_tail = up->lru_prev;
    up->lru_prev = up->lru_next = NULL;
    up->idle = 0;
    pool->nidle--;
}

static void px_up_close(px_up *up) {
    if (up->closing) return;
    up->closing = 1;
    up->reading = 0;
    if (up->idle) px_idle_unlink(up);
    else up->pool->active--;
    px_pool_unref(up->pool);
    up->pool = NULL;
    up->x = NULL;
    tn_io_close(&up->io, px_up_closed_cb);
    uv_close((uv_handle_t *)&up->timer, px_up_closed_cb);
}

static void px_up_alloc(uv_handle_t *h, size_t hint, uv_buf_t *b) {
    (void)h; (void)hint;
    b->base = scratch;
    b->len = sizeof scratch;
}

static void px_up_read_cb(uv_stream_t *s, ssize_t nread, const uv_buf_t *b);

static void px_up_update_reading(px_up *up) {
    int want = !up->closing && up->connected && !up->throttled;
    if (want && !up->reading) {
        tn_io_read_start(&up->io, px_up_alloc, px_up_read_cb);
        up->reading = 1;
    } else if (!want && up->reading) {
        tn_io_read_stop(&up->io);
        up->reading = 0;
    }
}

static void px_up_timer_cb(uv_timer_t *t);

/* One timer for all idle connections: the oldest goes first. */
static void px_sweep_cb(uv_timer_t *t);

static void px_sweep_arm(px_state *st) {
    st->sweep_due = 0;
    uint64_t due = st->trim_at;
    if (st->lru_head && (!due || st->lru_head->idle_since + PX_IDLE_MS < due))
        due = st->lru_head->idle_since + PX_IDLE_MS;
    if (!due) {
        uv_timer_stop(&st->sweep);
        return;
    }
    uint64_t now = uv_now(st->loop);
    uv_timer_start(&st->sweep, px_sweep_cb, due > now ? due - now : 0, 0);
    st->sweep_due = due;
}

static void px_sweep_cb(uv_timer_t *t) {
    px_state *st = t->data;
    uint64_t now = uv_now(st->loop);
    while (st->lru_head && st->lru_head->idle_since + PX_IDLE_MS <= now) px_up_close(st->lru_head);
    if (st->trim_at && st->trim_at <= now) px_trim(st);
    px_sweep_arm(st);
}

/* The connection's own timer, re-armed lazily like the server's. */
static void px_up_arm(px_up *up, uint64_t deadline) {
    if (up->timer_due && up->timer_due <= deadline) return;
    uint64_t now = uv_now(up->st->loop);
    uv_timer_start(&up->timer, px_up_timer_cb, deadline > now ? deadline - now : 0, 0);
    up->timer_due = deadline;
}

/* Back to the pool, or closed when it cannot serve another request. */
static void px_up_release(px_up *up, int idle_pool) {
    px_pool *pool = up->pool;
    up->x = NULL;
    if (up->gen != pool->gen || pool->nidle >= idle_pool || up->wpending ||
        tn_io_queued(&up->io) > 0) {
        px_up_close(up);
        return;
    }
    llhttp_reset(&up->p.parser);
    up->p.error_status = 0;
    up->p.error_msg = NULL;
    up->p.in_head = 0;
    up->throttled = 0;
    px_up_update_reading(up); /* an idle connection still reads: EOF means it is gone */
    if (!up->reading) { px_up_close(up); return; }
    pool->active--;
    pool->nidle++;
    up->idle = 1;
    up->prev = NULL;
    up->next = pool->idle;
    if (pool->idle) pool->idle->prev = up;
    pool->idle = up;
    px_state *st = up->st;
    up->idle_since = uv_now(st->loop);
    up->lru_next = NULL;
    up->lru_prev = st->lru_tail;
    if (st->lru_tail) st->lru_tail->lru_next = up;
    else st->lru_head = up;
    st->lru_tail = up;
    if (!st->sweep_due) px_sweep_arm(st);
    /* idle connections do not keep the loop running */
    tn_io_ref(&up->io, 0);
    uv_unref((uv_handle_t *)&up->timer);
}

static px_up *px_up_take(px_pool *pool) {
    px_up *up = pool->idle;
    if (!up) return NULL;
    px_idle_unlink(up);
    pool->active++;
    tn_io_ref(&up->io, 1);
    uv_ref((uv_handle_t *)&up->timer);
    return up;
}

/* ---- batches ------------------------------------------------------------ */

typedef struct px_wop {
    tn_io_req req;
    void *owner;             /* the px_up or the http_conn written to */
    char data[];
} px_wop;

/* -1 when the batch is full: flush, then add again. */
static int batch_copy(px_batch *b, const char *p, size_t n) {
    if (b->stage_len + n > PX_STAGE) return -1;
    char *dst = b->stage + b->stage_len;
    if (b->n > 0 && b->iov[b->n - 1].base + b->iov[b->n - 1].len == dst) {
        b->iov[b->n - 1].len += n;
    } else {
        if (b->n == PX_NIOV) return -1;
        b->iov[b->n].base = dst;
        b->iov[b->n].len = n;
        b->n++;
    }
    memcpy(dst, p, n);
    b->stage_len += n;
    b->len += n;
    return 0;
}

static int batch_ref(px_batch *b, const char *p, size_t n) {
    if (n <= PX_COPY_MAX) return batch_copy(b, p, n);
    if (b->n == PX_NIOV) return -1;
    b->iov[b->n].base = (char *)p;
    b->iov[b->n].len = n;
    b->n++;
    b->len += n;
    return 0;
}

/* Write the batch: what the kernel takes now, and a copy of the rest in a
 * write request. 0, or a libuv error. */
static int batch_flush(px_batch *b, tn_io *io, void *owner, tn_io_cb cb, int *queued) {
    if (b->n == 0) return 0;
    size_t total = b->len;
    int n = tn_io_try_write(io, b->iov, (unsigned)b->n);
    if (n == UV_EAGAIN || n == UV_ENOSYS) n = 0;
    if (n < 0) { batch_reset(b); return n; }
    size_t skip = (size_t)n;
    if (skip < total) {
        px_wop *w = malloc(sizeof *w + (total - skip));
        if (!w) { batch_reset(b); return UV_ENOMEM; }
        char *dst = w->data;
        for (int i = 0; i < b->n; i++) {
            size_t len = b->iov[i].len;
            if (skip >= len) { skip -= len; continue; }
            memcpy(dst, b->iov[i].base + skip, len - skip);
            dst += len - skip;
            skip = 0;
        }
        w->owner = owner;
        w->req.data = w;
        int rc = tn_io_write(io, &w->req, w->data, (size_t)(dst - w->data), cb);
        if (rc) { free(w); batch_reset(b); return rc; }
        (*queued)++;
    }
    batch_reset(b);
    return 0;
}

/* Add bytes bound for one side; copy = 1 when p does not outlive this call. */
static void px_out(px *x, int side, const char *p, size_t n, int copy) {
    if (x->done || n == 0) return;
    px_batch *b = side == PX_UP ? &x->to_up : &x->to_cli;
    for (int tries = 0; tries < 2; tries++) {
        if ((copy ? batch_copy(b, p, n) : batch_ref(b, p, n)) == 0) return;
        if (side == PX_UP) px_up_flush(x);
        else px_cli_flush(x);
        if (x->done) return;
    }
}

static void px_cli_write_cb(tn_io_req *req, int status);
static void px_up_write_cb(tn_io_req *req, int status);

static http_conn *px_client(px *x) {
    http_conn *c = x->r->conn;
    return c && !c->closing && c->req == x->r ? c : NULL;
}

static void px_cli_flush(px *x) {
    if (x->done || x->to_cli.n == 0) return;
    http_conn *c = px_client(x);
    if (!c) { batch_reset(&x->to_cli); return; }
    x->bytes_out += x->to_cli.len;
    int rc = batch_flush(&x->to_cli, &c->io, c, px_cli_write_cb, &x->cli_pending);
    if (rc) { conn_close(c); return; } /* which ends the exchange */
    px_up *up = x->up;
    if (up && !up->throttled && tn_io_queued(&c->io) > PX_HIGH_WATER) {
        up->throttled = 1;
        px_up_update_reading(up);
    }
}

static void px_up_flush(px *x) {
    if (x->done || x->to_up.n == 0) return;
    px_up *up = x->up;
    if (!up || x->up_failed) { batch_reset(&x->to_up); return; }
    int rc = batch_flush(&x->to_up, &up->io, up, px_up_write_cb, &up->wpending);
    if (rc) { px_up_write_failed(x, rc); return; }
    http_conn *c = px_client(x);
    if (c && !c->throttled && tn_io_queued(&up->io) > PX_HIGH_WATER) {
        c->throttled = 1;
        conn_update_reading(c);
    }
}

/* ---- finishing -------------------------------------------------------- */

static void px_drain(px_state *st);
static void px_queue_done(px *x);

/* Record the outcome, give the upstream connection back (or close it) and
 * let go of the request; the rest waits for px_deliver. */
__attribute__((format(printf, 5, 6)))
static void px_end(px *x, int ok, int after, const char *code, const char *fmt, ...) {
    if (x->done) return;
    x->done = 1;
    x->ok = ok;
    x->after = after;
    x->code = code;
    if (fmt) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(x->err, sizeof x->err, fmt, ap);
        va_end(ap);
    }
    px_up *up = x->up;
    if (up) {
        x->up = NULL;
        int reuse = ok && x->up_keep && x->resp_done && x->body_done && !x->tunnel_wanted &&
                    !x->up_failed && !up->closing;
        if (reuse) px_up_release(up, x->idle_pool);
        else px_up_close(up);
    }
    batch_reset(&x->to_up);
    batch_reset(&x->to_cli);
    http_req *r = x->r;
    if (r->px == x) r->px = NULL;
    http_conn *c = r->conn;
    if (c && c->throttled && !c->closing) {
        c->throttled = 0;
        if (c->phase != PHASE_TUNNEL) conn_update_reading(c);
    }
    if (x->in_call) return;
    px_queue_done(x);
}

/* To be delivered from the loop, outside whatever callback ended it. */
static void px_queue_done(px *x) {
    x->next = NULL;
    px_state *st = x->st;
    if (st->done_tail) st->done_tail->next = x;
    else st->done_head = x;
    st->done_tail = x;
    if (!uv_is_active((uv_handle_t *)&st->idle)) uv_idle_start(&st->idle, px_idle_cb);
}

static void px_check_complete(px *x) {
    if (x->done || !x->resp_done || x->cli_pending > 0) return;
    px_end(x, 1, PXA_WRITTEN, NULL, NULL);
}

typedef struct px_result {
    int ok, status, reused, upgraded;
    uint64_t bytes_in, bytes_out;
    double upstream_ms;
    const char *code;
    char err[240];
} px_result;

static void px_result_of(const px *x, px_result *res) {
    res->ok = x->ok;
    res->status = x->status;
    res->reused = x->reused;
    res->upgraded = x->upgraded;
    res->bytes_in = x->bytes_in;
    res->bytes_out = x->bytes_out;
    res->upstream_ms = x->upstream_ms;
    res->code = x->code ? x->code : "EIO";
    memcpy(res->err, x->err, sizeof res->err);
}

static int px_fill_stats(lua_State *L) {
    const px_result *res = lua_touserdata(L, 1);
    lua_settop(L, 2);
    lua_pushinteger(L, res->status);
    lua_setfield(L, -2, "status");
    lua_pushinteger(L, (lua_Integer)res->bytes_in);
    lua_setfield(L, -2, "bytes_in");
    lua_pushinteger(L, (lua_Integer)res->bytes_out);
    lua_setfield(L, -2, "bytes_out");
    lua_pushnumber(L, res->upstream_ms);
    lua_setfield(L, -2, "upstream_ms");
    lua_pushboolean(L, res->reused);
    lua_setfield(L, -2, "reused");
    lua_pushboolean(L, res->upgraded);
    lua_setfield(L, -2, "upgraded");
    return 1;
}

static int px_push_stats(lua_State *L) {
    lua_settop(L, 1);
    lua_createtable(L, 0, 6);
    return px_fill_stats(L);
}

static int px_push_fail(lua_State *L) {
    const px_result *res = lua_touserdata(L, 1);
    lua_pushnil(L);
    lua_pushstring(L, res->err);
    lua_pushstring(L, res->code);
    return 3;
}

/* Results onto co, built on the main thread under a protected call: a
 * memory error must not escape into libuv. */
static int px_push_result(lua_State *L, lua_State *co, px_result *res) {
    int top = lua_gettop(L);
    int stats = res->ok && lua_gettop(co) >= 1 && lua_istable(co, 1);
    lua_pushcfunction(L, res->ok ? (stats ? px_fill_stats : px_push_stats) : px_push_fail);
    lua_pushlightuserdata(L, res);
    if (stats) {
        lua_pushvalue(co, 1);
        lua_xmove(co, L, 1);
    }
    int n = res->ok ? 1 : 3;
    if (lua_pcall(L, stats ? 2 : 1, n, 0) != LUA_OK) {
        lua_settop(L, top);
        lua_pushnil(co);
        lua_pushliteral(co, "out of memory");
        lua_pushliteral(co, "ENOMEM");
        return 3;
    }
    lua_xmove(L, co, n);
    return n;
}

static void px_respond(http_req *r, int status, const char *detail) {
    static _Thread_local buf out;
    r->keep_alive = r->keep_alive && r->conn && !r->srv->closed;
    if (simple_response(&out, status, detail, !r->keep_alive) != 0) {
        if (r->conn) conn_close(r->conn);
        return;
    }
    req_send(r, out.p, out.len, NULL, 0);
}

/* x->err with the upstream's address (and the space before it) left out. */
static void px_err_without_addr(const px *x, char *out, size_t n) {
    const char *addr = x->pool ? x->pool->addr.text : "";
    size_t al = strlen(addr);
    const char *at = al ? strstr(x->err, addr) : NULL;
    if (!at) { snprintf(out, n, "%s", x->err); return; }
    size_t head = (size_t)(at - x->err);
    if (head > 0 && x->err[head - 1] == ' ') head--;
    snprintf(out, n, "%.*s%s", (int)head, x->err, at + al);
}

/* What the outcome means for the client connection. */
static void px_follow_up(px *x) {
    http_req *r = x->r;
    http_conn *c = r->conn;
    int mine = c && !c->closing && c->req == r;
    switch (x->after) {
    case PXA_WRITTEN:
        if (mine) {
            r->keep_alive = x->cli_keep;
            response_written(c);
        }
        break;
    case PXA_CLOSE:
        if (c && !c->closing) conn_close(c);
        break;
    case PXA_NONE:
        /* through an upstream the proxy answers its failures itself, the
         * same for a handler and a direct route */
        if (x->ups && !x->ok && mine && !r->responded &&
            !(x->code && strcmp(x->code, "ECONNABORTED") == 0)) {
            /* the answer goes to anyone, the upstream's address (a path on
             * this machine) only to the log */
            char detail[sizeof x->ups->name + sizeof x->err + 32];
            snprintf(detail, sizeof detail, "%s did not answer: %s", x->ups->name, x->err);
            srv_log(x->st->L, r->srv, "proxy", detail);
            char why[sizeof x->err];
            px_err_without_addr(x, why, sizeof why);
            snprintf(detail, sizeof detail, "%s did not answer (%s)", x->ups->name, why);
            px_respond(r, 502, detail);
        }
        break;
    case PXA_RESPOND:
        if (mine && !r->responded)
            px_respond(r, x->respond_status,
                       x->respond_status == 504 ? "the upstream did not answer in time" :
                       x->respond_status == 408 ? "the request body did not arrive in time" :
                       x->respond_status == 413 ? "the request body is larger than the server accepts" :
                       "malformed request body");
        break;
    default:
        break;
    }
}

static void px_forget(px *x) {
    http_req *r = x->r;
    px_pool *pool = x->pool;
    px_upstream *u = x->ups;
    x->r = NULL;
    x->pool = NULL;
    x->ups = NULL;
    px_release(x);
    if (u) ups_unref(u);
    if (pool) {
        pool->exchanges--;
        px_pool_unref(pool);
    }
    req_unref(r);
}

/* At the top of a callback: follow up on the client, then resume the task. */
static void px_deliver(px *x) {
    px_follow_up(x);
    if (x->ups) ups_account(x);
    px_result res;
    px_result_of(x, &res);
    tn_task *t = x->task;
    uint64_t seq = x->seq;
    lua_State *L = x->st->L;
    x->task = NULL;
    px_forget(x);
    if (!t) return;
    if (tn_task_waiting_for(t, seq)) {
        lua_State *co = tn_task_thread(t);
        tn_task_resume(t, px_push_result(L, co, &res));
    }
    tn_task_release(t);
}

static void px_drain(px_state *st) {
    if (st->draining) return;
    st->draining = 1;
    while (st->done_head) {
        px *x = st->done_head;
        st->done_head = x->next;
        if (!st->done_head) st->done_tail = NULL;
        px_deliver(x);
    }
    st->draining = 0;
    if (uv_is_active((uv_handle_t *)&st->idle)) uv_idle_stop(&st->idle);
}

static void px_idle_cb(uv_idle_t *h) { px_drain(h->data); }

/* ---- failures ---------------------------------------------------------- */

/* A pooled connection that the upstream closed meanwhile gets the request
 * again on a fresh one, but only while no byte of the body is lost, and
 * only an idempotent request: the upstream may have read and acted on it
 * before it closed (RFC 9110 9.2.2). */
static int px_can_retry(const px *x) {
    if (!x->reused || x->retried || x->resp_bytes) return 0;
    switch (x->r->head.method) {
    case HTTP_GET: case HTTP_HEAD: case HTTP_PUT: case HTTP_DELETE: case HTTP_OPTIONS: case HTTP_TRACE:
        break;
    default:
        return 0;
    }
    return x->body_mode == PXB_NONE || x->body_mode == PXB_BUFFERED || !x->body_started;
}

static void px_retry(px *x) {
    px_up *old = x->up;
    x->up = NULL;
    if (old) px_up_close(old);
    x->reused = 0;
    x->retried = 1;
    x->up_failed = 0;
    batch_reset(&x->to_up);
    px_connect(x);
}

static void px_up_write_failed(px *x, int err) {
    (void)err;
    if (x->done) return;
    if (px_can_retry(x)) { px_retry(x); return; }
    /* Stop sending; the read side tells what became of the response (an
     * upstream may answer and close without reading the whole body). */
    x->up_failed = 1;
    batch_reset(&x->to_up);
}

static void px_up_read_failed(px *x, const char *code, const char *fmt, const char *detail) {
    if (x->done) return;
    if (px_can_retry(x)) { px_retry(x); return; }
    if (x->resp_started && x->bytes_out == 0) {
        /* the head is parsed but still in the batch (the error came in the
         * same read): the client has seen nothing and gets an answer, not a
         * connection closed on it */
        x->resp_started = 0;
        x->status = 0;
        x->r->responded = 0;
        http_conn *c = px_client(x);
        if (c) c->eof_body_open = 0;
    }
    px_end(x, 0, x->resp_started ? PXA_CLOSE : PXA_NONE, code, fmt, x->pool->addr.text, detail);
}

static void px_fail_connect(px *x, int rc) {
    px_up *up = x->up;
    x->up = NULL;
    if (up) px_up_close(up);
    px_end(x, 0, PXA_NONE, uv_err_name(rc), "connect %s: %s: %s", x->pool->addr.text,
           uv_err_name(rc), uv_strerror(rc));
}

/* No progress for `timeout` ms. Before the response started the proxy
 * answers itself: 504, or 408 when it was the client's body that stalled. */
static void px_timeout(px *x) {
    if (x->resp_started) {
        px_end(x, 0, PXA_CLOSE, "ETIMEDOUT", "timeout");
        return;
    }
    int streaming = x->body_mode == PXB_LENGTH || x->body_mode == PXB_CHUNKED;
    int client_stall = streaming && !x->body_done && !x->up_failed && x->up &&
                       tn_io_queued(&x->up->io) == 0;
    if (client_stall) x->r->keep_alive = 0;
    x->respond_status = client_stall ? 408 : 504;
    px_end(x, 0, PXA_RESPOND, "ETIMEDOUT", "timeout");
}

/* ---- the client side (called by the server connection) ---------------- */

static struct px *px_hold_of(http_conn *c) {
    px *x = c->req ? c->req->px : NULL;
    if (x) px_hold(x);
    return x;
}

static void px_after_parse(struct px *x) {
    if (!x->done) px_up_flush(x);
    px_release(x);
}

/* Inside the server's parser: a piece of the request body. */
static void px_client_body(struct px *x, const char *at, size_t n) {
    if (x->done) return;
    x->bytes_in += n;
    x->last = uv_now(x->st->loop);
    if (x->up_failed) return;
    if (x->body_mode == PXB_CHUNKED) {
        char line[24];
        px_out(x, PX_UP, line, chunk_line(line, n), 1);
        px_out(x, PX_UP, at, n, 0);
        px_out(x, PX_UP, "\r\n", 2, 1);
    } else {
        px_out(x, PX_UP, at, n, 0);
    }
}

static void px_client_body_end(struct px *x) {
    if (x->done) return;
    x->body_done = 1;
    if (x->body_mode == PXB_CHUNKED) px_out(x, PX_UP, "0\r\n\r\n", 5, 1);
    px_up_flush(x);
}

static void px_client_body_failed(struct px *x) {
    if (x->done) return;
    http_req *r = x->r;
    http_conn *c = r->conn;
    if (!c || c->eof) {
        px_end(x, 0, PXA_CLOSE, "ECONNABORTED", "client closed");
    } else if (x->resp_started) {
        px_end(x, 0, PXA_CLOSE, "EPROTO", "%s", r->body_err);
    } else {
        int too_large = c->p.error_status == 413;
        x->respond_status = too_large ? 413 : 400;
        px_end(x, 0, PXA_RESPOND, too_large ? "E2BIG" : "EPROTO", "%s", r->body_err);
    }
}

static void px_client_eof(struct px *x) {
    if (x->done) return;
    px_end(x, 0, PXA_CLOSE, "ECONNABORTED", "client closed");
}

static void px_client_gone(struct px *x) {
    if (x->done) return;
    if (x->upgraded) px_end(x, 1, PXA_NONE, NULL, NULL); /* how a tunnel ends */
    else px_end(x, 0, PXA_NONE, "ECONNABORTED", "client closed");
}

static void px_cli_write_cb(tn_io_req *req, int status) {
    px_wop *w = req->data;
    http_conn *c = w->owner;
    free(w);
    if (c->closing) return;
    if (status < 0) { conn_close(c); return; }
    px *x = c->req ? c->req->px : NULL;
    if (!x) return;
    px_state *st = x->st;
    px_hold(x);
    x->cli_pending--;
    x->last = uv_now(st->loop);
    px_up *up = x->up;
    if (up && up->throttled && tn_io_queued(&c->io) < PX_LOW_WATER) {
        up->throttled = 0;
        px_up_update_reading(up);
    }
    px_check_complete(x);
    px_release(x);
    px_drain(st);
}

/* ---- the upstream side ------------------------------------------------- */

static void px_up_write_cb(tn_io_req *req, int status) {
    px_wop *w = req->data;
    px_up *up = w->owner;
    free(w);
    up->wpending--;
    if (up->closing) return;
    px *x = up->x;
    if (!x) return;
    px_state *st = up->st;
    px_hold(x);
    if (status < 0) {
        px_up_write_failed(x, status);
    } else {
        x->last = uv_now(st->loop);
        http_conn *c = px_client(x);
        if (c && c->throttled && tn_io_queued(&up->io) < PX_LOW_WATER) {
            c->throttled = 0;
            conn_update_reading(c);
        }
    }
    px_release(x);
    px_drain(st);
}

static void px_connect_cb(uv_connect_t *req, int status) {
    px_up *up = req->data;
    if (up->closing) return; /* cancelled: timed out, or the exchange ended */
    px *x = up->x;
    px_state *st = up->st;
    px_hold(x);
    if (status >= 0) status = tn_io_open(&up->io);
    if (status < 0) {
        px_fail_connect(x, status);
    } else {
        up->connected = 1;
        if (!up->pool->addr.is_pipe) uv_tcp_nodelay(&up->io.sock.tcp, 1);
        px_up_update_reading(up);
        px_send_head(x);
    }
    px_release(x);
    px_drain(st);
}

/* Bytes either peer read off its socket, both together. */
static uint64_t px_sent(px *x) {
    http_conn *c = px_client(x);
    return (c ? tn_io_delivered(&c->io) : 0) + (x->up ? tn_io_delivered(&x->up->io) : 0);
}

/* Bytes of a tunnel that a peer's socket did not take yet. */
static int px_tunnel_waiting(px *x) {
    http_conn *c = px_client(x);
    return (c && tn_io_queued(&c->io) > 0) || (x->up && tn_io_queued(&x->up->io) > 0);
}

/* After bytes moved through a tunnel: reading them is progress, and what a
 * peer did not take starts the clock on it. */
static void px_tunnel_moved(px *x) {
    if (x->done || !x->up) return;
    x->last = uv_now(x->st->loop);
    if (px_tunnel_waiting(x)) px_up_arm(x->up, x->last + (uint64_t)x->timeout);
}

static void px_up_timer_cb(uv_timer_t *t) {
    px_up *up = t->data;
    up->timer_due = 0;
    if (up->closing || up->idle) return; /* idle ones: px_sweep_cb */
    px *x = up->x;
    if (!x) return;
    px_state *st = up->st;
    uint64_t now = uv_now(st->loop);
    if (!up->connected) {
        if (now < x->connect_deadline) { px_up_arm(up, x->connect_deadline); return; }
        px_hold(x);
        x->up = NULL;
        px_up_close(up);
        px_end(x, 0, PXA_NONE, "ETIMEDOUT", "connect %s: ETIMEDOUT: no connection within %d ms",
               x->pool->addr.text, (int)x->connect_timeout);
    } else if (x->upgraded && !px_tunnel_waiting(x)) {
        return; /* a tunnel may stay quiet for as long as it likes */
    } else {
        /* a tunnel with bytes waiting for a peer is held to the timeout as
         * a response is: nothing taken, nothing read, for that long, and
         * both peers are cut (one that never reads would hold it for ever) */
        uint64_t deadline = x->last + (uint64_t)x->timeout;
        if (now >= deadline && x->resp_started) {
            /* Nothing came and no queued write completed, but a slow client
             * may have read meanwhile: a write completes only once all of it
             * is taken, and the socket's own buffer hides what it reads. The
             * count of bytes it took is looked at here only, past a deadline
             * (never per request): the first time, it gets PX_LOOK_MS more to
             * show it moves. */
            uint64_t sent = px_sent(x);
            if (!x->sent_looked) {
                x->sent_looked = 1;
                deadline = now + (uint64_t)(x->timeout < PX_LOOK_MS ? x->timeout : PX_LOOK_MS);
            } else if (sent != x->sent_seen) {
                x->last = now;
                deadline = now + (uint64_t)x->timeout;
            }
            x->sent_seen = sent;
        }
        if (now < deadline) { px_up_arm(up, deadline); return; }
        px_hold(x);
        px_timeout(x);
    }
    px_release(x);
    px_drain(st);
}

static void px_connect(px *x) {
    px_up *up = px_up_new(x->st, x->pool);
    if (!up) { px_end(x, 0, PXA_NONE, "ENOMEM", "connect %s: out of memory", x->pool->addr.text); return; }
    up->x = x;
    x->up = up;
    up->creq.data = up;
    int rc = tn_sock_connect(&up->creq, &up->io.sock, &x->pool->addr, px_connect_cb);
    if (rc) { px_fail_connect(x, rc); return; }
    x->connect_deadline = uv_now(x->st->loop) + (uint64_t)x->connect_timeout;
    px_up_arm(up, x->connect_deadline);
}

/* Connected (or taken from the pool): the head, then the body. */
static void px_send_head(px *x) {
    px_up *up = x->up;
    http_req *r = x->r;
    x->last = uv_now(x->st->loop);
    px_up_arm(up, x->last + (uint64_t)x->timeout);
    px_out(x, PX_UP, x->head.p, x->head.len, 0);
    if (x->body_mode == PXB_BUFFERED) {
        px_out(x, PX_UP, r->body.p, r->body.len, 0);
        x->bytes_in = r->body.len;
    }
    if (x->body_mode == PXB_LENGTH || x->body_mode == PXB_CHUNKED) {
        if (x->reused) {
            /* the head alone first: if this pooled connection is dead, the
             * body is still unread and the request can go elsewhere */
            px_up_flush(x);
            if (x->done || x->up != up) return;
        }
        http_conn *c = px_client(x);
        if (!c) { px_client_gone(x); return; }
        x->body_started = 1;
        start_body(c, r);
        if (x->done) return;
        conn_run(c);
        if (x->done) return;
    } else {
        x->body_done = 1;
    }
    px_up_flush(x);
    http_conn *c = px_client(x);
    if (c && !x->done) conn_update_reading(c);
}

/* ---- the response ------------------------------------------------------ */

typedef struct span { const char *p; size_t n; } span;

/* The tokens of every Connection header. */
static int conn_tokens(const http_head *h, span *out, int max) {
    int k = 0;
    for (int i = 0; i < h->nhdr; i++) {
        const http_header *x = &h->hdr[i];
        if (!name_is(h, x, "connection", 10)) continue;
        const char *v = head_str(h, x->value), *end = v + x->value_len;
        while (v < end && k < max) {
            while (v < end && (*v == ' ' || *v == '\t' || *v == ',')) v++;
            const char *s = v;
            while (v < end && *v != ',' && *v != ' ' && *v != '\t') v++;
            if (v > s) out[k++] = (span){ s, (size_t)(v - s) };
        }
    }
    return k;
}

static int in_spans(const span *t, int k, const char *name, size_t n) {
    for (int i = 0; i < k; i++)
        if (t[i].n == n && strncasecmp(t[i].p, name, n) == 0) return 1;
    return 0;
}

static int is_hop(const char *name, size_t n) {
    switch (n) {
    case 2: return ieq(name, n, "te");
    case 7: return ieq(name, n, "trailer") || ieq(name, n, "upgrade");
    case 10: return ieq(name, n, "connection") || ieq(name, n, "keep-alive");
    case 16: return ieq(name, n, "proxy-connection");
    case 17: return ieq(name, n, "transfer-encoding");
    default: return 0;
    }
}

/* RFC 9112's reason-phrase: llhttp lets any byte but CR and LF through, and
 * control bytes (NUL, ESC) have no business in the client's head. */
static int is_reason(const char *s, size_t n) {
    for (size_t i = 0; i < n; i++) {
        unsigned char ch = (unsigned char)s[i];
        if ((ch < 0x20 && ch != '\t') || ch == 0x7f) return 0;
    }
    return 1;
}

static void px_build_response_head(px *x, int st) {
    buf *o = &x->rhead;
    const http_head *h = &x->up->p.head;
    o->len = 0;
    buf_add(o, "HTTP/1.1 ", 9);
    buf_uint(o, (uint64_t)st);
    buf_add(o, " ", 1);
    if (h->first_len && is_reason(h->arena.p, h->first_len)) buf_add(o, h->arena.p, h->first_len);
    else buf_addstr(o, reason_phrase(st));
    buf_add(o, "\r\n", 2);
    span toks[PX_MAX_TOKENS];
    int nt = conn_tokens(h, toks, PX_MAX_TOKENS);
    for (int i = 0; i < h->nhdr; i++) {
        const http_header *hd = &h->hdr[i];
        const char *name = head_str(h, hd->name);
        size_t nl = hd->name_len;
        int upgrade = st == 101 && ieq(name, nl, "upgrade");
        /* the body was framed by this Content-Length: an upstream that
         * names it in Connection must not leave the client without one */
        int nominated = nt && in_spans(toks, nt, name, nl) && !ieq(name, nl, "content-length");
        if (!upgrade && (is_hop(name, nl) || nominated)) continue;
        /* 101 and 204 have no body: a length there (RFC 9110 8.6 forbids
         * it) would have a client that believes it read into the next
         * response */
        if ((st == 101 || st == 204) && ieq(name, nl, "content-length")) continue;
        buf_field(o, name, nl, head_str(h, hd->value), hd->value_len);
    }
    if (st == 101) {
        buf_addstr(o, "Connection: upgrade\r\n");
    } else {
        if (x->resp_mode == PXR_CHUNKED) buf_addstr(o, "Transfer-Encoding: chunked\r\n");
        if (!x->cli_keep) buf_addstr(o, "Connection: close\r\n");
        else if (x->r->head.minor == 0) buf_addstr(o, "Connection: keep-alive\r\n");
    }
    buf_add(o, "\r\n", 2);
}

/* Whether a response with status st to x's request has no body at all. */
static int px_no_body(const px *x, int st) {
    return st == 101 || x->head_method || st == 204 || st == 304;
}

/* A final response head (or a 101) is in: choose how its body reaches the
 * client, and send the client its head. Returns as an llhttp
 * on_headers_complete does: 0 with a body to come, 1 without, 2 after a
 * 101. raw: the head as received, when the client may have it as it is
 * (see px_up_plain), or NULL. */
static int px_response_head(px *x, int st, int by_length, const char *raw, size_t raw_len) {
    http_req *r = x->r;
    int no_body = px_no_body(x, st);
    int mode = PXR_NONE;
    if (!no_body) {
        if (!by_length) mode = r->head.minor >= 1 ? PXR_CHUNKED : PXR_EOF;
        else mode = PXR_LENGTH;
    }
    x->resp_mode = mode;
    http_conn *c = px_client(x);
    if (c && mode == PXR_EOF) c->eof_body_open = 1;
    x->cli_keep = st != 101 && r->keep_alive && !r->srv->closed && mode != PXR_EOF;
    x->status = st;
    x->upstream_ms = (double)(uv_hrtime() - x->t0) / 1e6;
    x->resp_started = 1;
    r->responded = 1;
    if (raw && x->cli_keep && r->head.minor == 1) {
        /* nothing to take out or add: the head goes on as received, under
         * this hop's version */
        px_out(x, PX_CLI, "HTTP/1.1", 8, 1);
        px_out(x, PX_CLI, raw + 8, raw_len - 8, 0);
    } else {
        px_build_response_head(x, st);
        px_out(x, PX_CLI, x->rhead.p, x->rhead.len, 0);
    }
    if (st == 101) return 2;
    return no_body ? 1 : 0;
}

static int px_on_headers_complete(llhttp_t *ps) {
    px_up *up = (px_up *)ps->data;
    up->p.in_head = 0;
    px *x = up->x;
    if (!x || x->done) return 1;
    int st = ps->status_code;
    if (st == 101) {
        if (!x->tunnel_wanted)
            return parse_fail(&up->p, 502, "101 Switching Protocols to a request that asked for no upgrade");
        x->switching = 1;
    } else if (st < 200) {
        x->interim = 1; /* 100, 103: the proxy answers 100 Continue itself; hints are dropped */
        return 1;
    } else {
        int n;
        const http_header *te = head_find(&up->p.head, "transfer-encoding", &n);
        if (te && (n > 1 || !ieq(head_str(&up->p.head, te->value), te->value_len, "chunked")))
            return parse_fail(&up->p, 502, "a transfer coding other than chunked");
    }
    return px_response_head(x, st, !(ps->flags & F_CHUNKED) && (ps->flags & F_CONTENT_LENGTH), NULL, 0);
}

static int px_on_body(llhttp_t *ps, const char *at, size_t n) {
    px_up *up = (px_up *)ps->data;
    px *x = up->x;
    if (!x || x->done) return 0;
    if (x->resp_mode == PXR_CHUNKED) {
        char line[24];
        px_out(x, PX_CLI, line, chunk_line(line, n), 1);
        px_out(x, PX_CLI, at, n, 0);
        px_out(x, PX_CLI, "\r\n", 2, 1);
    } else {
        px_out(x, PX_CLI, at, n, 0);
    }
    return 0;
}

static void px_response_done(px *x, int keep) {
    x->up_keep = keep;
    if (x->resp_mode == PXR_CHUNKED) px_out(x, PX_CLI, "0\r\n\r\n", 5, 1);
    x->resp_done = 1;
}

static int px_on_message_complete(llhttp_t *ps) {
    px_up *up = (px_up *)ps->data;
    px *x = up->x;
    if (!x || x->done) return HPE_PAUSED;
    if (x->interim) { x->interim = 0; return 0; }
    if (x->switching) return 0; /* llhttp stops with HPE_PAUSED_UPGRADE */
    /* Transfer-Encoding in HTTP/1.0 is faulty framing: the connection
     * closes after the message (RFC 9112 6.1), keep-alive or not */
    int faulty = ps->http_major == 1 && ps->http_minor == 0 && (ps->flags & F_TRANSFER_ENCODING);
    px_response_done(x, llhttp_should_keep_alive(ps) && !faulty);
    return HPE_PAUSED;
}

/* The lean parser's share of a response (head.c): a whole plain head at
 * the start of the first bytes, then the body its Content-Length frames.
 * Returns 0 for llhttp to read the response instead. */
static int px_up_plain(px *x, const char *p, size_t n) {
    size_t used = 0;
    if (!x->plain_body) {
        px_up *up = x->up;
        head_fast f = { .is_request = 0 };
        if (head_room(&up->p.head, n, up->p.max_head, up->p.max_headers, &f)) return 0;
        used = head_fast_parse(&f, p, n);
        if (used == 0) return 0;
        int st = f.facts.status;
        int no_body = px_no_body(x, st);
        if (!no_body && !f.facts.has_length) return 0; /* to the close: llhttp's */
        head_take(&up->p.head, &f);
        x->plain_keep = f.facts.keep_alive;
        /* As received when px_build_response_head would write the same
         * fields: no hop-by-hop header to drop, a reason to keep, and not a
         * 204 (whose Content-Length it drops). */
        int as_is = !f.facts.hop && f.first_len > 0 && st != 204;
        px_response_head(x, st, 1, as_is ? p : NULL, used);
        if (x->done) return 1;
        x->plain_body = 1;
        x->plain_left = no_body ? 0 : f.facts.content_length;
    }
    size_t take = n - used < x->plain_left ? n - used : (size_t)x->plain_left;
    if (take) px_out(x, PX_CLI, p + used, take, 0);
    used += take;
    x->plain_left -= take;
    if (x->plain_left == 0) px_response_done(x, x->plain_keep);
    if (used < n) x->up_keep = 0; /* bytes after the response: not a connection to keep */
    return 1;
}

static void px_tunnel_start(px *x, const char *rest, size_t n);

static void px_up_data(px *x, const char *p, size_t n) {
    px_up *up = x->up;
    if (x->resp_done) {
        /* The response is whole and still being written to the client: these
         * bytes are no part of it (the paused parser would drop them
         * unseen), and a connection that sends them is out of step. */
        x->up_keep = 0;
        return;
    }
    x->last = uv_now(x->st->loop);
    int first = !x->resp_bytes;
    x->resp_bytes = 1;
    if ((first || x->plain_body) && px_up_plain(x, p, n)) {
        if (x->done) return;
        px_cli_flush(x);
        px_check_complete(x);
        return;
    }
    llhttp_errno_t e = llhttp_execute(&up->p.parser, p, n);
    if (x->done) return;
    const char *pos = llhttp_get_error_pos(&up->p.parser);
    size_t used = pos && pos >= p && pos <= p + n ? (size_t)(pos - p) : n;
    switch (e) {
    case HPE_OK:
        break;
    case HPE_PAUSED_UPGRADE:
        px_tunnel_start(x, p + used, n - used);
        return;
    case HPE_PAUSED:
        if (used < n) x->up_keep = 0; /* bytes after the response: not a connection to keep */
        break;
    default: {
        const char *why = up->p.error_msg ? up->p.error_msg : llhttp_get_error_reason(&up->p.parser);
        px_up_read_failed(x, "EPROTO", "upstream %s sent a malformed response: %s", why ? why : "?");
        return;
    }
    }
    px_cli_flush(x);
    px_check_complete(x);
}

static void px_up_eof(px *x) {
    px_up *up = x->up;
    if (!x->resp_done) {
        llhttp_errno_t e = llhttp_finish(&up->p.parser);
        if (x->done) return;
        if (!x->resp_done || (e != HPE_OK && e != HPE_PAUSED)) {
            px_up_read_failed(x, "ECONNRESET", "upstream %s closed the connection %s",
                              x->resp_bytes ? "before the response ended" : "before responding");
            return;
        }
        px_cli_flush(x);
    }
    x->up_keep = 0;
    px_check_complete(x);
}

/* ---- the tunnel (after 101) -------------------------------------------- */

static void px_shut_cb(tn_io_req *req, int status) {
    (void)status;
    px *x = req->data;
    px_state *st = x->st;
    px_end(x, 1, PXA_CLOSE, NULL, NULL);
    px_release(x);
    px_drain(st);
}

/* One side ended: the other gets what is queued for it, then FIN, then
 * both close. An error closes both at once. */
static void px_tunnel_end(px *x, int from_client, ssize_t err) {
    if (x->done || x->shutting) return;
    http_conn *c = px_client(x);
    if (err != UV_EOF || !c || !x->up) { px_end(x, 1, PXA_CLOSE, NULL, NULL); return; }
    x->shutting = 1;
    c->throttled = 1;
    conn_update_reading(c);
    x->up->throttled = 1;
    px_up_update_reading(x->up);
    tn_io *other = from_client ? &x->up->io : &c->io;
    x->shut.data = x;
    px_hold(x);
    if (tn_io_shutdown(other, &x->shut, px_shut_cb) != 0) {
        px_release(x);
        px_end(x, 1, PXA_CLOSE, NULL, NULL);
        return;
    }
    px_tunnel_moved(x); /* the FIN waits behind what that peer has not taken */
}

static void px_tunnel_start(px *x, const char *rest, size_t n) {
    http_req *r = x->r;
    http_conn *c = px_client(x);
    x->upgraded = 1;
    r->keep_alive = 0;
    if (!c) { px_client_gone(x); return; }
    px_out(x, PX_CLI, rest, n, 0);
    px_cli_flush(x);
    if (x->done) return;
    c->phase = PHASE_TUNNEL;
    conn_timer(c, TIMER_NONE, 0);
    if (c->in_off < c->in.len) {
        /* the client did not wait for the 101 */
        size_t len = c->in.len - c->in_off;
        x->bytes_in += len;
        px_out(x, PX_UP, c->in.p + c->in_off, len, 0);
        px_up_flush(x);
        if (x->done) return;
    }
    inbuf_release(&c->in);
    c->in_off = 0;
    px_tunnel_moved(x);
    if (c->eof) px_tunnel_end(x, 1, UV_EOF); /* it sent its last bytes already */
    else conn_update_reading(c);
}

static void px_tunnel_client_read(struct px *x, ssize_t nread, const char *p) {
    px_state *st = x->st;
    px_hold(x);
    if (nread > 0) {
        x->bytes_in += (uint64_t)nread;
        px_out(x, PX_UP, p, (size_t)nread, 0);
        px_up_flush(x);
        px_tunnel_moved(x);
    } else {
        px_tunnel_end(x, 1, nread);
    }
    px_release(x);
    px_drain(st);
}

static void px_up_read_cb(uv_stream_t *s, ssize_t nread, const uv_buf_t *b) {
    px_up *up = s->data;
    if (nread == 0 || up->closing) return;
    px *x = up->x;
    if (!x) { px_up_close(up); return; } /* idle: bytes, EOF or an error all end it */
    px_state *st = up->st;
    px_hold(x);
    if (x->upgraded) {
        if (nread > 0) {
            px_out(x, PX_CLI, b->base, (size_t)nread, 0);
            px_cli_flush(x);
            px_tunnel_moved(x);
        } else {
            px_tunnel_end(x, 0, nread);
        }
    } else if (nread > 0) {
        px_up_data(x, b->base, (size_t)nread);
    } else if (nread == UV_EOF) {
        px_up_eof(x);
    } else {
        px_up_read_failed(x, uv_err_name((int)nread), "upstream %s: read: %s", uv_strerror((int)nread));
    }
    px_release(x);
    px_drain(st);
}

/* ---- building the request head ----------------------------------------- */

typedef struct px_extra {
    lua_State *L;
    buf *out;
    span names[PX_MAX_EXTRA];
    int n;
} px_extra;

static void px_extra_header(const char *name, size_t nl, const char *val, size_t vl, void *ud) {
    px_extra *e = ud;
    if (is_hop(name, nl) || ieq(name, nl, "content-length") || ieq(name, nl, "expect"))
        luaL_error(e->L, "req:proxy: the proxy sets header '%s' itself", name);
    if (!in_spans(e->names, e->n, name, nl)) {
        if (e->n == PX_MAX_EXTRA) luaL_error(e->L, "req:proxy: more than %d extra headers", PX_MAX_EXTRA);
        e->names[e->n++] = (span){ name, nl };
    }
    buf_field(e->out, name, nl, val, vl);
}

/* The client's address without its port, for X-Forwarded-For. */
static size_t peer_ip(const char *peer, const char **out) {
    if (strncmp(peer, "unix:", 5) == 0) { *out = "unix"; return 4; }
    if (peer[0] == '[') {
        const char *e = strchr(peer, ']');
        if (e) { *out = peer + 1; return (size_t)(e - peer - 1); }
    }
    const char *colon = strrchr(peer, ':');
    *out = peer;
    return colon ? (size_t)(colon - peer) : strlen(peer);
}

/* A head whose header lines go upstream as received (lines_as_sent, a
 * Host, no body, no extra headers): the fields px_build_request would
 * write, one copy of the client's lines instead of one field at a time
 * (Content-Length: 0, when sent, stays where the client put it). */
static int px_build_request_as_sent(buf *o, const http_req *r, const char *proto) {
    const http_head *h = &r->head;
    const http_header *host = &h->hdr[h->host - 1];
    const char *ip;
    size_t il = peer_ip(r->peer, &ip), pl = strlen(proto);
    /* after the target: " HTTP/1.x\r\n", the lines, the empty line */
    const char *lines = h->arena.p + h->first_len + 11;
    size_t lines_len = h->arena.len - h->first_len - 13;
    o->len = 0;
    if (buf_reserve(o, h->arena.len + il + pl + host->value_len + 128)) return -1;
    buf_addstr(o, llhttp_method_name((llhttp_method_t)h->method));
    buf_add(o, " ", 1);
    buf_add(o, h->arena.p, h->first_len);
    buf_add(o, " HTTP/1.1\r\n", 11);
    buf_add(o, lines, lines_len);
    buf_add(o, "X-Forwarded-For: ", 17);
    buf_add(o, ip, il);
    buf_add(o, "\r\nX-Forwarded-Proto: ", 21);
    buf_add(o, proto, pl);
    buf_add(o, "\r\nX-Forwarded-Host: ", 20);
    buf_add(o, head_str(h, host->value), host->value_len);
    buf_add(o, "\r\nConnection: keep-alive\r\n\r\n", 28);
    return 0;
}

/* The head sent upstream, re-serialised from the parsed one: 0, or -1 out
 * of memory. Raises on bad extra headers (only with hidx, so L may be NULL
 * without): o and the extra buffer are scratch, nothing leaks. */
static int px_build_request(lua_State *L, buf *o, http_req *r, int hidx, const char *proto,
                            int tunnel, int body_mode) {
    if (!hidx && r->head.lines_as_sent && r->head.host && body_mode == PXB_NONE && !tunnel)
        return px_build_request_as_sent(o, r, proto);
    static _Thread_local buf extra;
    px_extra e = { L, &extra, { { 0 } }, 0 };
    extra.len = 0;
    if (hidx) each_header(L, hidx, "req:proxy", px_extra_header, &e);
    const http_head *h = &r->head;
    o->len = 0;
    /* all at once, so no append below can fail halfway: every piece of
     * the arena goes out at most twice (Host again as X-Forwarded-Host),
     * plus separators, the peer's address and fixed names */
    if (buf_reserve(o, 2 * (size_t)h->arena.len + 4 * (size_t)h->nhdr + extra.len + 1024)) return -1;
    buf_addstr(o, llhttp_method_name((llhttp_method_t)h->method));
    buf_add(o, " ", 1);
    buf_add(o, h->arena.p, h->first_len);
    buf_addstr(o, " HTTP/1.1\r\n");
    span toks[PX_MAX_TOKENS];
    int nt = conn_tokens(h, toks, PX_MAX_TOKENS);
    const http_header *host = NULL, *upgrade = NULL, *clen = NULL;
    int nxff = 0;
    for (int i = 0; i < h->nhdr; i++) {
        const http_header *x = &h->hdr[i];
        const char *name = head_str(h, x->name);
        size_t nl = x->name_len;
        if (is_hop(name, nl)) {
            if (ieq(name, nl, "upgrade")) upgrade = x;
            continue;
        }
        if (ieq(name, nl, "content-length")) { clen = x; continue; }
        if (ieq(name, nl, "expect")) continue; /* 100-continue is answered here */
        if (ieq(name, nl, "x-forwarded-for")) { nxff++; continue; }
        if (ieq(name, nl, "x-forwarded-proto") || ieq(name, nl, "x-forwarded-host")) continue;
        if (ieq(name, nl, "host")) {
            if (!host) host = x;
            if (in_spans(e.names, e.n, name, nl)) continue;
        } else if ((nt && in_spans(toks, nt, name, nl)) || (e.n && in_spans(e.names, e.n, name, nl))) {
            continue;
        }
        buf_field(o, name, nl, head_str(h, x->value), x->value_len);
    }
    if (!host && !in_spans(e.names, e.n, "host", 4)) buf_addstr(o, "Host: localhost\r\n");
    if (!in_spans(e.names, e.n, "x-forwarded-for", 15)) {
        buf_addstr(o, "X-Forwarded-For: ");
        for (int i = 0; i < h->nhdr && nxff; i++) {
            const http_header *x = &h->hdr[i];
            if (!name_is(h, x, "x-forwarded-for", 15) || x->value_len == 0) continue;
            buf_add(o, head_str(h, x->value), x->value_len);
            buf_add(o, ", ", 2);
        }
        const char *ip;
        size_t il = peer_ip(r->peer, &ip);
        buf_add(o, ip, il);
        buf_add(o, "\r\n", 2);
    }
    if (!in_spans(e.names, e.n, "x-forwarded-proto", 17))
        buf_field(o, "X-Forwarded-Proto", 17, proto, strlen(proto));
    if (host && !in_spans(e.names, e.n, "x-forwarded-host", 16))
        buf_field(o, "X-Forwarded-Host", 16, head_str(h, host->value), host->value_len);
    buf_add(o, extra.p, extra.len);
    switch (body_mode) {
    case PXB_BUFFERED:
        buf_add(o, "Content-Length: ", 16);
        buf_uint(o, r->body.len);
        buf_add(o, "\r\n", 2);
        break;
    case PXB_CHUNKED: buf_addstr(o, "Transfer-Encoding: chunked\r\n"); break;
    default:
        if (clen) buf_field(o, "Content-Length", 14, head_str(h, clen->value), clen->value_len);
        break;
    }
    if (tunnel && upgrade) {
        buf_addstr(o, "Connection: upgrade\r\nUpgrade: ");
        buf_add(o, head_str(h, upgrade->value), upgrade->value_len);
        buf_add(o, "\r\n", 2);
    } else {
        buf_addstr(o, "Connection: keep-alive\r\n");
    }
    buf_add(o, "\r\n", 2);
    return o->p ? 0 : -1;
}

/* ---- Lua API ----------------------------------------------------------- */

typedef struct px_opts {
    const char *path;
    size_t path_len;
    int has_host, has_headers;
    lua_Integer timeout, connect_timeout, idle_pool;
    const char *proto;
} px_opts;

static lua_Integer px_int_opt(lua_State *L, const char *name, lua_Integer lo, lua_Integer hi) {
    if (!lua_isinteger(L, -1)) luaL_error(L, "req:proxy: %s must be an integer", name);
    lua_Integer v = lua_tointeger(L, -1);
    if (v < lo || v > hi) luaL_error(L, "req:proxy: %s out of range", name);
    return v;
}

/* One pass over the options table (index 2): looking up each known name
 * would cost more than walking the few that are there, and a misspelt
 * option is an error rather than silently ignored. */
static void px_read_opts(lua_State *L, px_opts *o) {
    const lua_Integer big = (lua_Integer)1 << 40;
    memset(o, 0, sizeof *o);
    o->timeout = 60000;
    o->connect_timeout = 5000;
    o->idle_pool = 16;
    o->proto = "http";
    lua_pushnil(L);
    while (lua_next(L, 2)) {
        if (lua_type(L, -2) != LUA_TSTRING) luaL_error(L, "req:proxy: option names are strings");
        size_t kl;
        const char *k = lua_tolstring(L, -2, &kl);
#define IS(lit) (kl == sizeof(lit) - 1 && memcmp(k, lit, kl) == 0)
        if (IS("path")) {
            if (lua_type(L, -1) != LUA_TSTRING) luaL_error(L, "req:proxy: path must be a string");
            o->path = lua_tolstring(L, -1, &o->path_len);
        } else if (IS("host") || IS("port")) {
            o->has_host = 1;
        } else if (IS("timeout")) {
            o->timeout = px_int_opt(L, "timeout", 1, big);
        } else if (IS("connect_timeout")) {
            o->connect_timeout = px_int_opt(L, "connect_timeout", 1, big);
        } else if (IS("idle_pool")) {
            o->idle_pool = px_int_opt(L, "idle_pool", 0, 1 << 20);
        } else if (IS("forwarded_proto")) {
            const char *v = lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1) : "";
            if (strcmp(v, "http") == 0) o->proto = "http";
            else if (strcmp(v, "https") == 0) o->proto = "https";
            else luaL_error(L, "req:proxy: forwarded_proto must be \"http\" or \"https\"");
        } else if (IS("headers")) {
            if (!lua_istable(L, -1)) luaL_error(L, "req:proxy: headers must be a table");
            o->has_headers = 1;
        } else {
            luaL_error(L, "req:proxy: unknown option '%s'", k);
        }
#undef IS
        lua_pop(L, 1);
    }
}

/* The pool of the address in opts: path on the fast path, else host and
 * port. NULL with nil, err, code pushed when the address is unusable. */
static px_pool *px_pool_for(lua_State *L, px_state *st, const px_opts *o) {
    tn_addr a;
    if (o->path) {
        size_t n = o->path_len;
        if (n == 0) luaL_error(L, "req:proxy: path is empty");
        if (o->has_host) luaL_error(L, "req:proxy: give either path or host and port, not both");
        uint32_t h = px_hash(1, o->path, n);
        px_pool *p = px_pool_find(st, 1, o->path, n, h);
        if (p) return p;
        if (n >= sizeof a.path) {
            lua_pushnil(L);
            lua_pushfstring(L, "connect %s: ENAMETOOLONG: a Unix socket path must be shorter than 108 bytes",
                            o->path);
            lua_pushliteral(L, "ENAMETOOLONG");
            return NULL;
        }
        memset(&a, 0, sizeof a);
        a.is_pipe = 1;
        memcpy(a.path, o->path, n + 1);
        snprintf(a.text, sizeof a.text, "%s", o->path);
        p = px_pool_add(st, &a, h);
        if (!p) luaL_error(L, "out of memory");
        return p;
    }
    if (tn_addr_from_table(L, 2, &a, "req:proxy")) return NULL;
    size_t n = strlen(a.text);
    uint32_t h = px_hash(0, a.text, n);
    px_pool *p = px_pool_find(st, 0, a.text, n, h);
    if (!p) p = px_pool_add(st, &a, h);
    if (!p) luaL_error(L, "out of memory");
    return p;
}

/* Deliver an exchange that ended before the first wait. */
static int px_finish_inline(lua_State *L, px *x) {
    px_follow_up(x);
    if (x->ups) ups_account(x);
    px_result res;
    px_result_of(x, &res);
    px_forget(x);
    if (res.ok) {
        lua_pushcfunction(L, px_push_stats);
        lua_pushlightuserdata(L, &res);
        lua_call(L, 1, 1);
        return 1;
    }
    lua_pushnil(L);
    lua_pushstring(L, res.err);
    lua_pushstring(L, res.code);
    return 3;
}

/* What one exchange needs besides the request: where, and how patient. */
typedef struct px_plan {
    px_pool *pool;
    px_upstream *ups;        /* counted through, or NULL */
    int64_t timeout, connect_timeout;
    int idle_pool, body_mode, tunnel;
} px_plan;

/* The tunnel wish of a request: Connection: upgrade with an Upgrade header
 * and no body. */
static int px_wants_tunnel(const http_req *r) {
    const http_head *h = &r->head;
    if (h->lean) return 0; /* it took no Upgrade */
    span toks[PX_MAX_TOKENS];
    int nt = conn_tokens(h, toks, PX_MAX_TOKENS);
    return !r->expects_body && in_spans(toks, nt, "upgrade", 7) && head_find(h, "upgrade", NULL);
}

/* Starts the exchange for r with the head in *head (taken; *head gets an
 * empty buffer back). NULL when out of memory. The caller sets the task,
 * if any, and looks at x->done afterwards: an exchange can end inside. */
static px *px_launch(px_state *st, http_req *r, const px_plan *plan, buf *head, tn_task *t) {
    px *x = px_new(st);
    if (!x) return NULL;
    buf tmp = x->head;
    x->head = *head;
    *head = tmp;
    head->len = 0;
    x->r = r;
    r->refs++;
    x->pool = plan->pool;
    plan->pool->refs++;
    plan->pool->exchanges++;
    if (plan->ups) {
        x->ups = plan->ups;
        x->ups->refs++;
        x->ups->inflight++;
        x->ups->last_active = uv_now(st->loop);
    }
    x->timeout = plan->timeout;
    x->connect_timeout = plan->connect_timeout;
    x->idle_pool = plan->idle_pool;
    x->body_mode = plan->body_mode;
    x->tunnel_wanted = plan->tunnel;
    x->head_method = r->head.method == HTTP_HEAD;
    x->t0 = uv_hrtime();
    if (t) {
        x->task = tn_task_hold(t);
        x->seq = tn_task_seq(t);
    }
    r->px = x;
    x->in_call = 1;
    px_up *up = px_up_take(plan->pool);
    if (up) {
        x->reused = 1;
        up->x = x;
        x->up = up;
        px_send_head(x);
    } else {
        px_connect(x);
    }
    x->in_call = 0;
    return x;
}

/* A direct route took r (its body, if any, still unread): proxy it with no
 * task. 0, or -1 (out of memory) and the handler gets it after all. */
static int px_start_direct(http_req *r, px_upstream *u, int chunked) {
    static _Thread_local buf hb;
    px_plan plan = { u->pool, u, u->timeout, u->connect_timeout, u->idle_pool, PXB_NONE, 0 };
    if (r->expects_body) plan.body_mode = chunked ? PXB_CHUNKED : PXB_LENGTH;
    plan.tunnel = px_wants_tunnel(r);
    if (px_build_request(NULL, &hb, r, 0, u->proto, plan.tunnel, plan.body_mode) != 0) return -1;
    r->dispatched = 1;
    px *x = px_launch(u->st, r, &plan, &hb, NULL);
    if (!x) {
        r->dispatched = 0;
        return -1;
    }
    /* ended at once (a failed connect): delivered from the loop like any
     * other, not from inside this connection's parser */
    if (x->done) px_queue_done(x);
    return 0;
}

/* req:proxy(opts | upstream) -> stats | nil, err, code (see the top of
 * this file) */
static int l_req_proxy(lua_State *L) {
    static _Thread_local buf hb;
    http_req *r = check_req(L, 1);
    px_upstream *u = NULL;
    if (lua_type(L, 2) == LUA_TUSERDATA) u = ups_check(L, 2);
    else luaL_checktype(L, 2, LUA_TTABLE);
    lua_settop(L, 2);
    if (r->px) return luaL_error(L, "req:proxy is already running for this request");
    if (r->responded) return luaL_error(L, "a response was already sent for this request");
    px_opts o;
    int hidx = 0;
    if (u) {
        if (!u->pool) return luaL_error(L, "req:proxy: the upstream has no path yet (upstream:set{path=})");
        memset(&o, 0, sizeof o);
        o.timeout = u->timeout;
        o.connect_timeout = u->connect_timeout;
        o.idle_pool = u->idle_pool;
        o.proto = u->proto;
    } else {
        px_read_opts(L, &o);
        if (o.has_headers) {
            lua_getfield(L, 2, "headers");
            hidx = lua_gettop(L);
        }
    }
    tn_task *t = tn_task_check(L);
    http_conn *c = r->conn;
    if (!c || c->closing || c->req != r) {
        lua_pushnil(L);
        lua_pushliteral(L, "client closed");
        lua_pushliteral(L, "ECONNABORTED");
        return 3;
    }
    int body_mode = PXB_NONE;
    if (r->expects_body) {
        if (r->body_err) {
            lua_pushnil(L);
            if (c->eof) {
                lua_pushliteral(L, "client closed");
                lua_pushliteral(L, "ECONNABORTED");
            } else {
                lua_pushfstring(L, "the request body could not be read: %s", r->body_err);
                lua_pushstring(L, c->p.error_status == 413 ? "E2BIG" : "EPROTO");
            }
            return 3;
        }
        if (r->msg_complete) body_mode = PXB_BUFFERED;
        else if (r->seen > 0 || r->discard || r->want_body) {
            lua_pushnil(L);
            lua_pushliteral(L, "the request body was already partly read (by an earlier attempt?)");
            lua_pushliteral(L, "EINVAL");
            return 3;
        }
        else body_mode = head_find(&r->head, "transfer-encoding", NULL) ? PXB_CHUNKED : PXB_LENGTH;
    }
    int tunnel = px_wants_tunnel(r);
    if (px_build_request(L, &hb, r, hidx, o.proto, tunnel, body_mode) != 0)
        return luaL_error(L, "out of memory");

    px_state *st = px_state_get(L);
    px_pool *pool = u ? u->pool : px_pool_for(L, st, &o);
    if (!pool) return 3;
    /* The stats table is made now, while raising is still harmless: the
     * callback that finishes only fills it. It waits on this frame. */
    lua_createtable(L, 0, 6);
    px_plan plan = { pool, u, o.timeout, o.connect_timeout, (int)o.idle_pool, body_mode, tunnel };
    px *x = px_launch(st, r, &plan, &hb, t);
    if (!x) return luaL_error(L, "out of memory");
    if (x->done) {
        tn_task_release(x->task);
        x->task = NULL;
        return px_finish_inline(L, x);
    }
    lua_replace(L, 1);
    lua_settop(L, 1);
    return tn_task_wait(L, t, -1);
}

static void pool_push(lua_State *L, const px_pool *p) {
    lua_createtable(L, 0, 3);
    set_int(L, "idle", (uint64_t)p->nidle);
    set_int(L, "active", (uint64_t)p->active);
    set_int(L, "exchanges", (uint64_t)p->exchanges);
}

/* http.pool_stats() -> { [address] = { idle, active, exchanges } }
 * http.pool_stats(path) -> { idle, active, exchanges } | nil
 * idle and active count connections, exchanges the requests under way. */
static int l_pool_stats(lua_State *L) {
    px_state *st = px_state_peek(L);
    if (lua_type(L, 1) == LUA_TSTRING) {
        size_t n;
        const char *path = lua_tolstring(L, 1, &n);
        px_pool *p = st ? px_pool_find(st, 1, path, n, px_hash(1, path, n)) : NULL;
        if (!p) { lua_pushnil(L); return 1; }
        pool_push(L, p);
        return 1;
    }
    lua_newtable(L);
    if (!st) return 1;
    for (size_t i = 0; i < st->nbuckets; i++) {
        for (px_pool *p = st->buckets[i]; p; p = p->next) {
            pool_push(L, p);
            lua_setfield(L, -2, p->addr.text);
        }
    }
    return 1;
}

/* http.pool_close(path | {path=} | {host=, port=}) -> n: closes the idle
 * connections to that upstream; those in use are closed when done. */
static int l_pool_close(lua_State *L) {
    tn_addr a;
    if (lua_type(L, 1) == LUA_TSTRING) {
        size_t n;
        const char *path = lua_tolstring(L, 1, &n);
        memset(&a, 0, sizeof a);
        a.is_pipe = 1;
        snprintf(a.text, sizeof a.text, "%s", path);
    } else {
        int n = tn_addr_from_table(L, 1, &a, "pool_close");
        if (n) return n;
    }
    px_state *st = px_state_peek(L);
    size_t tl = strlen(a.text);
    px_pool *p = st ? px_pool_find(st, a.is_pipe, a.text, tl, px_hash(a.is_pipe, a.text, tl)) : NULL;
    if (!p) { lua_pushinteger(L, 0); return 1; }
    int closed = 0;
    p->refs++;
    p->gen++;
    while (p->idle) {
        px_up_close(p->idle);
        closed++;
    }
    px_pool_unref(p);
    lua_pushinteger(L, closed);
    return 1;
}

/* ---- registration ------------------------------------------------------ */

int tn_open_http(lua_State *L) {
    static const luaL_Reg req_methods[] = {
        {"body", l_req_body}, {"respond", l_req_respond}, {"header", l_req_header},
        {"proxy", l_req_proxy}, {"stream", l_req_stream}, {"write", l_req_write},
        {"queued", l_req_queued}, {"finish", l_req_finish},
        {"__gc", l_req_gc}, {"__tostring", l_req_tostring}, {NULL, NULL},
    };
    static const luaL_Reg server_methods[] = {
        {"close", l_server_close}, {"drain", l_server_drain}, {"cut", l_server_cut}, {"stats", l_server_stats},
        {"route", l_server_route}, {"clear_routes", l_server_clear_routes},
        {"__gc", l_server_gc}, {"__close", l_server_close}, {"__tostring", l_server_tostring},
        {NULL, NULL},
    };
    static const luaL_Reg fns[] = {
        {"serve", l_serve}, {"request", l_request}, {"pool_stats", l_pool_stats},
        {"pool_close", l_pool_close}, {"upstream", l_upstream}, {NULL, NULL},
    };
    static const luaL_Reg upstream_methods[] = {
        {"set", l_ups_set}, {"invalidate", l_ups_invalidate}, {"inflight", l_ups_inflight},
        {"last_active", l_ups_last_active}, {"stats", l_ups_stats},
        {"__gc", l_ups_gc}, {"__tostring", l_ups_tostring}, {NULL, NULL},
    };
    settings_common(&server_settings);
    server_settings.on_url = cb_first_line_span;
    server_settings.on_headers_complete = srv_on_headers_complete;
    server_settings.on_body = srv_on_body;
    server_settings.on_message_complete = srv_on_message_complete;
    settings_common(&client_settings);
    client_settings.on_status = cb_first_line_span;
    client_settings.on_headers_complete = cl_on_headers_complete;
    client_settings.on_body = cl_on_body;
    client_settings.on_message_complete = cl_on_message_complete;
    settings_common(&px_settings);
    px_settings.on_status = cb_first_line_span;
    px_settings.on_headers_complete = px_on_headers_complete;
    px_settings.on_body = px_on_body;
    px_settings.on_message_complete = px_on_message_complete;

    /* Request objects index through a function (fields are computed from
     * the C head on demand), so the metatable is not its own __index. */
    luaL_newmetatable(L, REQUEST_MT);
    luaL_setfuncs(L, req_methods, 0);
    lua_pushcfunction(L, l_req_index);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, l_req_newindex);
    lua_setfield(L, -2, "__newindex");
    lua_pop(L, 1);
    tn_new_class(L, SERVER_MT, server_methods);
    tn_new_class(L, UPSTREAM_MT, upstream_methods);

    /* core.spawn, to start handler tasks from C: tn_open_loop hands out a
     * table of the scheduler's functions. */
    tn_open_loop(L);
    lua_getfield(L, -1, "spawn");
    lua_rawsetp(L, LUA_REGISTRYINDEX, &spawn_key);
    lua_pop(L, 1);

    luaL_newlib(L, fns);
    return 1;
}
