-- tenement.config: finding and loading the file, defaults, the reference's complete
-- example, top-level sections, names, and reporting every problem at once.
-- Fields of each section are in config_settings_spec, config_service_spec,
-- config_template_spec and config_refs_spec.

local config = require("tenement.config")
local support = require("support")

local FIXTURES = "spec/fixtures/config"

local function lines(s)
  local out = {}
  for l in (s .. "\n"):gmatch("(.-)\n") do out[#out + 1] = l end
  return out
end

local function parse_ok(text, env)
  local cfg, err = config.parse(text, "tenement.toml", env or {})
  assert(cfg, err)
  return cfg
end

local function parse_errors(text, env)
  local cfg, err = config.parse(text, "tenement.toml", env or {})
  assert.is_nil(cfg)
  assert.is_string(err)
  return lines(err)
end

describe("config.find", function()
  it("prefers --config over TENEMENT_CONFIG", function()
    local path, from = config.find("cli.toml", { TENEMENT_CONFIG = "env.toml" })
    assert.equal("cli.toml", path)
    assert.equal("--config", from)
  end)

  it("uses TENEMENT_CONFIG without --config", function()
    local path, from = config.find(nil, { TENEMENT_CONFIG = "env.toml" })
    assert.equal("env.toml", path)
    assert.equal("TENEMENT_CONFIG", from)
  end)

  it("falls back to ./tenement.toml", function()
    assert.equal("./tenement.toml", (config.find(nil, {})))
    assert.equal("./tenement.toml", (config.find(nil, nil)))
    local _, from = config.find(nil, {})
    assert.equal("default", from)
  end)

  it("ignores empty values, as an unset variable", function()
    assert.equal("./tenement.toml", (config.find("", { TENEMENT_CONFIG = "" })))
    assert.equal("env.toml", (config.find("", { TENEMENT_CONFIG = "env.toml" })))
  end)
end)

describe("config.load", function()
  it("loads a file and records its path as the source", function()
    local path = FIXTURES .. "/complete.toml"
    local cfg, err = config.load(path, {})
    assert(cfg, err)
    assert.equal(path, cfg.source)
  end)

  it("names the path, the OS reason and ten init for a missing file", function()
    local path = FIXTURES .. "/no-such-file.toml"
    local cfg, err = config.load(path, {})
    assert.is_nil(cfg)
    assert.equal("cannot read config file " .. path .. ": No such file or directory;"
      .. ' create one with "ten init", or name another with --config FILE or TENEMENT_CONFIG',
      err)
  end)

  it("names the path and the OS reason for a directory", function()
    local cfg, err = config.load(FIXTURES, {})
    assert.is_nil(cfg)
    assert.equal("cannot read config file " .. FIXTURES .. ": Is a directory;"
      .. ' create one with "ten init", or name another with --config FILE or TENEMENT_CONFIG',
      err)
  end)

  it("reports every problem of a broken file with its path", function()
    local path = FIXTURES .. "/broken.toml"
    local cfg, err = config.load(path, {})
    assert.is_nil(cfg)
    assert.same({
      path .. ':2:1: settings.health_check_intervall = 10: unknown key;'
        .. ' did you mean "health_check_interval"?',
      path .. ":3:8: settings.port = 0: out of range: expected an integer from 1 to 65535",
      path .. ':7:11: service.api.restart = "sometimes": expected one of always, on-failure, never',
      path .. ':10:16: instances.api[2] = "../x": not a valid instance id: it starts with ".";'
        .. ' names use 1-63 characters from a-z, 0-9 and "-", starting with a letter or digit,'
        .. " because they become socket paths, directories and DNS labels",
      path .. ':11:1: instances.worker: no service "worker" is defined; defined services: api',
    }, lines(err))
  end)

  it("passes TOML syntax errors through with their position", function()
    local cfg, err = config.parse('[settings]\nport = = 1\n', "tenement.toml", {})
    assert.is_nil(cfg)
    assert.matches("^tenement%.toml:2:%d+: ", err)
  end)
end)

describe("config.defaults", function()
  it("is the configuration of an empty file, with every documented default", function()
    local d = config.defaults()
    assert.same({
      data_dir = "/var/lib/tenement",
      health_check_interval = 10,
      max_restarts = 3,
      restart_window = 300,
      backoff_base_ms = 1000,
      backoff_max_ms = 60000,
      stop_timeout = 10,
      listen = "127.0.0.1",
      port = 8080,
      max_head_kb = 16,
      max_headers = 100,
      max_body_mb = 10,
      header_timeout = 10,
      keepalive_timeout = 60,
      max_connections = 4096,
      upstream_keepalive = 64,
      drain_timeout = 10,
      auth_failures_per_minute = 20,
      metrics_auth = false,
      max_cold_starts = 32,
      proxy_timeout = 60,
      log_ring_lines = 1000,
      log_retention_days = 7,
      log_max_lines = 1000000,
      log_max_mb = 1024,
      domain = "localhost",
      tls = {
        enabled = false,
        cache_dir = "/var/lib/tenement/acme",
        staging = false,
        https_port = 443,
        http_port = 80,
      },
    }, d.settings)
    assert.same({}, d.services)
    assert.same({}, d.service_names)
    assert.same({}, d.instances)
    assert.same({ subdomain = {}, path = {} }, d.routing)
    assert.same({}, d.hooks)
    assert.is_nil(d.source)
  end)

  it("equals parsing an empty file (apart from the source)", function()
    local cfg = parse_ok("")
    cfg.source = nil
    assert.same(config.defaults(), cfg)
  end)

  it("returns a fresh table each time", function()
    local a = config.defaults()
    a.settings.port = 1
    assert.equal(8080, config.defaults().settings.port)
  end)
end)

describe("the configuration reference's complete example", function()
  local cfg

  setup(function()
    local err
    cfg, err = config.load(FIXTURES .. "/complete.toml", {})
    assert(cfg, err)
  end)

  it("has the documented settings", function()
    assert.same({
      data_dir = "/var/lib/myapp",
      health_check_interval = 10,
      max_restarts = 3,
      restart_window = 300,
      backoff_base_ms = 1000,
      backoff_max_ms = 60000,
      stop_timeout = 10,
      listen = "127.0.0.1",
      port = 8080,
      max_head_kb = 16,
      max_headers = 100,
      max_body_mb = 10,
      header_timeout = 10,
      keepalive_timeout = 60,
      max_connections = 4096,
      upstream_keepalive = 64,
      drain_timeout = 10,
      auth_failures_per_minute = 20,
      metrics_auth = false,
      max_cold_starts = 32,
      proxy_timeout = 60,
      log_ring_lines = 1000,
      log_retention_days = 7,
      log_max_lines = 1000000,
      log_max_mb = 1024,
      domain = "localhost",
      tls = {
        enabled = true,
        acme_email = "admin@example.com",
        domain = "example.com",
        cache_dir = "/var/lib/myapp/acme",
        staging = false,
        https_port = 443,
        http_port = 80,
      },
    }, cfg.settings)
  end)

  it("has service api with its values and defaults", function()
    assert.same({
      name = "api",
      section = "service",
      line = 13,
      command = "uv run python app.py",
      args = {},
      socket = "/tmp/tenement/{name}-{id}.sock",
      health = "/health",
      startup_timeout = 10,
      idle_timeout = 300,
      restart = "on-failure",
      isolation = "namespace",
      memory_limit_mb = 256,
      cpu_shares = 100,
      storage_quota_mb = 100,
      storage_persist = false,
      on_demand = false,
      network = "host",
      filesystem = "host",
      mounts = {},
      env = { DATABASE_PATH = "{data_dir}/{id}/app.db", LOG_LEVEL = "info" },
    }, cfg.services.api)
  end)

  it("has service worker with its values and defaults", function()
    assert.same({
      name = "worker",
      section = "service",
      line = 27,
      command = "./worker",
      args = {},
      socket = "/tmp/tenement/{name}-{id}.sock",
      health = "/health",
      startup_timeout = 10,
      idle_timeout = 0,
      restart = "on-failure",
      isolation = "namespace",
      memory_limit_mb = 512,
      cpu_shares = 200,
      storage_persist = false,
      on_demand = false,
      network = "host",
      filesystem = "host",
      mounts = {},
      env = {},
    }, cfg.services.worker)
  end)

  it("lists services and instances", function()
    assert.same({ "api", "worker" }, cfg.service_names)
    assert.same({
      { service = "api", id = "prod" },
      { service = "api", id = "staging" },
      { service = "worker", id = "default" },
    }, cfg.instances)
  end)

  it("has no routing rules, no hooks and no host variables", function()
    assert.same({ subdomain = {}, path = {} }, cfg.routing)
    assert.same({}, cfg.hooks)
    assert.same({}, cfg.host_env)
  end)

  it("expands the api environment for api:prod", function()
    local inst = assert(config.resolve(cfg, "api", "prod", 30001))
    assert.same({
      DATABASE_PATH = "/var/lib/myapp/prod/app.db",
      LOG_LEVEL = "info",
    }, inst.env)
    assert.equal("/tmp/tenement/api-prod.sock", inst.socket)
    assert.equal("/var/lib/myapp/api/prod", inst.instance_dir)
  end)
end)

describe("the legacy format", function()
  it("loads [process.NAME] and runtime as service and isolation", function()
    local cfg, err = config.load(FIXTURES .. "/legacy.toml", {})
    assert(cfg, err)
    assert.same({ "api", "web" }, cfg.service_names)
    assert.equal("process", cfg.services.api.isolation)
    assert.equal("process", cfg.services.api.section)
    assert.equal("./api", cfg.services.api.command)
    assert.equal("namespace", cfg.services.web.isolation)
    assert.equal("service", cfg.services.web.section)
    -- file order: web's line comes before api's in [instances]
    assert.same({
      { service = "web", id = "main" },
      { service = "api", id = "a" },
      { service = "api", id = "b" },
    }, cfg.instances)
  end)
end)

describe("top-level keys", function()
  it("suggests the nearest section for a misspelt one", function()
    assert.same({
      'tenement.toml:1:2: setings: unknown key; did you mean [settings]?',
    }, parse_errors("[setings]\nport = 1\n"))
  end)

  it("points a stray setting at [settings]", function()
    assert.same({
      'tenement.toml:1:1: port = 8080: unknown key; port belongs under [settings]',
    }, parse_errors("port = 8080\n"))
  end)

  it("lists the sections when nothing is close", function()
    assert.same({
      "tenement.toml:1:2: database: unknown key; known sections in the file:"
        .. " [settings], [service], [process], [instances], [routing], [hooks]",
    }, parse_errors("[database]\nurl = 'x'\n"))
  end)

  it("rejects a section that is not a table", function()
    assert.same({
      'tenement.toml:1:12: settings = "x": expected a table, got a string',
      'tenement.toml:2:11: service = 1: expected a table, got an integer',
      'tenement.toml:3:13: instances = true: expected a table, got a boolean',
      'tenement.toml:4:11: routing = []: expected a table, got an array',
      'tenement.toml:5:9: hooks = 2.5: expected a table, got a float',
    }, parse_errors('settings = "x"\nservice = 1\ninstances = true\nrouting = []\nhooks = 2.5\n'))
  end)
end)

describe("docs/configuration.md", function()
  it("shows errors as config reports them", function()
    local f = assert(io.open("docs/configuration.md"))
    local doc = f:read("a")
    f:close()
    local example = assert(doc:match("\n```\n(tenement%.toml:.-)\n```"))
    local _, err = config.parse('[service.api]\ncommand = "./api"\nrestart = "sometimes"\nhelth = "/h"\n',
      "tenement.toml", {})
    assert.equal(example, err)
  end)
end)

describe("an array of tables where a table belongs", function()
  it("is named as such, with the header to write instead", function()
    assert.same({
      "tenement.toml:1:3: service: expected a table, got an array of tables: write"
        .. " [service.NAME] sections, not [[service]]",
      "tenement.toml:3:3: settings: expected a table, got an array of tables: write"
        .. " [settings], not [[settings]]",
    }, parse_errors('[[service]]\ncommand = "x"\n[[settings]]\nport = 80\n'))
  end)
end)

describe("config.valid_name", function()
  it("accepts names of a-z, 0-9 and -", function()
    for _, s in ipairs({ "a", "0", "api", "web-2", "a1-b2-c3", ("x"):rep(63), "9lives" }) do
      assert.is_true(config.valid_name(s), s)
    end
  end)

  local RULE = 'names use 1-63 characters from a-z, 0-9 and "-", starting with a letter'
    .. " or digit, because they become socket paths, directories and DNS labels"

  local cases = {
    { "", "it is empty" },
    { ("x"):rep(64), "it is 64 characters long" },
    { "API", 'uppercase "A" is not allowed' },
    { "aPi", 'uppercase "P" is not allowed' },
    { "..", 'it starts with "."' },
    { "../x", 'it starts with "."' },
    { "a/b", '"/" is not allowed' },
    { "a..b", '"." is not allowed' },
    { "-a", 'it starts with "-"' },
    { "a_b", '"_" is not allowed' },
    { "a b", '" " is not allowed' },
    { "a\0b", '"\\u0000" is not allowed' },
  }
  for _, c in ipairs(cases) do
    it(("rejects %q: %s"):format(c[1], c[2]), function()
      local ok, why = config.valid_name(c[1])
      assert.is_nil(ok)
      assert.equal("not a valid name: " .. c[2] .. "; " .. RULE, why)
    end)
  end

  it("rejects non-strings", function()
    local ok, why = config.valid_name(42)
    assert.is_nil(ok)
    assert.equal("expected a string, got an integer", why)
    ok, why = config.valid_name(nil)
    assert.is_nil(ok)
    assert.equal("expected a string, got nothing", why)
  end)
end)

describe("reporting", function()
  it("reports all problems at once, in file order", function()
    local errs = parse_errors(table.concat({
      "[service.web]",            -- 1
      'command = ""',             -- 2
      "idle_timeout = -1",        -- 3
      "",                         -- 4
      "[settings]",               -- 5
      "port = 65536",             -- 6
      "stop_timeout = 'x'",       -- 7
      "",                         -- 8
      "[routing]",                -- 9
      'default = "wbe"',          -- 10
    }, "\n"))
    assert.same({
      'tenement.toml:2:11: service.web.command = "": must not be empty',
      "tenement.toml:3:16: service.web.idle_timeout = -1: out of range: expected an integer >= 0",
      "tenement.toml:6:8: settings.port = 65536: out of range: expected an integer from 1 to 65535",
      'tenement.toml:7:16: settings.stop_timeout = "x": expected an integer, got a string',
      'tenement.toml:10:11: routing.default = "wbe": no service "wbe" is defined;'
        .. ' did you mean "web"?',
    }, errs)
  end)

  it("returns the problems as a list too", function()
    local cfg, err, list = config.parse("[settings]\nport = 0\nmax_restarts = -1\n",
      "tenement.toml", {})
    assert.is_nil(cfg)
    assert.is_string(err)
    assert.same({
      { line = 2, col = 8, text = "settings.port = 0: out of range: expected an integer from 1 to 65535" },
      { line = 3, col = 16, text = "settings.max_restarts = -1: out of range: expected an integer >= 0" },
    }, list)
  end)

  it("uses the source it is given", function()
    local _, err = config.parse("[settings]\nport = 0\n", "conf/other.toml", {})
    assert.equal("conf/other.toml:2:8: settings.port = 0: out of range:"
      .. " expected an integer from 1 to 65535", err)
  end)

  it("points at the value after a dotted key", function()
    assert.same({
      'tenement.toml:3:13: service.api.env.PORT2 = 5: expected a string, got an integer'
        .. ' (quote it: "5")',
    }, parse_errors('[service.api]\ncommand = "x"\nenv.PORT2 = 5\n'))
  end)

  it("points at the value after a quoted key holding \"=\"", function()
    assert.same({
      'tenement.toml:4:10: routing.path."/a=b" = 5: expected a string, got an integer'
        .. ' (quote it: "5")',
    }, parse_errors('[service.api]\ncommand = "x"\n[routing.path]\n"/a=b" = 5\n'))
  end)

  it("warns of a path route that takes the server's own paths, and of no other", function()
    local cfg = parse_ok('[service.api]\ncommand = "x"\n[routing.path]\n"/api" = "api"\n"/shop" = "api"\n'
      .. '"/apis" = "api"\n"/" = "api"\n')
    assert.same({
      'tenement.toml:4: [routing.path] "/api" takes /api/ from the server on the bare domain (path routes go first): '
        .. "HTTP API clients and ten --server get the service instead; the CLI on this machine still works, "
        .. "through the control socket",
      'tenement.toml:7: [routing.path] "/" takes /api/, /health, /metrics from the server on the bare domain (path '
        .. "routes go first): HTTP API clients and ten --server get the service instead; the CLI on this machine "
        .. "still works, through the control socket",
    }, cfg.warnings)
    assert.same({}, parse_ok('[service.api]\ncommand = "x"\n[routing.path]\n"/api/v2" = "api"\n').warnings)
  end)

  it("warns of a program named by a path that is not there, and of no other", function()
    local cfg = parse_ok('[service.a]\ncommand = "./no-such-app --flag"\n[service.b]\ncommand = "/bin/sh"\n'
      .. '[service.c]\ncommand = "/no/such/app"\n[service.d]\ncommand = "app-on-path"\n'
      .. '[service.e]\ncommand = "./no-such-app > log"\n[service.f]\ncommand = "bin/app"\nworkdir = "/no/such/dir"\n')
    assert.same({
      'tenement.toml:2: service.a.command: the program "./no-such-app" is not there (a relative program is looked '
        .. "for in the directory ten serve runs in, here the current one): each start would fail",
      'tenement.toml:6: service.c.command: the program "/no/such/app" is not there: each start would fail',
      'tenement.toml:13: service.f.workdir: "/no/such/dir" does not exist: each start would fail',
    }, cfg.warnings)
    cfg = parse_ok('[service.f]\ncommand = "bin/app"\nworkdir = "/tmp"\n')
    assert.same({ 'tenement.toml:2: service.f.command: the program "bin/app" is not there (in workdir "/tmp"): each '
      .. "start would fail" }, cfg.warnings)
    -- a bare name is looked for on the PATH the app gets: the host's, or its own
    cfg = parse_ok('[service.d]\ncommand = "app-on-path --x"\n[service.s]\ncommand = "sh -c true"\n'
      .. '[service.o]\ncommand = "app-on-path"\n[service.o.env]\nPATH = "/no/such:/bin"\n', { PATH = "/usr/bin:/bin" })
    assert.same({
      'tenement.toml:2: service.d.command: no program "app-on-path" on the PATH (/usr/bin:/bin): each start would '
        .. "fail; name it by its path, or install it",
      'tenement.toml:6: service.o.command: no program "app-on-path" on the PATH (/no/such:/bin): each start would '
        .. "fail; name it by its path, or install it",
    }, cfg.warnings)
  end)

  it("says that a dotted service header is a table inside a service, not a service name", function()
    assert.same({
      "tenement.toml:1:1: service.my.command: missing: command is required (command that starts the service)",
      'tenement.toml:1:13: service.my.app: unknown key; a service name cannot hold ".": [service.my.app] is read as '
        .. 'service "my" with a table "app" in it (a name like "my-app" works)',
    }, parse_errors('[service.my.app]\ncommand = "x"\n'))
    -- a plain misspelt key still gets the list
    assert.matches("known keys in %[service.a%]", parse_errors('[service.a]\ncommand = "x"\nzzz = 1\n')[1])
  end)

  it("warns of a user this host does not have", function()
    local cfg = parse_ok('[service.a]\ncommand = "/bin/sh"\nuser = "no-such-user-here"\n[service.b]\ncommand = "/bin/sh"\n'
      .. 'user = "root"\n[service.c]\ncommand = "/bin/sh"\nuser = "4321"\n')
    assert.same({ 'tenement.toml:3: service.a.user: no user "no-such-user-here" in /etc/passwd (create it with '
      .. '`useradd --system no-such-user-here`, or give a numeric uid): every start would fail' }, cfg.warnings)
  end)

  it("warns of an isolation level that is accepted but cannot start yet", function()
    local cfg = parse_ok('[service.vm]\ncommand = "/bin/sh"\nisolation = "firecracker"\n[service.ok]\ncommand = "/bin/sh"\n')
    assert.same({ 'tenement.toml:3: service.vm.isolation = "firecracker": firecracker VMs are not available yet, so '
      .. 'every start of it will fail; use "namespace" or "sandbox"' }, cfg.warnings)
  end)

  -- the first instance to listen kept the socket, and the others' starts
  -- failed blaming "something else" that bound the path
  it("warns of a socket template that instances or services would share", function()
    local cfg = parse_ok(table.concat({
      "[service.d]", 'command = "/bin/sh"', 'socket = "/run/same.sock"',
      "[service.e]", 'command = "/bin/sh"', 'socket = "/run/same.sock"',
      "[service.f]", 'command = "/bin/sh"', 'socket = "/run/x/{id}.sock"',
      "[service.g]", 'command = "/bin/sh"', 'socket = "/run/x/{id}.sock"',
      "[service.h]", 'command = "/bin/sh"', 'socket = "{instance_dir}/app.sock"',
      "[service.i]", 'command = "/bin/sh"', 'socket = "{instance_dir}/app.sock"',
    }, "\n") .. "\n")
    assert.same({
      'tenement.toml:3: service.d.socket = "/run/same.sock" has no {id}: its instances would share one socket, and '
        .. "only one could listen; put {id} in it",
      'tenement.toml:6: service.e.socket = "/run/same.sock" is also service.d\'s, with no {name}: instances of the '
        .. "two with one id would share a socket; put {name} in it",
      'tenement.toml:6: service.e.socket = "/run/same.sock" has no {id}: its instances would share one socket, and '
        .. "only one could listen; put {id} in it",
      'tenement.toml:12: service.g.socket = "/run/x/{id}.sock" is also service.f\'s, with no {name}: instances of the '
        .. "two with one id would share a socket; put {name} in it",
    }, cfg.warnings)
  end)

  -- accepted, and then silently overwritten or without effect
  it("warns of env values tenement overwrites and of max_instances without on_demand", function()
    local cfg = parse_ok(table.concat({
      "[service.a]", 'command = "/bin/sh"', "max_instances = 3",
      "[service.a.env]", 'PORT = "80"', 'MY_PORT = "80"',
      "[service.b]", 'command = "/bin/sh"', "max_instances = 3", "on_demand = true",
    }, "\n") .. "\n")
    assert.same({
      "tenement.toml:3: service.a.max_instances limits the instances requests create, and without on_demand = "
        .. "true requests create none: it has no effect",
      "tenement.toml:5: service.a.env.PORT: tenement sets PORT for every app (to its {port}), over this value; use "
        .. "{port} where the value is needed, or another name",
    }, cfg.warnings)
  end)

  it("warns of a sandbox socket directory other instances share, and of nproc for an app run as root", function()
    local core = require "tenement.core"
    local cfg = parse_ok(table.concat({
      "[service.a]", 'command = "/bin/sh"', 'isolation = "sandbox"',
      "[service.b]", 'command = "/bin/sh"', 'isolation = "sandbox"', 'socket = "/run/t/{name}-{id}/app.sock"',
      "[service.c]", 'command = "/bin/sh"', 'user = "root"', "nproc = 10",
      "[service.d]", 'command = "/bin/sh"', "nproc = 10",
    }, "\n") .. "\n")
    local want = {
      'tenement.toml:1: service.a.socket = "/tmp/tenement/{name}-{id}.sock": its directory is shared with other '
        .. "instances, and the sandbox binds it read-write: each app could reach, or remove, the others' sockets; "
        .. 'give each instance a directory of its own (socket = "/tmp/tenement/{name}-{id}/app.sock")',
      "tenement.toml:11: service.c.nproc = 10 cannot limit an app that runs as root (the kernel exempts root from "
        .. "it): every start would fail; set pids_limit, or a user for the service",
    }
    -- without a user, the app runs as the server's
    if core.proc.geteuid() == 0 then
      want[3] = "tenement.toml:14: service.d.nproc = 10 cannot limit an app that runs as root (the kernel exempts "
        .. "root from it): every start would fail; set pids_limit, or a user for the service"
    end
    assert.same(want, cfg.warnings)
  end)

  it("warns of a path mounts names that is not there, and of a socket directory a private file system shares", function()
    local cfg = parse_ok('[service.a]\ncommand = "/bin/sh"\nfilesystem = "private"\n'
      .. 'mounts = ["/bin", "/tenement-no-such-dir:rw"]\n')
    assert.same({
      'tenement.toml:1: service.a.socket = "/tmp/tenement/{name}-{id}.sock": its directory is shared with other '
        .. "instances, and a private file system binds it read-write: each app could reach, or remove, the others' "
        .. 'sockets; give each instance a directory of its own (socket = "/tmp/tenement/{name}-{id}/app.sock")',
      "tenement.toml:4: service.a.mounts: /tenement-no-such-dir is not there: every start would fail",
    }, cfg.warnings)
  end)

  -- fs.nr_open bounds every process; without CAP_SYS_RESOURCE the server's
  -- own hard limit does too (this machine's root in a container lacks it)
  it("warns of a nofile this server cannot give", function()
    local f = assert(io.open("/proc/sys/fs/nr_open"))
    local most = assert(tonumber(f:read("l")))
    f:close()
    f = assert(io.open("/proc/self/status"))
    local caps = tonumber(f:read("a"):match("\nCapEff:%s*(%x+)"), 16)
    f:close()
    local why = "fs.nr_open"
    local _, hard = require("tenement.core").proc.rlimit("nofile")
    if caps & (1 << 24) == 0 and math.type(hard) == "integer" and hard < most then
      most, why = hard, "the hard limit ten serve runs under, which it lacks CAP_SYS_RESOURCE to raise"
      print("\n  no CAP_SYS_RESOURCE here: the bound is the hard limit, " .. hard)
    end
    local cfg = parse_ok(('[service.a]\ncommand = "/bin/sh"\nnofile = %d\n[service.b]\ncommand = "/bin/sh"\n'
      .. "nofile = %d\n"):format(most + 1, most))
    assert.same({ ("tenement.toml:3: service.a.nofile = %d is more than this server can give (%s, %d): every start "
      .. "would fail; set at most %d"):format(most + 1, why, most, most) }, cfg.warnings)
  end)

  it("refuses a router hook that does not compile, with the file's own line", function()
    local path = os.tmpname()
    local f = assert(io.open(path, "w"))
    f:write("-- a hook\nreturn { route = function( }\n")
    f:close()
    local errs = parse_errors('[service.a]\ncommand = "x"\n[hooks]\nrouter = "' .. path .. '"\n')
    os.remove(path)
    assert.same({ "tenement.toml:4:10: hooks.router: the file does not compile: " .. path
      .. ":2: <name> or '...' expected near '}'" }, errs)
    -- one that compiles loads (what it does is the front door's to judge)
    path = os.tmpname()
    f = assert(io.open(path, "w"))
    f:write("return { route = function(req, view, default) return default() end }\n")
    f:close()
    assert.are.equal(path, parse_ok('[service.a]\ncommand = "x"\n[hooks]\nrouter = "' .. path .. '"\n').hooks.router)
    os.remove(path)
  end)

  -- ten config passed these, and ten serve then refused them
  it("refuses a router hook that compiles but does not load, as the server would", function()
    local dir = support.tmpdir()
    finally(support.cleanup)
    local function errors_of(path)
      return parse_errors('[service.a]\ncommand = "x"\n[hooks]\nrouter = "' .. path .. '"\n')
    end
    local function hook(text) return support.write(dir .. "/h" .. #text .. ".lua", text) end
    assert.same({ "tenement.toml:4:10: hooks.router: cannot read " .. dir
      .. "/missing.lua: No such file or directory" }, errors_of(dir .. "/missing.lua"))
    assert.same({ "tenement.toml:4:10: hooks.router: cannot read " .. dir .. ": Is a directory" }, errors_of(dir))
    local path = hook("return 42")
    assert.same({ "tenement.toml:4:10: hooks.router: " .. path .. ' must return a function, or a table with a '
      .. 'function "route"; it returned a number' }, errors_of(path))
    path = hook("local x = nil\nreturn { route = x.y }")
    assert.same({ "tenement.toml:4:10: hooks.router: loading " .. path .. " failed: " .. path
      .. ":2: attempt to index a nil value (local 'x')" }, errors_of(path))
    path = hook("local n = 0\nwhile true do n = n + 1 end")
    assert.same({ "tenement.toml:4:10: hooks.router: loading " .. path .. " failed: hook exceeded its budget of "
      .. "1000000 instructions (at " .. path .. ":2)" }, errors_of(path))
  end)

  it("points at the value inside an inline table", function()
    assert.same({
      'tenement.toml:2:34: service.api.restart = "no": expected one of always, on-failure, never',
    }, parse_errors('[service]\napi = { command = "x", restart = "no" }\n'))
  end)

  it("counts columns in characters, as toml does", function()
    local LABEL = 'not a valid DNS label: a DNS label is 1-63 letters, digits and "-", not starting'
      .. ' or ending with "-"'
    assert.same({
      'tenement.toml:4:1: routing.subdomain."\u{e9}t\u{e9}": ' .. LABEL,
      'tenement.toml:4:9: routing.subdomain."\u{e9}t\u{e9}" = 5: expected a string, got an'
        .. ' integer (quote it: "5")',
    }, parse_errors('[service.api]\ncommand = "x"\n[routing.subdomain]\n"\u{e9}t\u{e9}" = 5\n'))
  end)

  it("points at the value on the first line of a file that starts with a byte order mark", function()
    assert.same({ "tenement.toml:1:17: settings.port = 0: out of range: expected an integer"
      .. " from 1 to 65535" }, parse_errors("\239\187\191settings.port = 0\n"))
  end)

  it("checks a plain table too, without positions", function()
    local cfg, err = config.check({ settings = { port = 0 } }, "x.toml", {})
    assert.is_nil(cfg)
    assert.equal("x.toml: settings.port = 0: out of range: expected an integer from 1 to 65535", err)
  end)
end)
