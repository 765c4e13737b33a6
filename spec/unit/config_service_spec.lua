-- tenement.config: [service.NAME] / [process.NAME], field by field, names, the legacy
-- aliases and their conflicts, and [service.NAME.env].

local config = require("tenement.config")

local function lines(s)
  local out = {}
  for l in (s .. "\n"):gmatch("(.-)\n") do out[#out + 1] = l end
  return out
end

-- A service "api" with the given extra lines; line 2 is `command`, extras start at line 3.
local function api(body, env)
  local text = '[service.api]\ncommand = "./api"\n' .. (body or "") .. "\n"
  local cfg, err = config.parse(text, "tenement.toml", env or {})
  assert(cfg, err)
  return cfg.services.api
end

local function api_errors(body, env)
  local text = '[service.api]\ncommand = "./api"\n' .. (body or "") .. "\n"
  local cfg, err = config.parse(text, "tenement.toml", env or {})
  assert.is_nil(cfg)
  return lines(err)
end

local function errors(text, env)
  local cfg, err = config.parse(text, "tenement.toml", env or {})
  assert.is_nil(cfg)
  return lines(err)
end

describe("[service.NAME] filesystem and mounts", function()
  it("builds a private file system for namespace isolation, with the mounts it names", function()
    local svc = api('filesystem = "private"\nmounts = ["/srv/app", "/var/cache/api:rw", "/opt/x:ro"]')
    assert.equal("private", svc.filesystem)
    assert.same({ "/srv/app", "/var/cache/api:rw", "/opt/x:ro" }, svc.mounts)
    assert.equal("host", api().filesystem)
    assert.same({}, api().mounts)
  end)

  it("refuses a private file system the isolation level would not build, and mounts it would not use", function()
    assert.same({
      'tenement.toml:4:14: service.api.filesystem = "private": a private file system is built for isolation = '
        .. '"namespace" only (this service has "process"): set it, or leave filesystem out',
    }, api_errors('isolation = "process"\nfilesystem = "private"'))
    assert.same({
      'tenement.toml:3:10: service.api.mounts = "/srv/app": mounts adds paths to a private file system: '
        .. 'set filesystem = "private" (the host file system has them all already)',
    }, api_errors('mounts = ["/srv/app"]'))
    assert.same({
      'tenement.toml:4:11: service.api.mounts[1] = "srv/app": must be an absolute path, with ":rw" after it to make '
        .. 'it writable ("/srv/app", "/srv/cache:rw")',
      'tenement.toml:4:22: service.api.mounts[2] = "/a:b:rw": after the path only ":ro" or ":rw" may come',
    }, api_errors('filesystem = "private"\nmounts = ["srv/app", "/a:b:rw"]'))
    assert.same({
      'tenement.toml:3:14: service.api.filesystem = "walled": expected one of host, private',
    }, api_errors('filesystem = "walled"'))
    -- a misspelt filesystem is one error, not also one of its mounts
    assert.same({
      'tenement.toml:3:14: service.api.filesystem = "privat": expected one of host, private; did you mean "private"?',
    }, api_errors('filesystem = "privat"\nmounts = ["/srv/app"]'))
  end)

  it("takes each mounts path in its plain form, once, and never the root", function()
    assert.same({
      'tenement.toml:4:11: service.api.mounts[1] = "/": the whole host file system is what a private one keeps out',
      'tenement.toml:4:16: service.api.mounts[2] = "/srv/app/../../root": write the path plainly: no //, no '
        .. "trailing /, no . or .. parts",
      'tenement.toml:4:39: service.api.mounts[3] = "/srv/": write the path plainly: no //, no trailing /, no . or .. '
        .. "parts",
      'tenement.toml:4:48: service.api.mounts[4] = "/a//b:rw": write the path plainly: no //, no trailing /, no . '
        .. "or .. parts",
    }, api_errors('filesystem = "private"\nmounts = ["/", "/srv/app/../../root", "/srv/", "/a//b:rw"]'))
    assert.same({
      'tenement.toml:4:26: service.api.mounts[2] = "/srv/app": /srv/app is in mounts already (as "/srv/app:rw"): '
        .. "name each path once",
    }, api_errors('filesystem = "private"\nmounts = ["/srv/app:rw", "/srv/app"]'))
  end)
end)

describe("[service.NAME] network", function()
  it("refuses an isolated network that the isolation level would not give", function()
    assert.same({
      'tenement.toml:4:11: service.api.network = "isolated": process isolation shares the'
        .. ' host\'s network, so the app would not be isolated: use isolation = "namespace"'
        .. ' (or "sandbox", which has no network at all)',
    }, api_errors('isolation = "process"\nnetwork = "isolated"'))
    assert.equal("isolated", api('network = "isolated"').network)
    assert.equal("isolated", api('isolation = "sandbox"\nnetwork = "isolated"').network)
  end)
end)

describe("[service.NAME] defaults", function()
  it("fills every optional field", function()
    assert.same({
      name = "api",
      section = "service",
      line = 1,
      command = "./api",
      args = {},
      socket = "/tmp/tenement/{name}-{id}.sock",
      startup_timeout = 10,
      idle_timeout = 0,
      restart = "on-failure",
      isolation = "namespace",
      storage_persist = false,
      on_demand = false,
      network = "host",
      filesystem = "host",
      mounts = {},
      env = {},
    }, api(""))
  end)

  it("leaves workdir, health and the limits unset", function()
    local s = api("")
    assert.is_nil(s.workdir)
    assert.is_nil(s.health)
    assert.is_nil(s.memory_limit_mb)
    assert.is_nil(s.cpu_shares)
    assert.is_nil(s.storage_quota_mb)
  end)
end)

describe("[service.NAME] command", function()
  it("is required, reported at the section header", function()
    assert.same({
      "tenement.toml:1:1: service.api.command: missing: command is required"
        .. " (command that starts the service)",
    }, errors('[service.api]\nhealth = "/health"\n'))
  end)

  it("must not be empty or blank", function()
    assert.same({ 'tenement.toml:2:11: service.api.command = "": must not be empty' },
      errors('[service.api]\ncommand = ""\n'))
    assert.same({ 'tenement.toml:2:11: service.api.command = "  ": must not be empty' },
      errors('[service.api]\ncommand = "  "\n'))
  end)

  it("must be a string", function()
    assert.same({
      'tenement.toml:2:11: service.api.command = ["./api"]: expected a string, got an array',
    }, errors('[service.api]\ncommand = ["./api"]\n'))
  end)

  it("keeps its template unexpanded", function()
    local cfg = assert(config.parse('[service.api]\ncommand = "{data_dir}/bin/api --id {id}"\n',
      "tenement.toml", {}))
    assert.equal("{data_dir}/bin/api --id {id}", cfg.services.api.command)
  end)
end)

describe("[service.NAME] args", function()
  it("accepts an array of strings, in order", function()
    assert.same({ "--port", "8000", "{id}" }, api('args = ["--port", "8000", "{id}"]').args)
  end)

  it("accepts an empty array", function()
    assert.same({}, api("args = []").args)
  end)

  it("names each item that is not a string", function()
    assert.same({
      'tenement.toml:3:19: service.api.args[2] = 8000: expected a string, got an integer'
        .. ' (quote it: "8000")',
      'tenement.toml:3:25: service.api.args[3] = true: expected a string, got a boolean'
        .. ' (quote it: "true")',
    }, api_errors('args = ["--port", 8000, true]'))
  end)

  it("rejects a string where an array is expected", function()
    assert.same({
      'tenement.toml:3:8: service.api.args = "--port 8000": expected an array of strings,'
        .. " got a string",
    }, api_errors('args = "--port 8000"'))
  end)
end)

describe("[service.NAME] workdir", function()
  it("accepts a path or a template", function()
    assert.equal("/app", api('workdir = "/app"').workdir)
    assert.equal("{instance_dir}/src", api('workdir = "{instance_dir}/src"').workdir)
  end)

  it("rejects an empty string and a non-string", function()
    assert.same({ 'tenement.toml:3:11: service.api.workdir = "": must not be empty' },
      api_errors('workdir = ""'))
    assert.same({ "tenement.toml:3:11: service.api.workdir = false: expected a string,"
      .. ' got a boolean (quote it: "false")' }, api_errors("workdir = false"))
  end)
end)

describe("[service.NAME] socket", function()
  it("accepts a template", function()
    assert.equal("/run/app/{name}/{id}.sock", api('socket = "/run/app/{name}/{id}.sock"').socket)
  end)

  it("rejects an empty string", function()
    assert.same({ 'tenement.toml:3:10: service.api.socket = "": must not be empty' },
      api_errors('socket = ""'))
  end)
end)

describe("[service.NAME] health", function()
  it("accepts a path starting with /", function()
    assert.equal("/health", api('health = "/health"').health)
    assert.equal("/", api('health = "/"').health)
  end)

  it("says which character of a path starting with / is not visible ASCII", function()
    assert.same({ 'tenement.toml:3:10: service.api.health = "/he alth": an HTTP path holds only visible ASCII (" " at '
      .. "byte 4 is not): escape the rest as %XX, like %20 for a space" }, api_errors('health = "/he alth"'))
    assert.same({ 'tenement.toml:3:10: service.api.health = "/héalth": an HTTP path holds only visible ASCII ("é" at '
      .. "byte 3 is not): escape the rest as %XX, like %20 for a space" }, api_errors('health = "/héalth"'))
  end)

  for _, bad in ipairs({ "health", "http://x/health", "" }) do
    it(("rejects %q"):format(bad), function()
      assert.same({
        ('tenement.toml:3:10: service.api.health = "%s": expected an HTTP path starting with'
          .. ' "/", like "/health"'):format(bad),
      }, api_errors(('health = "%s"'):format(bad)))
    end)
  end
end)

describe("[service.NAME] integer fields", function()
  local INTS = {
    { "startup_timeout", 30, min = 1 },
    { "idle_timeout", 300, min = 0 },
    { "memory_limit_mb", 256, min = 1 },
    { "storage_quota_mb", 100, min = 1 },
  }
  for _, f in ipairs(INTS) do
    local name, valid = f[1], f[2]
    local col = #name + 4 -- errors point at the value of `name = value`
    describe(name, function()
      it("accepts " .. valid .. " and the minimum " .. f.min, function()
        assert.equal(valid, api(("%s = %d"):format(name, valid))[name])
        assert.equal(f.min, api(("%s = %d"):format(name, f.min))[name])
      end)

      it("rejects " .. (f.min - 1), function()
        assert.same({
          ("tenement.toml:3:%d: service.api.%s = %d: out of range: expected an integer >= %d")
            :format(col, name, f.min - 1, f.min),
        }, api_errors(("%s = %d"):format(name, f.min - 1)))
      end)

      it("rejects a string and a float", function()
        assert.same({
          ('tenement.toml:3:%d: service.api.%s = "5": expected an integer, got a string (write 5, without quotes)')
            :format(col, name),
        }, api_errors(('%s = "5"'):format(name)))
        assert.same({
          ("tenement.toml:3:%d: service.api.%s = 1.5: expected an integer, got a float")
            :format(col, name),
        }, api_errors(("%s = 1.5"):format(name)))
      end)
    end)
  end

  it("idle_timeout 0 means never", function()
    assert.equal(0, api("idle_timeout = 0").idle_timeout)
  end)
end)

describe("[service.NAME] cpu_shares", function()
  it("accepts values in 1-10000", function()
    assert.equal(100, api("cpu_shares = 100").cpu_shares)
  end)

  it("keeps values outside 1-10000 for the spawn path to clamp", function()
    assert.equal(0, api("cpu_shares = 0").cpu_shares)
    assert.equal(20000, api("cpu_shares = 20000").cpu_shares)
    assert.equal(-5, api("cpu_shares = -5").cpu_shares)
  end)

  it("rejects a non-integer", function()
    assert.same({
      'tenement.toml:3:14: service.api.cpu_shares = "100": expected an integer, got a string (write 100, without quotes)',
    }, api_errors('cpu_shares = "100"'))
  end)
end)

describe("[service.NAME] restart", function()
  for _, v in ipairs({ "always", "on-failure", "never" }) do
    it("accepts " .. v, function()
      assert.equal(v, api(('restart = "%s"'):format(v)).restart)
    end)
  end

  it("rejects anything else, naming the allowed values", function()
    assert.same({
      'tenement.toml:3:11: service.api.restart = "sometimes": expected one of always,'
        .. " on-failure, never",
    }, api_errors('restart = "sometimes"'))
  end)

  it("suggests the nearest value for a typo", function()
    assert.same({
      'tenement.toml:3:11: service.api.restart = "on_failure": expected one of always,'
        .. ' on-failure, never; did you mean "on-failure"?',
    }, api_errors('restart = "on_failure"'))
  end)

  it("rejects a non-string", function()
    assert.same({
      "tenement.toml:3:11: service.api.restart = true: expected a string, got a boolean"
        .. ' (quote it: "true")',
    }, api_errors("restart = true"))
  end)
end)

describe("[service.NAME] isolation and its alias runtime", function()
  for _, v in ipairs({ "process", "namespace", "sandbox", "firecracker", "qemu", "wasm" }) do
    it("accepts " .. v .. " as isolation and as runtime", function()
      assert.equal(v, api(('isolation = "%s"'):format(v)).isolation)
      local s = api(('runtime = "%s"'):format(v))
      assert.equal(v, s.isolation)
      assert.is_nil(s.runtime)
    end)
  end

  it("rejects an unknown level", function()
    assert.same({
      'tenement.toml:3:13: service.api.isolation = "vm": expected one of process, namespace,'
        .. " sandbox, firecracker, qemu, wasm",
    }, api_errors('isolation = "vm"'))
  end)

  it("reports a bad runtime under its own name", function()
    assert.same({
      'tenement.toml:3:11: service.api.runtime = "docker": expected one of process, namespace,'
        .. " sandbox, firecracker, qemu, wasm",
    }, api_errors('runtime = "docker"'))
  end)

  it("rejects both set, even to the same value", function()
    assert.same({
      'tenement.toml:4:1: service.api.runtime = "process": runtime is a legacy name for'
        .. " isolation, and isolation is also set (line 3); keep only isolation",
    }, api_errors('isolation = "process"\nruntime = "process"'))
  end)
end)

describe("[service.NAME] storage_persist", function()
  it("accepts true", function()
    assert.is_true(api("storage_persist = true").storage_persist)
  end)

  it("rejects a string", function()
    assert.same({
      'tenement.toml:3:19: service.api.storage_persist = "true": expected a boolean, got a string',
    }, api_errors('storage_persist = "true"'))
  end)
end)

describe("[service.NAME] unknown keys", function()
  it("suggests the nearest field", function()
    assert.same({
      'tenement.toml:3:1: service.api.comand = "x": unknown key; did you mean "command"?',
      'tenement.toml:4:1: service.api.helth = "/h": unknown key; did you mean "health"?',
      "tenement.toml:5:1: service.api.memory_limit = 5: unknown key;"
        .. ' did you mean "memory_limit_mb"?',
    }, api_errors('comand = "x"\nhelth = "/h"\nmemory_limit = 5'))
  end)

  it("rejects an unknown sub-table", function()
    assert.same({
      "tenement.toml:3:14: service.api.limits: unknown key; known keys in [service.api]: command,"
        .. " args, workdir, socket, health, startup_timeout, idle_timeout, restart, isolation, network,"
        .. " filesystem, mounts, user, nofile, nproc, memory_limit_mb, cpu_shares, pids_limit, storage_quota_mb, on_demand,"
        .. " max_instances, storage_persist, env",
    }, api_errors("[service.api.limits]\nmemory = 5"))
  end)
end)

describe("service names", function()
  it("accepts names of a-z, 0-9 and -", function()
    local cfg = assert(config.parse('[service.web-2]\ncommand = "x"\n[service.0day]\ncommand = "y"\n',
      "tenement.toml", {}))
    assert.same({ "0day", "web-2" }, cfg.service_names)
    assert.equal("web-2", cfg.services["web-2"].name)
  end)

  local RULE = 'names use 1-63 characters from a-z, 0-9 and "-", starting with a letter or digit,'
    .. " because they become socket paths, directories and DNS labels"

  it("rejects uppercase, explaining the rule and why", function()
    assert.same({
      'tenement.toml:1:10: service.Api: not a valid name: uppercase "A" is not allowed; ' .. RULE,
    }, errors('[service.Api]\ncommand = "x"\n'))
  end)

  it("rejects dots and underscores", function()
    assert.same({
      'tenement.toml:1:10: service."a.b": not a valid name: "." is not allowed; ' .. RULE,
      'tenement.toml:3:10: service.a_b: not a valid name: "_" is not allowed; ' .. RULE,
    }, errors('[service."a.b"]\ncommand = "x"\n[service.a_b]\ncommand = "y"\n'))
  end)

  it("rejects 64 characters", function()
    local name = ("a"):rep(64)
    assert.same({
      ("tenement.toml:1:10: service.%s: not a valid name: it is 64 characters long; "):format(name)
        .. RULE,
    }, errors(("[service.%s]\ncommand = \"x\"\n"):format(name)))
  end)

  it("rejects a service that is not a table", function()
    assert.same({
      'tenement.toml:2:7: service.api = "./api": expected a table ([service.api]), got a string',
    }, errors('[service]\napi = "./api"\n'))
  end)
end)

describe("[process.NAME], the legacy name of [service.NAME]", function()
  it("defines a service", function()
    local cfg = assert(config.parse('[process.api]\ncommand = "./api"\n', "tenement.toml", {}))
    assert.equal("./api", cfg.services.api.command)
    assert.equal("process", cfg.services.api.section)
    assert.equal("on-failure", cfg.services.api.restart)
  end)

  it("mixes with [service.NAME] under other names", function()
    local cfg = assert(config.parse('[process.a]\ncommand = "a"\n[service.b]\ncommand = "b"\n',
      "tenement.toml", {}))
    assert.same({ "a", "b" }, cfg.service_names)
  end)

  it("rejects the same name in both, naming both lines", function()
    assert.same({
      'tenement.toml:4:10: process.api: service "api" is defined twice, as [service.api] (line 1)'
        .. " and [process.api] (line 4); [process.NAME] is the legacy name of [service.NAME]:"
        .. " keep one",
    }, errors('[service.api]\ncommand = "a"\n\n[process.api]\ncommand = "b"\n'))
  end)

  it("checks its fields like [service.NAME]", function()
    assert.same({
      'tenement.toml:2:11: process.api.restart = "no": expected one of always, on-failure, never',
    }, errors('[process.api]\nrestart = "no"\ncommand = "x"\n'))
  end)
end)

describe("[service.NAME.env]", function()
  it("accepts string values, templates kept", function()
    assert.same({ LOG_LEVEL = "info", DB = "{data_dir}/{id}/app.db", _X1 = "" },
      api('[service.api.env]\nLOG_LEVEL = "info"\nDB = "{data_dir}/{id}/app.db"\n_X1 = ""').env)
  end)

  it("rejects keys that are not environment variable names", function()
    local why = 'not a valid environment variable name: use letters, digits and "_",'
      .. " not starting with a digit"
    assert.same({
      "tenement.toml:4:1: service.api.env.MY-VAR: " .. why,
      "tenement.toml:5:1: service.api.env.1ST: " .. why,
      'tenement.toml:6:1: service.api.env."A.B": ' .. why,
    }, api_errors('[service.api.env]\nMY-VAR = "x"\n1ST = "y"\n"A.B" = "z"'))
  end)

  it("rejects non-string values, suggesting quotes", function()
    assert.same({
      'tenement.toml:4:9: service.api.env.PORT2 = 8000: expected a string, got an integer'
        .. ' (quote it: "8000")',
      'tenement.toml:5:9: service.api.env.DEBUG = true: expected a string, got a boolean'
        .. ' (quote it: "true")',
      'tenement.toml:6:8: service.api.env.LIST = ["a"]: expected a string, got an array',
    }, api_errors('[service.api.env]\nPORT2 = 8000\nDEBUG = true\nLIST = ["a"]'))
  end)

  it("rejects env that is not a table", function()
    assert.same({
      'tenement.toml:3:7: service.api.env = "A=1": expected a table, got a string',
    }, api_errors('env = "A=1"'))
  end)
end)
