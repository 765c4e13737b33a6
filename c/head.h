/*
 * The lean head parser: plain HTTP/1.x request and response heads, parsed
 * in one pass, in front of llhttp. Private to http.c (and the checker that
 * holds it to llhttp).
 */
#ifndef TN_HEAD_H
#define TN_HEAD_H

#include <stddef.h>
#include <stdint.h>

/* Byte classes: an RFC 9110 tchar; a byte of a plain value or reason
 * (visible ASCII, SP, HTAB); a byte of a plain target (visible ASCII). */
enum { HEAD_TCHAR = 1, HEAD_TEXT = 2, HEAD_VCHAR = 4 };
extern const unsigned char head_class[256];

/* Offsets into a head's arena: the arena moves when it grows. */
typedef struct http_header { uint32_t name, name_len, value, value_len; } http_header;

/* What framing and connection handling need from a head, whichever parser
 * read it. */
typedef struct head_facts {
    int method;             /* llhttp's numbering */
    int major, minor, status;
    int keep_alive;         /* as llhttp_should_keep_alive, false on an upgrade */
    int has_length;         /* a Content-Length was sent */
    int hop;                /* a hop-by-hop header was sent (Connection, Keep-Alive, TE, Trailer) */
    uint64_t content_length;
} head_facts;

typedef struct head_fast {
    /* in */
    int is_request;
    size_t max_head;        /* raw bytes; a longer head goes to llhttp */
    char *arena;            /* a head longer than arena_cap goes to llhttp */
    size_t arena_cap;
    http_header *hdr;
    int hdr_cap;            /* at most this many headers */
    /* out, valid when head_fast_parse returned non-zero */
    uint32_t first_len;     /* arena[0, first_len): the target, or the reason */
    uint32_t arena_len;
    int nhdr;
    /* requests only: the index + 1 of the Host header (0: none; a second
     * Host, or an Expect, goes to llhttp), and whether an X-Forwarded-For,
     * -Host or -Proto was sent, which a proxy replaces */
    int host;
    int forwarded;
    head_facts facts;
} head_fast;

/* Parse the head at the start of p[0, n) when it is whole and of the plain
 * kind: returns its length in bytes; f->arena holds the head from the
 * target (or reason) on, and f->hdr the names as sent and the values
 * without surrounding white space, as offsets into it: what llhttp with
 * http.c's callbacks would have given. Returns 0 for anything else (a partial
 * head, a transfer coding, an upgrade, a 1xx, a byte out of the plain
 * set, ...): llhttp parses that one, and says what is wrong if anything
 * is. */
size_t head_fast_parse(head_fast *f, const char *p, size_t n);

#endif
