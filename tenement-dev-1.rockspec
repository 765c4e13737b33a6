-- For luarocks users: the Lua policy modules and the C core as tenement.core.
-- Most people want the single `ten` binary instead (`make`, see README.md).
-- The build also compiles the namespaced instances' init with musl-gcc
-- (Debian: musl-tools), or with the compiler named by INIT_CC.
rockspec_format = "3.0"
package = "tenement"
version = "dev-1"
source = { url = "git+https://example.invalid/tenement.git" }
description = {
  summary = "Process supervisor and reverse proxy for many small services on one Linux server",
  license = "Apache-2.0",
}
dependencies = { "lua >= 5.4, < 5.5", "lua-cjson" }
external_dependencies = {
  LIBUV = { header = "uv.h" },
  SQLITE = { header = "sqlite3.h" },
  OPENSSL = { header = "openssl/evp.h" },
  LLHTTP = { header = "llhttp.h" },
}
build = {
  type = "make",
  build_target = "build/lib/tenement/core.so",
  install_target = "install-rock",
  build_variables = { CFLAGS = "$(CFLAGS)", LUA = "$(LUA)" },
  install_variables = { LUADIR = "$(LUADIR)", LIBDIR = "$(LIBDIR)" },
}
