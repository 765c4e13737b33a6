/*
 * core.crypto: the few primitives tokens and signatures need, on OpenSSL 3's
 * libcrypto. Everything here is short and CPU-bound, so it runs on the
 * calling thread. Inputs are byte strings; outputs are raw bytes unless the
 * name says hex or base64.
 *
 * Decoders are strict on purpose: an API token has exactly one spelling, so
 * two different strings can never decode to the same secret.
 */
#include "tn.h"

#include <limits.h>
#include <string.h>

#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/rand.h>

/* crypto.random(n) -> n bytes from the OS-seeded DRBG. Raises when the
 * generator fails: weak bytes are never returned. */
static int l_crypto_random(lua_State *L) {
    lua_Integer n = luaL_checkinteger(L, 1);
    luaL_argcheck(L, n >= 0 && n <= INT_MAX, 1, "length out of range");
    if (n == 0) { lua_pushliteral(L, ""); return 1; }
    luaL_Buffer b;
    unsigned char *p = (unsigned char *)luaL_buffinitsize(L, &b, (size_t)n);
    if (RAND_bytes(p, (int)n) != 1) {
        unsigned long e = ERR_get_error();
        char msg[256];
        ERR_error_string_n(e, msg, sizeof msg);
        return luaL_error(L, "crypto.random: the random generator failed: %s", msg);
    }
    luaL_pushresultsize(&b, (size_t)n);
    return 1;
}

/* crypto.sha256(data) -> 32 raw bytes */
static int l_crypto_sha256(lua_State *L) {
    size_t len;
    const char *data = luaL_checklstring(L, 1, &len);
    unsigned char out[EVP_MAX_MD_SIZE];
    unsigned int outlen = 0;
    if (EVP_Digest(data, len, out, &outlen, EVP_sha256(), NULL) != 1)
        return luaL_error(L, "crypto.sha256: digest failed");
    lua_pushlstring(L, (const char *)out, outlen);
    return 1;
}

/* crypto.hmac_sha256(key, data) -> 32 raw bytes */
static int l_crypto_hmac_sha256(lua_State *L) {
    size_t klen, dlen;
    const char *key = luaL_checklstring(L, 1, &klen);
    const char *data = luaL_checklstring(L, 2, &dlen);
    unsigned char out[EVP_MAX_MD_SIZE];
    unsigned int outlen = 0;
    /* Lua strings are never NULL, even when empty: OpenSSL reads a NULL key
     * as "keep the previous key", which must never happen here. */
    if (!HMAC(EVP_sha256(), key, (int)klen, (const unsigned char *)data, dlen, out, &outlen))
        return luaL_error(L, "crypto.hmac_sha256: HMAC failed");
    lua_pushlstring(L, (const char *)out, outlen);
    return 1;
}

/* crypto.equal(a, b) -> boolean. Time depends on the lengths only, never on
 * the content: lengths are not secret (a token's is public), contents are. */
static int l_crypto_equal(lua_State *L) {
    size_t alen, blen;
    const char *a = luaL_checklstring(L, 1, &alen);
    const char *b = luaL_checklstring(L, 2, &blen);
    lua_pushboolean(L, alen == blen && CRYPTO_memcmp(a, b, alen) == 0);
    return 1;
}

/* crypto.hex(raw) -> lowercase hex */
static int l_crypto_hex(lua_State *L) {
    static const char digits[] = "0123456789abcdef";
    size_t len;
    const unsigned char *s = (const unsigned char *)luaL_checklstring(L, 1, &len);
    luaL_Buffer b;
    char *p = luaL_buffinitsize(L, &b, len * 2);
    for (size_t i = 0; i < len; i++) {
        p[2 * i] = digits[s[i] >> 4];
        p[2 * i + 1] = digits[s[i] & 15];
    }
    luaL_pushresultsize(&b, len * 2);
    return 1;
}

static int hex_val(int c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

/* crypto.unhex(hex) -> raw | nil, err. Either case is accepted. */
static int l_crypto_unhex(lua_State *L) {
    size_t len;
    const char *s = luaL_checklstring(L, 1, &len);
    if (len % 2) return tn_fail(L, "unhex: odd number of digits (%d)", (int)len);
    for (size_t i = 0; i < len; i++) {
        if (hex_val((unsigned char)s[i]) < 0)
            return tn_fail(L, "unhex: invalid character at position %d", (int)i + 1);
    }
    luaL_Buffer b;
    char *p = luaL_buffinitsize(L, &b, len / 2);
    for (size_t i = 0; i < len / 2; i++)
        p[i] = (char)(hex_val((unsigned char)s[2 * i]) << 4 | hex_val((unsigned char)s[2 * i + 1]));
    luaL_pushresultsize(&b, len / 2);
    return 1;
}

static const char b64_std[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
static const char b64_url[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

static int b64_encode(lua_State *L, const char *alphabet, int pad) {
    size_t len;
    const unsigned char *s = (const unsigned char *)luaL_checklstring(L, 1, &len);
    size_t full = len / 3, rest = len % 3;
    size_t outlen = full * 4 + (rest ? (pad ? 4 : rest + 1) : 0);
    luaL_Buffer b;
    char *p = luaL_buffinitsize(L, &b, outlen);
    size_t o = 0;
    for (size_t i = 0; i < full * 3; i += 3) {
        uint32_t v = (uint32_t)s[i] << 16 | (uint32_t)s[i + 1] << 8 | s[i + 2];
        p[o++] = alphabet[v >> 18 & 63];
        p[o++] = alphabet[v >> 12 & 63];
        p[o++] = alphabet[v >> 6 & 63];
        p[o++] = alphabet[v & 63];
    }
    if (rest) {
        uint32_t v = (uint32_t)s[full * 3] << 16;
        if (rest == 2) v |= (uint32_t)s[full * 3 + 1] << 8;
        p[o++] = alphabet[v >> 18 & 63];
        p[o++] = alphabet[v >> 12 & 63];
        if (rest == 2) p[o++] = alphabet[v >> 6 & 63];
        else if (pad) p[o++] = '=';
        if (pad) p[o++] = '=';
    }
    luaL_pushresultsize(&b, outlen);
    return 1;
}

static int b64_val(int c, int url) {
    if (c >= 'A' && c <= 'Z') return c - 'A';
    if (c >= 'a' && c <= 'z') return c - 'a' + 26;
    if (c >= '0' && c <= '9') return c - '0' + 52;
    if (c == (url ? '-' : '+')) return 62;
    if (c == (url ? '_' : '/')) return 63;
    return -1;
}

/* Decodes len characters of s (no padding left) into a Lua string. Rejects
 * characters outside the alphabet, an impossible length, and unused low bits
 * that are not zero (a second spelling of the same bytes). */
static int b64_decode(lua_State *L, const char *what, const char *s, size_t len, int url) {
    if (len % 4 == 1) return tn_fail(L, "%s: invalid length %d", what, (int)len);
    for (size_t i = 0; i < len; i++) {
        if (b64_val((unsigned char)s[i], url) < 0)
            return tn_fail(L, "%s: invalid character at position %d", what, (int)i + 1);
    }
    size_t full = len / 4, rest = len % 4;
    size_t outlen = full * 3 + (rest ? rest - 1 : 0);
    if (rest) {
        int last = b64_val((unsigned char)s[len - 1], url);
        if ((rest == 2 && (last & 15)) || (rest == 3 && (last & 3)))
            return tn_fail(L, "%s: non-canonical encoding (unused bits set)", what);
    }
    luaL_Buffer b;
    char *p = luaL_buffinitsize(L, &b, outlen);
    size_t o = 0;
    for (size_t i = 0; i < full * 4; i += 4) {
        uint32_t v = (uint32_t)b64_val((unsigned char)s[i], url) << 18 |
                     (uint32_t)b64_val((unsigned char)s[i + 1], url) << 12 |
                     (uint32_t)b64_val((unsigned char)s[i + 2], url) << 6 |
                     (uint32_t)b64_val((unsigned char)s[i + 3], url);
        p[o++] = (char)(v >> 16);
        p[o++] = (char)(v >> 8);
        p[o++] = (char)v;
    }
    if (rest) {
        const char *t = s + full * 4;
        uint32_t v = (uint32_t)b64_val((unsigned char)t[0], url) << 18 |
                     (uint32_t)b64_val((unsigned char)t[1], url) << 12;
        if (rest == 3) v |= (uint32_t)b64_val((unsigned char)t[2], url) << 6;
        p[o++] = (char)(v >> 16);
        if (rest == 3) p[o++] = (char)(v >> 8);
    }
    luaL_pushresultsize(&b, outlen);
    return 1;
}

/* crypto.base64url(raw) -> URL-safe base64 without padding (32 bytes give
 * 43 characters, the form of API tokens) */
static int l_crypto_base64url(lua_State *L) { return b64_encode(L, b64_url, 0); }

/* crypto.unbase64url(s) -> raw | nil, err. Padding is rejected: the encoder
 * never writes it and tokens never carry it. */
static int l_crypto_unbase64url(lua_State *L) {
    size_t len;
    const char *s = luaL_checklstring(L, 1, &len);
    return b64_decode(L, "unbase64url", s, len, 1);
}

/* crypto.base64(raw) -> standard base64 with padding (HTTP Basic, PEM) */
static int l_crypto_base64(lua_State *L) { return b64_encode(L, b64_std, 1); }

/* crypto.unbase64(s) -> raw | nil, err. Standard alphabet, padding required
 * (length a multiple of 4), as RFC 7617 credentials are written. */
static int l_crypto_unbase64(lua_State *L) {
    size_t len;
    const char *s = luaL_checklstring(L, 1, &len);
    if (len % 4) return tn_fail(L, "unbase64: length %d is not a multiple of 4", (int)len);
    size_t pad = 0;
    while (pad < 2 && len > pad && s[len - 1 - pad] == '=') pad++;
    return b64_decode(L, "unbase64", s, len - pad, 0);
}

int tn_open_crypto(lua_State *L) {
    static const luaL_Reg fns[] = {
        {"random", l_crypto_random}, {"sha256", l_crypto_sha256},
        {"hmac_sha256", l_crypto_hmac_sha256}, {"equal", l_crypto_equal},
        {"hex", l_crypto_hex}, {"unhex", l_crypto_unhex},
        {"base64url", l_crypto_base64url}, {"unbase64url", l_crypto_unbase64url},
        {"base64", l_crypto_base64}, {"unbase64", l_crypto_unbase64},
        {NULL, NULL},
    };
    luaL_newlib(L, fns);
    return 1;
}
