/*
 * libFuzzer target for the C HTTP request path (c/http.c on llhttp).
 *
 * Why through a real listener and not a harness around the parser: the
 * server's parsing is spread over the connection state machine (head
 * checks on the raw bytes, pipelining, lazy bodies, lingering close, the
 * proxy re-framing the request towards an upstream), all of it libuv
 * callbacks. Feeding bytes to a real socket exercises exactly the code a
 * client reaches, with no test-only entry point in the product.
 *
 * The harness embeds Lua 5.4 and links the core objects (compiled with
 * -fsanitize=fuzzer-no-link,address). At start it serves two
 * core.http.serve servers on Unix sockets in a fresh temp dir:
 *   front: lazy bodies as ten serve's front door; /p... is proxied with
 *          req:proxy to the upstream, anything else reads the body (at most
 *          1 MiB) and answers;
 *   upstream: reads the body and answers with what it saw.
 * Each input is written to a new connection to front, the write side shut,
 * and the answer read to EOF (bounded by timeouts), all on the core's loop.
 * A Lua error in the harness, a sanitizer report or a hang (libFuzzer's
 * -timeout) is a finding.
 */
#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int luaopen_tenement_core(lua_State *L);

static lua_State *L;
static int one_ref;
static char dir[256];

static const char *setup =
    "local dir = ...\n"
    "local core = require 'tenement.core'\n"
    "local front_path, up_path = dir .. '/front.sock', dir .. '/up.sock'\n"
    "local servers = {}\n"
    "core.run(function()\n"
    "  local up = assert(core.net.listen { path = up_path })\n"
    "  servers.up = core.http.serve(up, function(req)\n"
    "    local body = req:body(1024 * 1024, 2000)\n"
    "    return 200, { ['content-type'] = 'text/plain' },\n"
    "      'up ' .. req.method .. ' ' .. tostring(req.target) .. ' ' .. tostring(body and #body)\n"
    "  end, { header_timeout = 2000, idle_timeout = 2000, body_timeout = 2000 })\n"
    "  local front = assert(core.net.listen { path = front_path })\n"
    "  servers.front = core.http.serve(front, function(req)\n"
    "    if (req.path or ''):sub(1, 2) == '/p' then\n"
    "      local st = req:proxy { path = up_path, timeout = 2000, forwarded_proto = 'http' }\n"
    "      if not st then pcall(req.respond, req, 502, {}, 'bad gateway') end\n"
    "      return\n"
    "    end\n"
    "    local body, err = req:body(1024 * 1024, 2000)\n"
    "    local h = req.headers or {}\n"
    "    return 200, { ['x-len'] = tostring(body and #body or err), ['x-host'] = tostring(h.host) }, 'ok'\n"
    "  end, { lazy_body = true, header_timeout = 2000, idle_timeout = 2000, body_timeout = 2000,\n"
    "         send_timeout = 2000 })\n"
    "end)\n"
    "_G.__servers = servers\n"
    "return function(data)\n"
    "  core.run(function()\n"
    "    local c = assert(core.net.connect { path = front_path, timeout = 2000 })\n"
    "    c:write(data)\n"
    "    c:shutdown()\n"
    "    local got = 0\n"
    "    while got < 16 * 1024 * 1024 do\n"
    "      local chunk = c:read(3000)\n"
    "      if not chunk then break end\n"
    "      got = got + #chunk\n"
    "    end\n"
    "    c:close()\n"
    "  end)\n"
    "end\n";

static void die(const char *what, const char *detail) {
    fprintf(stderr, "http_fuzz: %s: %s\n", what, detail ? detail : "");
    abort();
}

static void cleanup(void) {
    char path[300];
    snprintf(path, sizeof path, "%s/front.sock", dir);
    unlink(path);
    snprintf(path, sizeof path, "%s/up.sock", dir);
    unlink(path);
    rmdir(dir);
}

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc;
    (void)argv;
    const char *tmp = getenv("TMPDIR");
    snprintf(dir, sizeof dir, "%s/tenement-http-fuzz.XXXXXX", tmp && *tmp ? tmp : "/tmp");
    if (!mkdtemp(dir)) die("mkdtemp", dir);
    atexit(cleanup);
    L = luaL_newstate();
    if (!L) die("luaL_newstate", "out of memory");
    luaL_openlibs(L);
    luaL_requiref(L, "tenement.core", luaopen_tenement_core, 0);
    lua_pop(L, 1);
    if (luaL_loadstring(L, setup) != LUA_OK) die("setup", lua_tostring(L, -1));
    lua_pushstring(L, dir);
    if (lua_pcall(L, 1, 1, 0) != LUA_OK) die("setup", lua_tostring(L, -1));
    one_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    lua_rawgeti(L, LUA_REGISTRYINDEX, one_ref);
    lua_pushlstring(L, (const char *)data, size);
    if (lua_pcall(L, 1, 0, 0) != LUA_OK) die("exchange failed", lua_tostring(L, -1));
    lua_gc(L, LUA_GCSTEP, 0);
    return 0;
}
