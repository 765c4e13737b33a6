/*
 * The lean head parser. Nearly every head a proxy sees is plain: a
 * common method, an origin-form target, HTTP/1.1 or 1.0, a handful of
 * headers of visible ASCII, a Content-Length or no body. llhttp's state
 * machine and its callbacks cost about a third of the instructions of a
 * proxied request; this reads such a head in one pass and fills the same
 * arena the callbacks would have.
 *
 * It never decides anything llhttp would decide differently: it takes a
 * strict subset of what llhttp takes, and whatever lies outside that subset
 * (a partial head, a transfer coding, Connection other than one "close" or
 * "keep-alive", Upgrade, Proxy-Connection, two Content-Lengths, a 1xx, an
 * obs-text or control byte, a version other than 1.0 or 1.1, ...) it hands
 * back untouched, and llhttp reads it from the first byte, errors and all.
 * spec/fixtures/headcheck.c holds the two to the same result.
 */
#include "head.h"

#include <llhttp.h>

#include <string.h>

const unsigned char head_tchar[256] = {
    ['!'] = 1, ['#'] = 1, ['$'] = 1, ['%'] = 1, ['&'] = 1, ['\''] = 1, ['*'] = 1, ['+'] = 1,
    ['-'] = 1, ['.'] = 1, ['^'] = 1, ['_'] = 1, ['`'] = 1, ['|'] = 1, ['~'] = 1,
    ['0'] = 1, ['1'] = 1, ['2'] = 1, ['3'] = 1, ['4'] = 1, ['5'] = 1, ['6'] = 1, ['7'] = 1,
    ['8'] = 1, ['9'] = 1,
    ['A'] = 1, ['B'] = 1, ['C'] = 1, ['D'] = 1, ['E'] = 1, ['F'] = 1, ['G'] = 1, ['H'] = 1,
    ['I'] = 1, ['J'] = 1, ['K'] = 1, ['L'] = 1, ['M'] = 1, ['N'] = 1, ['O'] = 1, ['P'] = 1,
    ['Q'] = 1, ['R'] = 1, ['S'] = 1, ['T'] = 1, ['U'] = 1, ['V'] = 1, ['W'] = 1, ['X'] = 1,
    ['Y'] = 1, ['Z'] = 1,
    ['a'] = 1, ['b'] = 1, ['c'] = 1, ['d'] = 1, ['e'] = 1, ['f'] = 1, ['g'] = 1, ['h'] = 1,
    ['i'] = 1, ['j'] = 1, ['k'] = 1, ['l'] = 1, ['m'] = 1, ['n'] = 1, ['o'] = 1, ['p'] = 1,
    ['q'] = 1, ['r'] = 1, ['s'] = 1, ['t'] = 1, ['u'] = 1, ['v'] = 1, ['w'] = 1, ['x'] = 1,
    ['y'] = 1, ['z'] = 1,
};

/* visible ASCII: what a plain target is made of */
static int is_vchar(char ch) { return (unsigned char)(ch - 0x21) < 0x5e; }
/* visible ASCII, SP and HTAB: a plain value or reason */
static int is_text(char ch) { return (unsigned char)(ch - 0x20) < 0x5f || ch == '\t'; }
static int is_ows(char ch) { return ch == ' ' || ch == '\t'; }

/* llhttp's readers of Content-Length and Connection take no HTAB around
 * the value, unlike its reader of other values. */
static int tab_in(const char *s, size_t n) { return memchr(s, '\t', n) != NULL; }

/* s[0, n) is lit, ignoring case; lit is lower-case letters and '-', which
 * no other tchar matches with the case bit set. */
static int name_eq(const char *s, size_t n, const char *lit, size_t ln) {
    if (n != ln) return 0;
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

size_t head_fast_parse(head_fast *f, const char *p, size_t n) {
    const size_t end = n < f->max_head ? n : f->max_head;
    head_facts *facts = &f->facts;
    char *a = f->arena;
    size_t al = 0, i;
    memset(facts, 0, sizeof *facts);
    if (f->is_request) {
        i = method_at(p, end, &facts->method);
        if (i == 0 || i >= end || p[i] != '/') return 0;
        size_t t = i;
        while (i < end && is_vchar(p[i])) i++;
        /* " HTTP/1.x\r\n" */
        if (end - i < 11 || p[i] != ' ') return 0;
        facts->minor = version_at(p + i + 1);
        if (facts->minor < 0 || p[i + 9] != '\r' || p[i + 10] != '\n' || i - t > f->arena_cap) return 0;
        memcpy(a, p + t, i - t);
        al = i - t;
        i += 11;
    } else {
        /* "HTTP/1.x NNN " */
        if (end < 13 || p[8] != ' ' || p[12] != ' ') return 0;
        facts->minor = version_at(p);
        if (facts->minor < 0) return 0;
        int st = 0;
        for (int k = 9; k < 12; k++) {
            if ((unsigned char)(p[k] - '0') > 9) return 0;
            st = st * 10 + (p[k] - '0');
        }
        if (st < 200 || st > 599) return 0; /* interim responses go to llhttp */
        facts->status = st;
        i = 13;
        while (i < end && is_text(p[i])) i++;
        if (end - i < 2 || p[i] != '\r' || p[i + 1] != '\n' || i - 13 > f->arena_cap) return 0;
        memcpy(a, p + 13, i - 13);
        al = i - 13;
        i += 2;
    }
    f->first_len = (uint32_t)al;
    facts->major = 1;

    int nh = 0, close = 0, keep = 0;
    for (;;) {
        if (end - i < 2) return 0;
        if (p[i] == '\r') {
            if (p[i + 1] != '\n') return 0;
            i += 2;
            break;
        }
        size_t ns = i;
        while (i < end && head_tchar[(unsigned char)p[i]]) i++;
        if (i == ns || i == end || p[i] != ':') return 0;
        size_t nl = i - ns;
        size_t after_colon = ++i;
        while (i < end && is_ows(p[i])) i++;
        size_t vs = i;
        while (i < end && is_text(p[i])) i++;
        if (end - i < 2 || p[i] != '\r' || p[i + 1] != '\n') return 0;
        size_t cr = i, ve = i;
        while (ve > vs && is_ows(p[ve - 1])) ve--;
        i += 2;
        if (nh == f->hdr_cap || al + (ve - vs) + nl > f->arena_cap) return 0;

        const char *name = p + ns, *val = p + vs;
        size_t vl = ve - vs;
        switch (nl) {
        case 7:  /* an upgrade (with Connection: upgrade) */
            if (NAME_IS(name, nl, "upgrade")) return 0;
            break;
        case 10:
            if (NAME_IS(name, nl, "connection")) {
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
        case 16: /* llhttp reads it as Connection */
            if (NAME_IS(name, nl, "proxy-connection")) return 0;
            break;
        case 17:
            if (NAME_IS(name, nl, "transfer-encoding")) return 0;
            break;
        default:
            break;
        }

        http_header *h = &f->hdr[nh++];
        h->name = (uint32_t)al;
        h->name_len = (uint32_t)nl;
        memcpy(a + al, name, nl);
        al += nl;
        h->value = (uint32_t)al;
        h->value_len = (uint32_t)vl;
        memcpy(a + al, val, vl);
        al += vl;
    }
    f->nhdr = nh;
    f->arena_len = (uint32_t)al;
    facts->keep_alive = facts->minor == 1 ? !close : keep;
    return i;
}
