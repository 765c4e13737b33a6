/*
 * libFuzzer target for the TOML parser (lua/tenement/toml.lua).
 *
 * Embeds Lua 5.4, loads tenement.toml from the source tree (the Lua path is
 * $TENEMENT_LUA_DIR, default "lua", relative to the working directory: make
 * fuzz runs from the repository root) and calls toml.parse on every input.
 * The contract checked: toml.parse never raises, and answers either a table
 * or nil plus a message (a string that names the source, line and column).
 * Anything else aborts, which libFuzzer reports as a crash with the input.
 */
#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static lua_State *L;
static int parse_ref;

/* libFuzzer instruments C, not Lua: without help it would see only the
 * interpreter's generic paths. A line hook maps each (previous line, line)
 * pair of the Lua code to a byte of libFuzzer's extra counters, so new
 * paths through toml.lua count as new coverage. */
#define COUNTERS 65536
__attribute__((section("__libfuzzer_extra_counters"))) static uint8_t counters[COUNTERS];
static uint32_t prev_loc;

static void line_hook(lua_State *l, lua_Debug *ar) {
    if (!lua_getinfo(l, "S", ar)) return;
    uint32_t src = (uint32_t)(uintptr_t)ar->source;
    uint32_t loc = (src * 2654435761u) ^ ((uint32_t)ar->currentline * 40503u);
    uint32_t edge = (loc ^ (prev_loc >> 1)) % COUNTERS;
    prev_loc = loc;
    if (counters[edge] < 255) counters[edge]++;
}

static void die(const char *what, const char *detail) {
    fprintf(stderr, "toml_fuzz: %s: %s\n", what, detail ? detail : "");
    abort();
}

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc;
    (void)argv;
    L = luaL_newstate();
    if (!L) die("luaL_newstate", "out of memory");
    luaL_openlibs(L);
    const char *dir = getenv("TENEMENT_LUA_DIR");
    char path[4096];
    snprintf(path, sizeof path, "%s/?.lua", dir && *dir ? dir : "lua");
    lua_getglobal(L, "package");
    lua_pushstring(L, path);
    lua_setfield(L, -2, "path");
    lua_pop(L, 1);
    lua_getglobal(L, "require");
    lua_pushliteral(L, "tenement.toml");
    if (lua_pcall(L, 1, 1, 0) != LUA_OK) die("require tenement.toml", lua_tostring(L, -1));
    lua_getfield(L, -1, "parse");
    if (!lua_isfunction(L, -1)) die("tenement.toml", "has no parse function");
    parse_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    lua_pop(L, 1);
    lua_sethook(L, line_hook, LUA_MASKLINE, 0);
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    int top = lua_gettop(L);
    prev_loc = 0;
    lua_rawgeti(L, LUA_REGISTRYINDEX, parse_ref);
    lua_pushlstring(L, (const char *)data, size);
    lua_pushliteral(L, "fuzz.toml");
    if (lua_pcall(L, 2, 2, 0) != LUA_OK) die("toml.parse raised", lua_tostring(L, -1));
    if (lua_istable(L, -2)) {
        /* a table: fine */
    } else if (lua_isnil(L, -2) && lua_type(L, -1) == LUA_TSTRING) {
        const char *msg = lua_tostring(L, -1);
        if (strncmp(msg, "fuzz.toml:", 10) != 0) die("error message does not name the source", msg);
    } else {
        die("toml.parse returned neither a table nor nil + message", luaL_typename(L, -2));
    }
    lua_settop(L, top);
    /* keep memory flat across millions of inputs */
    lua_gc(L, LUA_GCSTEP, 0);
    return 0;
}
