/*
 * The `ten` host: Lua 5.4 with tenement.core built in and every Lua script of
 * lua/ and runtimes/ embedded, so one file deploys. The personality comes
 * from argv[0]: `ten` or `slum` (a link to the same file).
 */
#include "tn.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <lualib.h>

int luaopen_tenement_core(lua_State *L);

/* Generated at build time from lua/ and runtimes/ (see c/embed.lua). */
struct tn_embedded { const char *module; const char *chunkname; const unsigned char *src; size_t len; };
extern const struct tn_embedded tn_embedded[];

static const struct tn_embedded *embedded_find(const char *name) {
    for (int i = 0; tn_embedded[i].module; i++)
        if (strcmp(tn_embedded[i].module, name) == 0) return &tn_embedded[i];
    return NULL;
}

/* A package.searchers entry: embedded scripts win over the file system, so
 * the binary runs the code it was built with. */
static int embedded_searcher(lua_State *L) {
    const char *name = luaL_checkstring(L, 1);
    const struct tn_embedded *e = embedded_find(name);
    if (!e) {
        lua_pushfstring(L, "no embedded module '%s'", name);
        return 1;
    }
    if (luaL_loadbufferx(L, (const char *)e->src, e->len, e->chunkname, "t") != LUA_OK)
        return lua_error(L);
    lua_pushstring(L, e->chunkname + 1);
    return 2;
}

static void install_searcher(lua_State *L) {
    lua_getglobal(L, "package");
    lua_getfield(L, -1, "preload");
    lua_pushcfunction(L, luaopen_tenement_core);
    lua_setfield(L, -2, "tenement.core");
    lua_pop(L, 1);
    lua_getfield(L, -1, "searchers");
    /* after preload (1), before the path searchers */
    lua_Integer n = luaL_len(L, -1);
    for (lua_Integer i = n; i >= 2; i--) {
        lua_rawgeti(L, -1, i);
        lua_rawseti(L, -2, i + 1);
    }
    lua_pushcfunction(L, embedded_searcher);
    lua_rawseti(L, -2, 2);
    lua_pop(L, 2);
}

static int traceback(lua_State *L) {
    const char *msg = lua_tostring(L, 1);
    if (!msg) msg = luaL_tolstring(L, 1, NULL);
    luaL_traceback(L, L, msg, 1);
    return 1;
}

static void warn_to_stderr(void *ud, const char *msg, int tocont) {
    (void)ud;
    fputs(msg, stderr);
    if (!tocont) fputc('\n', stderr);
}

int main(int argc, char **argv) {
    /* The init of namespaced instances (c/init.c), for a run by hand: no Lua
     * state, no loop. Instances themselves get the small embedded build. */
    if (argc > 1 && strcmp(argv[1], "__tenement_init") == 0) return tn_init_main(argc, argv, 2);
    lua_State *L = luaL_newstate();
    if (!L) {
        fputs("ten: cannot create the Lua state (out of memory)\n", stderr);
        return 70;
    }
    /* Errors in __gc (a handle closing late) reach stderr instead of vanishing. */
    lua_setwarnf(L, warn_to_stderr, NULL);
    luaL_openlibs(L);
    /* A server makes mostly short-lived garbage (a request's tables): the
     * generational collector handles that at a fraction of the cost. */
    lua_gc(L, LUA_GCGEN, 0, 0);
    install_searcher(L);

    const char *self = strrchr(argv[0], '/');
    self = self ? self + 1 : argv[0];

    lua_pushcfunction(L, traceback);
    lua_getglobal(L, "require");
    lua_pushliteral(L, "tenement.main");
    if (lua_pcall(L, 1, 1, 1) != LUA_OK) {
        fprintf(stderr, "ten: %s\n", lua_tostring(L, -1));
        lua_close(L);
        return 70;
    }
    lua_pushstring(L, self);
    lua_createtable(L, argc, 0);
    for (int i = 0; i < argc; i++) {
        lua_pushstring(L, argv[i]);
        lua_rawseti(L, -2, i);
    }
    lua_pushvalue(L, -1);
    lua_setglobal(L, "arg");
    int code = 70;
    if (lua_pcall(L, 2, 1, 1) != LUA_OK) {
        fprintf(stderr, "ten: internal error: %s\n", lua_tostring(L, -1));
    } else {
        code = lua_isinteger(L, -1) ? (int)lua_tointeger(L, -1) : 0;
    }
    fflush(stdout);
    lua_close(L);
    return code;
}
