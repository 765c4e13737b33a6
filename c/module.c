/*
 * tenement.core: the C core as one Lua module. The scheduler's functions sit
 * at the top level (core.spawn, core.run, core.sleep, ...); each primitive
 * family is a sub-table (core.proc, core.net, core.http, core.db, ...).
 */
#include "tn.h"

#include <signal.h>

int luaopen_tenement_core(lua_State *L);

int luaopen_tenement_core(lua_State *L) {
    static const struct { const char *name; lua_CFunction open; } families[] = {
        {"proc", tn_open_proc}, {"net", tn_open_net}, {"http", tn_open_http},
        {"db", tn_open_db}, {"crypto", tn_open_crypto}, {"fs", tn_open_fs},
        {"logbuf", tn_open_logbuf},
        {NULL, NULL},
    };
    /* A peer that hangs up must give EPIPE on write, never kill the server. */
    struct sigaction sa;
    if (sigaction(SIGPIPE, NULL, &sa) == 0 && sa.sa_handler == SIG_DFL)
        signal(SIGPIPE, SIG_IGN);
    tn_open_loop(L);
    for (int i = 0; families[i].name; i++) {
        families[i].open(L);
        lua_setfield(L, -2, families[i].name);
    }
    lua_pushliteral(L, TN_VERSION);
    lua_setfield(L, -2, "version");
    return 1;
}
