/*
 * The lean head parser. Nearly every head a proxy sees is plain: a
 * common method, an origin-form target, HTTP/1.1 or 1.0, a handful of
 * headers of visible ASCII, a Content-Length or no body. llhttp's state
 * machine and its callbacks cost about a third of the instructions of a
 * proxied request; this reads such a head in one pass, copies it into the
 * head's arena at once and gives each header as offsets into it: the same
 * target, names and values the callbacks would have given.
 *
 * It never decides anything llhttp would decide differently: it takes a
 * strict subset of what llhttp takes, and whatever lies outside that subset
 * (a partial head, a transfer coding, Connection other than one "close" or
 * "keep-alive", Upgrade, Proxy-Connection, two Content-Lengths, a 1xx, an
 * obs-text or control byte, a version other than 1.0 or 1.1, a request's
 * Expect or second Host, ...) it hands
 * back untouched, and llhttp reads it from the first byte, errors and all.
 * spec/fixtures/headcheck.c holds the two to the same result.
 */
#include "head.h"

#include <llhttp.h>

#include <string.h>

/* Byte classes (head.h), by table: every byte of every head goes by. */
const unsigned char head_class[256] = {
    0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    2, 7, 6, 7, 7, 7, 7, 7, 6, 6, 7, 7, 6, 7, 7, 6,
    7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 6, 6, 6, 6, 6, 6,
    6, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7,
    7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 6, 6, 6, 7, 7,
    7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7,
    7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 6, 7, 6, 7, 0,
    /* 0x80 to 0xff: obs-text, llhttp's to judge */
};

static int is(char ch, int cls) { return head_class[(unsigned char)ch] & cls; }
static int is_ows(char ch) { return ch == ' ' || ch == '\t'; }

/* llhttp's readers of Content-Length and Connection take no HTAB around
 * the value, unlike its reader of other values. */
static int tab_in(const char *s, size_t n) { return memchr(s, '\t', n) != NULL; }

/* s[0, n) is lit, ignoring case; lit is lower-case letters and '-', which
 * no other byte of a name or value matches with the case bit set. Eight
 * bytes a step (the last step overlapping): every header name is compared
 * with a few of these. */
static uint64_t lower8(const char *s) {
    uint64_t x;
    memcpy(&x, s, 8);
    return x | 0x2020202020202020ull;
}
static uint32_t lower4(const char *s) {
    uint32_t x;
    memcpy(&x, s, 4);
    return x | 0x20202020u;
}
static int name_eq(const char *s, size_t n, const char *lit, size_t ln) {
    if (n != ln) return 0;
    if (n >= 8) {
        for (size_t i = 0; i + 8 < n; i += 8)
            if (lower8(s + i) != lower8(lit + i)) return 0;
        return lower8(s + n - 8) == lower8(lit + n - 8);
    }
    if (n >= 4) return lower4(s) == lower4(lit) && lower4(s + n - 4) == lower4(lit + n - 4);
    for (size_t i = 0; i < n; i++)
        if ((s[i] | 0x20) != lit[i]) return 0;
    return 1;
}
#define NAME_IS(s, n, lit) name_eq(s, n, lit, sizeof(lit) - 1)

/* "HTTP/1.0" or "HTTP/1.1" at p (8 bytes there): the minor, or -1 */
static int version_at(const char *p) {
    if (memcmp(p, "HTTP/1.", 7) != 0) return -1;
    return p[7] == '1' ? 1 : p[7] == '0' ? 0 : -1;
}

/* The method and the space after it: its length, 0 for any other method. */
static size_t method_at(const char *p, size_t n, int *method) {
    static const struct { char text[9]; unsigned char len; unsigned char method; } plain[] = {
        { "GET ", 4, HTTP_GET },       { "HEAD ", 5, HTTP_HEAD },   { "POST ", 5, HTTP_POST },
        { "PUT ", 4, HTTP_PUT },       { "DELETE ", 7, HTTP_DELETE }, { "PATCH ", 6, HTTP_PATCH },
        { "OPTIONS ", 8, HTTP_OPTIONS },
    };
    for (size_t k = 0; k < sizeof plain / sizeof plain[0]; k++) {
        if (n >= plain[k].len && memcmp(p, plain[k].text, plain[k].len) == 0) {
            *method = plain[k].method;
            return plain[k].len;
        }
    }
    return 0;
}

/* A Content-Length of up to 18 digits (no overflow to think about). */
static int length_of(const char *v, size_t n, uint64_t *out) {
    if (n == 0 || n > 18) return 0;
    uint64_t x = 0;
    for (size_t i = 0; i < n; i++) {
        if ((unsigned char)(v[i] - '0') > 9) return 0;
        x = x * 10 + (uint64_t)(v[i] - '0');
    }
    *out = x;
    return 1;
}

/* Spans: the first byte at or after i, below lim, outside a class (lim
 * when there is none). Every byte of every head goes through one, so they
 * take 16 bytes a step where SSE2 is there (every x86-64), and never read
 * at or past lim: the head may end its buffer. */
#if defined(__SSE2__)
#include <emmintrin.h>

/* Bytes below `floor` or DEL end a span; signed, 0x80 to 0xff are below
 * too (obs-text, llhttp's to judge). HTAB is let through when tab_ok. */
static size_t span_visible(const char *p, size_t i, size_t lim, char floor, int tab_ok) {
    const __m128i below = _mm_set1_epi8(floor), del = _mm_set1_epi8(0x7f), tab = _mm_set1_epi8('\t');
    for (; i + 16 <= lim; i += 16) {
        __m128i x = _mm_loadu_si128((const __m128i *)(const void *)(p + i));
        __m128i out = _mm_or_si128(_mm_cmplt_epi8(x, below), _mm_cmpeq_epi8(x, del));
        if (tab_ok) out = _mm_andnot_si128(_mm_cmpeq_epi8(x, tab), out);
        unsigned m = (unsigned)_mm_movemask_epi8(out);
        if (m) return i + (size_t)__builtin_ctz(m);
    }
    const int cls = tab_ok ? HEAD_TEXT : HEAD_VCHAR;
    while (i < lim && is(p[i], cls)) i++;
    return i;
}

/* Names: letters, digits and '-' by vector, which is nearly every name;
 * the rest of tchar ("X_Y", "a.b") byte by byte from where that stops. */
static size_t span_token(const char *p, size_t i, size_t lim) {
    for (; i + 16 <= lim; i += 16) {
        __m128i x = _mm_loadu_si128((const __m128i *)(const void *)(p + i));
        __m128i folded = _mm_or_si128(x, _mm_set1_epi8(0x20)); /* letters to lower case */
        __m128i letter = _mm_and_si128(_mm_cmpgt_epi8(folded, _mm_set1_epi8('a' - 1)),
                                       _mm_cmplt_epi8(folded, _mm_set1_epi8('z' + 1)));
        __m128i digit = _mm_and_si128(_mm_cmpgt_epi8(x, _mm_set1_epi8('0' - 1)),
                                      _mm_cmplt_epi8(x, _mm_set1_epi8('9' + 1)));
        __m128i ok = _mm_or_si128(_mm_or_si128(letter, digit), _mm_cmpeq_epi8(x, _mm_set1_epi8('-')));
        unsigned m = ~(unsigned)_mm_movemask_epi8(ok) & 0xffffu;
        if (m) { i += (size_t)__builtin_ctz(m); break; }
    }
    while (i < lim && is(p[i], HEAD_TCHAR)) i++;
    return i;
}
#else
static size_t span_visible(const char *p, size_t i, size_t lim, char floor, int tab_ok) {
    (void)floor;
    const int cls = tab_ok ? HEAD_TEXT : HEAD_VCHAR;
    while (i < lim && is(p[i], cls)) i++;
    return i;
}
static size_t span_token(const char *p, size_t i, size_t lim) {
    while (i < lim && is(p[i], HEAD_TCHAR)) i++;
    return i;
}
#endif
static size_t span_target(const char *p, size_t i, size_t lim) { return span_visible(p, i, lim, 0x21, 0); }
static size_t span_text(const char *p, size_t i, size_t lim) { return span_visible(p, i, lim, 0x20, 1); }

/* "\r\n" at i, within lim */
static int crlf_at(const char *p, size_t i, size_t lim) {
    return lim - i >= 2 && p[i] == '\r' && p[i + 1] == '\n';
}

size_t head_fast_parse(head_fast *f, const char *p, size_t n) {
    /* Every scan is bounded by lim; a line must end in CRLF exactly where
     * its last span stops, so a bare LF or CR, a control byte or obs-text
     * anywhere sends the head to llhttp. */
    const size_t lim = n < f->max_head ? n : f->max_head;
    head_facts *facts = &f->facts;
    memset(facts, 0, sizeof *facts);
    f->host = f->forwarded = 0;
    size_t i, first;
    if (f->is_request) {
        i = method_at(p, lim, &facts->method);
        if (i == 0 || i >= lim || p[i] != '/') return 0;
        first = i;
        i = span_target(p, i, lim);
        /* " HTTP/1.x\r\n" */
        if (lim - i < 11 || p[i] != ' ' || !crlf_at(p, i + 9, lim)) return 0;
        facts->minor = version_at(p + i + 1);
        if (facts->minor < 0) return 0;
        f->first_len = (uint32_t)(i - first);
        i += 11;
    } else {
        /* "HTTP/1.x NNN " */
        if (lim < 13 || p[8] != ' ' || p[12] != ' ') return 0;
        facts->minor = version_at(p);
        if (facts->minor < 0) return 0;
        int st = 0;
        for (int k = 9; k < 12; k++) {
            if ((unsigned char)(p[k] - '0') > 9) return 0;
            st = st * 10 + (p[k] - '0');
        }
        if (st < 200 || st > 599) return 0; /* interim responses go to llhttp */
        facts->status = st;
        first = 13;
        i = span_text(p, first, lim);
        if (!crlf_at(p, i, lim)) return 0;
        f->first_len = (uint32_t)(i - first);
        i += 2;
    }
    facts->major = 1;
    int nh = 0, close = 0, keep = 0;
    for (;;) {
        if (lim - i < 2) return 0;
        if (p[i] == '\r') { /* the empty line: the end */
            if (p[i + 1] != '\n') return 0;
            break;
        }
        size_t ns = i;
        i = span_token(p, i, lim);
        if (i == ns || i >= lim || p[i] != ':') return 0;
        size_t nl = i - ns;
        size_t after_colon = ++i;
        while (i < lim && is_ows(p[i])) i++;
        size_t vs = i;
        i = span_text(p, i, lim);
        if (!crlf_at(p, i, lim)) return 0;
        size_t cr = i, ve = i;
        while (ve > vs && is_ows(p[ve - 1])) ve--;
        i += 2;
        if (nh == f->hdr_cap) return 0;

        const char *name = p + ns, *val = p + vs;
        size_t vl = ve - vs;
        switch (nl) {
        case 2:
            if (NAME_IS(name, nl, "te")) facts->hop = 1;
            break;
        case 4:
            if (f->is_request && NAME_IS(name, nl, "host")) {
                if (f->host) return 0;
                f->host = nh + 1;
            }
            break;
        case 6: /* 100-continue and its kin: llhttp's path decides */
            if (f->is_request && NAME_IS(name, nl, "expect")) return 0;
            break;
        case 7:  /* an upgrade (with Connection: upgrade) */
            if (NAME_IS(name, nl, "upgrade")) return 0;
            if (NAME_IS(name, nl, "trailer")) facts->hop = 1;
            break;
        case 10:
            if (NAME_IS(name, nl, "keep-alive")) facts->hop = 1;
            if (NAME_IS(name, nl, "connection")) {
                facts->hop = 1;
                if (tab_in(p + after_colon, cr - after_colon)) return 0;
                if (NAME_IS(val, vl, "close")) close = 1;
                else if (NAME_IS(val, vl, "keep-alive")) keep = 1;
                else return 0;
            }
            break;
        case 14:
            if (NAME_IS(name, nl, "content-length")) {
                if (facts->has_length || tab_in(p + after_colon, cr - after_colon) ||
                    !length_of(val, vl, &facts->content_length))
                    return 0;
                facts->has_length = 1;
            }
            break;
        case 15:
            if (NAME_IS(name, nl, "x-forwarded-for")) f->forwarded = 1;
            break;
        case 16: /* llhttp reads it as Connection */
            if (NAME_IS(name, nl, "proxy-connection")) return 0;
            if (NAME_IS(name, nl, "x-forwarded-host")) f->forwarded = 1;
            break;
        case 17:
            if (NAME_IS(name, nl, "transfer-encoding")) return 0;
            if (NAME_IS(name, nl, "x-forwarded-proto")) f->forwarded = 1;
            break;
        default:
            break;
        }

        http_header *h = &f->hdr[nh++];
        h->name = (uint32_t)(ns - first);
        h->name_len = (uint32_t)nl;
        h->value = (uint32_t)(vs - first);
        h->value_len = (uint32_t)vl;
    }
    size_t len = i + 2;
    /* the arena gets the head from the target (or reason) on, in one copy */
    if (len - first > f->arena_cap) return 0;
    memcpy(f->arena, p + first, len - first);
    f->arena_len = (uint32_t)(len - first);
    f->nhdr = nh;
    facts->keep_alive = facts->minor == 1 ? !close : keep;
    return len;
}
