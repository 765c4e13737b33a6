-- tenement.config: [settings] and [settings.tls], field by field: the default, a valid
-- value, and each kind of invalid value with its exact message and position.

local config = require("tenement.config")

local function lines(s)
  local out = {}
  for l in (s .. "\n"):gmatch("(.-)\n") do out[#out + 1] = l end
  return out
end

local function settings(body, env)
  local cfg, err = config.parse("[settings]\n" .. body .. "\n", "tenement.toml", env or {})
  assert(cfg, err)
  return cfg.settings
end

-- The errors of a [settings] body; its first line is line 2 of the file.
local function errors(body, env)
  local cfg, err = config.parse("[settings]\n" .. body .. "\n", "tenement.toml", env or {})
  assert.is_nil(cfg)
  return lines(err)
end

local function tls(body, env)
  local cfg, err = config.parse("[settings.tls]\n" .. body .. "\n", "tenement.toml", env or {})
  assert(cfg, err)
  return cfg.settings.tls
end

local function tls_errors(body, env)
  local cfg, err = config.parse("[settings.tls]\n" .. body .. "\n", "tenement.toml", env or {})
  assert.is_nil(cfg)
  return lines(err)
end

-- Integer fields: default, a valid value, the type errors and the range errors.
local INTEGERS = {
  { "health_check_interval", 10, 30, min = 1 },
  { "max_restarts", 3, 0, min = 0 },
  { "restart_window", 300, 60, min = 1 },
  { "backoff_base_ms", 1000, 500, min = 1 },
  { "backoff_max_ms", 60000, 120000, min = 1 },
  { "stop_timeout", 10, 0, min = 0 },
  { "port", 8080, 443, min = 1, max = 65535 },
}

describe("durations and sizes too large to convert", function()
  -- The server works in milliseconds and bytes: stop_timeout * 1000 and
  -- max_body_mb * 1024 * 1024 wrapped around (stop_timeout = 9999999999999999
  -- gave a deadline in the past: SIGKILL at once, no grace at all).
  local SECONDS = { "health_check_interval", "restart_window", "stop_timeout", "header_timeout",
    "keepalive_timeout", "drain_timeout", "proxy_timeout" }
  it("refuses them where the unit is converted, and accepts the largest allowed", function()
    for _, name in ipairs(SECONDS) do
      assert.same({ ("tenement.toml:2:%d: settings.%s = 9999999999999999: out of range: expected"
        .. " an integer <= 1000000000000 (it is converted to milliseconds, which must fit in 64"
        .. " bits)"):format(#name + 4, name) }, errors(name .. " = 9999999999999999"))
      assert.equal(1000000000000, settings(name .. " = 1000000000000")[name])
    end
    assert.same({ "tenement.toml:2:15: settings.max_body_mb = 17592186044416: out of range: expected"
      .. " an integer <= 1000000000000 (it is converted to bytes, which must fit in 64 bits)" },
      errors("max_body_mb = 17592186044416"))
    assert.same({ "tenement.toml:2:22: settings.log_retention_days = 106751991167301: out of range:"
      .. " expected an integer <= 1000000000 (it is converted to milliseconds, which must fit in 64"
      .. " bits)" }, errors("log_retention_days = 106751991167301"))
    for _, name in ipairs { "startup_timeout", "idle_timeout", "memory_limit_mb", "storage_quota_mb" } do
      local _, err = config.parse('[service.api]\ncommand = "x"\n' .. name .. " = 9999999999999999\n",
        "tenement.toml", {})
      assert.matches("service.api." .. name .. " = 9999999999999999: out of range: expected an integer <= ", err, 1, true)
    end
  end)
end)

describe("[settings] integer fields", function()
  for _, f in ipairs(INTEGERS) do
    local name, default, valid = f[1], f[2], f[3]
    local range = f.max and ("expected an integer from %d to %d"):format(f.min, f.max)
      or ("expected an integer >= %d"):format(f.min)

    describe(name, function()
      it("defaults to " .. default, function()
        assert.equal(default, settings("")[name])
      end)

      it("accepts " .. valid, function()
        assert.equal(valid, settings(("%s = %d"):format(name, valid))[name])
      end)

      -- errors point at the value: `name = value` puts it at column #name + 4
      local col = #name + 4

      it("rejects a string", function()
        assert.same({
          ('tenement.toml:2:%d: settings.%s = "10": expected an integer, got a string (write 10, without quotes)')
            :format(col, name),
        }, errors(('%s = "10"'):format(name)))
      end)

      it("rejects a float", function()
        assert.same({
          ("tenement.toml:2:%d: settings.%s = 10.0: expected an integer, got a float")
            :format(col, name),
        }, errors(("%s = 10.0"):format(name)))
      end)

      it("rejects a boolean", function()
        assert.same({
          ("tenement.toml:2:%d: settings.%s = true: expected an integer, got a boolean")
            :format(col, name),
        }, errors(("%s = true"):format(name)))
      end)

      it("rejects " .. (f.min - 1) .. ", below the range", function()
        assert.same({
          ("tenement.toml:2:%d: settings.%s = %d: out of range: %s")
            :format(col, name, f.min - 1, range),
        }, errors(("%s = %d"):format(name, f.min - 1)))
      end)

      it("accepts the minimum " .. f.min, function()
        local body = ("%s = %d"):format(name, f.min)
        if name == "backoff_max_ms" then body = body .. "\nbackoff_base_ms = 1" end
        assert.equal(f.min, settings(body)[name])
      end)

      if f.max then
        it("rejects " .. (f.max + 1) .. ", above the range, and accepts " .. f.max, function()
          assert.same({
            ("tenement.toml:2:%d: settings.%s = %d: out of range: %s")
              :format(col, name, f.max + 1, range),
          }, errors(("%s = %d"):format(name, f.max + 1)))
          assert.equal(f.max, settings(("%s = %d"):format(name, f.max))[name])
        end)
      end
    end)
  end
end)

describe("[settings] backoff_max_ms >= backoff_base_ms", function()
  it("accepts equal values", function()
    local s = settings("backoff_base_ms = 5000\nbackoff_max_ms = 5000")
    assert.equal(5000, s.backoff_base_ms)
    assert.equal(5000, s.backoff_max_ms)
  end)

  it("rejects a max below the base, at the max", function()
    assert.same({
      "tenement.toml:3:18: settings.backoff_max_ms = 1999: out of range:"
        .. " expected an integer >= backoff_base_ms (2000)",
    }, errors("backoff_base_ms = 2000\nbackoff_max_ms = 1999"))
  end)

  it("rejects a base above the default max, at the base", function()
    assert.same({
      "tenement.toml:2:19: settings.backoff_base_ms = 60001: out of range:"
        .. " expected an integer <= backoff_max_ms (60000, its default); raise backoff_max_ms too",
    }, errors("backoff_base_ms = 60001"))
  end)

  it("does not compare when one of them is already wrong", function()
    assert.same({
      'tenement.toml:3:18: settings.backoff_max_ms = "1": expected an integer, got a string (write 1, without quotes)',
    }, errors('backoff_base_ms = 2000\nbackoff_max_ms = "1"'))
  end)
end)

describe("[settings] data_dir", function()
  it("defaults to /var/lib/tenement", function()
    assert.equal("/var/lib/tenement", settings("").data_dir)
  end)

  it("accepts an absolute path, normalized", function()
    assert.equal("/srv/ten", settings('data_dir = "/srv//ten/"').data_dir)
  end)

  it("resolves a relative path against the config file's directory", function()
    local cfg = assert(config.parse('[settings]\ndata_dir = "data"\n',
      "/etc/tenement/tenement.toml", {}))
    assert.equal("/etc/tenement/data", cfg.settings.data_dir)
    cfg = assert(config.parse('[settings]\ndata_dir = "../data"\n',
      "/etc/tenement/tenement.toml", {}))
    assert.equal("/etc/data", cfg.settings.data_dir)
  end)

  it("expands ${VAR} from the host environment at load time", function()
    assert.equal("/home/ann/.tenement",
      settings('data_dir = "${HOME}/.tenement"', { HOME = "/home/ann" }).data_dir)
  end)

  it("rejects an unset ${VAR}", function()
    assert.same({
      'tenement.toml:2:12: settings.data_dir = "${STATE}/ten": STATE is not set in the'
        .. " environment of ten serve",
    }, errors('data_dir = "${STATE}/ten"'))
  end)

  it("rejects per-instance placeholders", function()
    assert.same({
      'tenement.toml:2:12: settings.data_dir = "/srv/{id}": {id} cannot be used in'
        .. " settings.data_dir (data_dir is global, not per instance); allowed here: ${VAR}",
    }, errors('data_dir = "/srv/{id}"'))
  end)

  it("rejects a leading ~, which no shell expands here, in every path", function()
    local fix = '"~" is not expanded here (no shell reads this file): write ${HOME} instead'
    assert.same({ 'tenement.toml:2:12: settings.data_dir = "~/tenement": ' .. fix },
      errors('data_dir = "~/tenement"'))
    local _, err = config.parse('[settings.tls]\ncache_dir = "~/acme"\n[hooks]\nrouter = "~/r.lua"\n'
      .. '[service.api]\ncommand = "x"\nworkdir = "~"\n', "tenement.toml", {})
    assert.same({
      'tenement.toml:2:13: settings.tls.cache_dir = "~/acme": ' .. fix,
      'tenement.toml:4:10: hooks.router = "~/r.lua": ' .. fix,
      'tenement.toml:7:11: service.api.workdir = "~": ' .. fix,
    }, lines(err))
    assert.equal("/etc/t/a~b", assert(config.parse('[settings]\ndata_dir = "a~b"\n', "/etc/t/t.toml", {}))
      .settings.data_dir)
  end)

  it("rejects an empty string and a non-string", function()
    assert.same({ 'tenement.toml:2:12: settings.data_dir = "": must not be empty' },
      errors('data_dir = ""'))
    assert.same({ "tenement.toml:2:12: settings.data_dir = 5: expected a string, got an integer"
      .. ' (quote it: "5")' }, errors("data_dir = 5"))
  end)
end)

describe("[settings] listen", function()
  it("defaults to 127.0.0.1", function()
    assert.equal("127.0.0.1", settings("").listen)
  end)

  for _, addr in ipairs({ "0.0.0.0", "10.1.2.3", "::", "::1", "fe80::1:2", "2001:db8:0:0:0:0:0:1",
    "::ffff:192.0.2.1" }) do
    it("accepts " .. addr, function()
      assert.equal(addr, settings(('listen = "%s"'):format(addr)).listen)
    end)
  end

  for _, addr in ipairs({ "localhost", "256.0.0.1", "1.2.3", "01.2.3.4", "1::2::3", ":::",
    "1:2:3:4:5:6:7:8:9", "1:2:3:4::5:6:7:8", "1:2:3:4:5:6:7", "fe80::1::", "12345::1", "[::1]", "" }) do
    it(("rejects %q"):format(addr), function()
      assert.same({
        ('tenement.toml:2:10: settings.listen = "%s": expected an IP address to listen on,'
          .. " like 127.0.0.1, 0.0.0.0, ::1 or ::"):format(addr),
      }, errors(('listen = "%s"'):format(addr)))
    end)
  end

  for addr, fix in pairs({ ["127.0.0.1:8080"] = '"127.0.0.1" and port = 8080', [":9000"] = '"0.0.0.0" and port = 9000',
    ["localhost:80"] = '"127.0.0.1" and port = 80', ["[::1]:8443"] = '"::1" and port = 8443' }) do
    it(("shows where the port of %q goes"):format(addr), function()
      assert.same({ ('tenement.toml:2:10: settings.listen = "%s": the port goes in a key of its own: listen = %s')
        :format(addr, fix) }, errors(('listen = "%s"'):format(addr)))
    end)
  end

  it("rejects a non-string", function()
    assert.same({ "tenement.toml:2:10: settings.listen = 127: expected a string, got an integer"
      .. ' (quote it: "127")' }, errors("listen = 127"))
  end)
end)

describe("[settings] domain", function()
  it("defaults to localhost", function()
    assert.equal("localhost", settings("").domain)
  end)

  it("accepts a DNS name and lowercases it", function()
    assert.equal("example.com", settings('domain = "example.com"').domain)
    assert.equal("apps.example.co.uk", settings('domain = "Apps.Example.CO.uk"').domain)
    assert.equal("x-1.example", settings('domain = "x-1.example"').domain)
  end)

  local RULE = 'a DNS label is 1-63 letters, digits and "-", not starting or ending with "-"'
  local cases = {
    { "example..com", '""' },
    { ".example.com", '""' },
    { "example.com.", '""' },
    { "-x.example.com", '"-x"' },
    { "x-.example.com", '"x-"' },
    { "ex_ample.com", '"ex_ample"' },
    { "exa mple.com", '"exa mple"' },
    { "http://example.com", '"http://example"' },
  }
  for _, c in ipairs(cases) do
    it(("rejects %q"):format(c[1]), function()
      assert.same({
        ('tenement.toml:2:10: settings.domain = "%s": expected a DNS name like "example.com":'
          .. " label %s is not valid (%s)"):format(c[1], c[2], RULE),
      }, errors(('domain = "%s"'):format(c[1])))
    end)
  end

  it("rejects a label of 64 characters", function()
    local label = ("a"):rep(64)
    local errs = errors(('domain = "%s.com"'):format(label))
    assert.equal(1, #errs)
    assert.equal('tenement.toml:2:10: settings.domain = "' .. ("a"):rep(55) .. '...": expected'
      .. ' a DNS name like "example.com": label "' .. label .. '" is not valid (' .. RULE .. ")",
      errs[1])
  end)

  it("rejects an empty name and one longer than 253 characters", function()
    assert.same({ 'tenement.toml:2:10: settings.domain = "": expected a DNS name like'
      .. ' "example.com", got an empty string' }, errors('domain = ""'))
    local long = (("a"):rep(63) .. "."):rep(4) .. "com" -- 259 characters
    local errs = errors(('domain = "%s"'):format(long))
    assert.equal(1, #errs)
    assert.matches(": a DNS name is at most 253 characters, this one is 259$", errs[1])
  end)
end)

describe("[settings] unknown keys", function()
  it("suggests the nearest known key", function()
    assert.same({
      'tenement.toml:2:1: settings.health_check_intervall = 10: unknown key;'
        .. ' did you mean "health_check_interval"?',
      'tenement.toml:3:1: settings.maxrestarts = 3: unknown key; did you mean "max_restarts"?',
      'tenement.toml:4:1: settings.Port = 80: unknown key; did you mean "port"?',
    }, errors("health_check_intervall = 10\nmaxrestarts = 3\nPort = 80"))
  end)

  -- each said what was wrong and not what to write
  it("says how to write a number with a unit, a bare word, and a section put inside [settings]", function()
    assert.same({ 'tenement.toml:2:18: settings.header_timeout = "10s": expected an integer, got a string (write 10, '
      .. "without quotes, in the key's own unit)" }, errors('header_timeout = "10s"'))
    assert.same({ "tenement.toml:2:10: invalid value 'always' (a string needs quotes: \"always\")" },
      errors("domain = always"))
    assert.same({ "tenement.toml:2:1: settings.hooks: unknown key; [hooks] is a section of its own, at the top of "
      .. "the file, not in [settings]" }, errors('hooks = { router = "x.lua" }'))
  end)

  it("lists the known keys when nothing is close", function()
    assert.same({
      "tenement.toml:2:1: settings.workers = 4: unknown key; known keys in [settings]:"
        .. " data_dir, health_check_interval, max_restarts, restart_window, backoff_base_ms,"
        .. " backoff_max_ms, stop_timeout, listen, port, domain, max_head_kb, max_headers, max_body_mb,"
        .. " header_timeout, keepalive_timeout, max_connections, upstream_keepalive, drain_timeout,"
        .. " auth_failures_per_minute,"
        .. " metrics_auth, max_cold_starts, proxy_timeout, log_ring_lines, log_retention_days,"
        .. " log_max_lines, log_max_mb, tls",
    }, errors("workers = 4"))
  end)
end)

describe("[settings.tls]", function()
  it("has the documented defaults, cache_dir under data_dir", function()
    assert.same({
      enabled = false, cache_dir = "/var/lib/tenement/acme", staging = false,
      https_port = 443, http_port = 80,
    }, tls(""))
    local cfg = assert(config.parse('[settings]\ndata_dir = "/srv/t"\n', "tenement.toml", {}))
    assert.equal("/srv/t/acme", cfg.settings.tls.cache_dir)
  end)

  it("accepts every field", function()
    assert.same({
      enabled = true, acme_email = "admin@example.com", domain = "example.com",
      cache_dir = "/var/cache/acme", staging = true, https_port = 8443, http_port = 8081,
      dns_provider = "cloudflare",
    }, tls(table.concat({
      "enabled = true",
      'acme_email = "admin@example.com"',
      'domain = "example.com"',
      'cache_dir = "/var/cache/acme"',
      "staging = true",
      "https_port = 8443",
      "http_port = 8081",
      'dns_provider = "cloudflare"',
    }, "\n")))
  end)

  it("expands {data_dir} and ${VAR} in cache_dir", function()
    local cfg = assert(config.parse('[settings]\ndata_dir = "/srv/t"\n[settings.tls]\n'
      .. 'cache_dir = "{data_dir}/certs/${ZONE}"\n', "tenement.toml", { ZONE = "eu" }))
    assert.equal("/srv/t/certs/eu", cfg.settings.tls.cache_dir)
  end)

  it("rejects per-instance placeholders in cache_dir", function()
    assert.same({
      'tenement.toml:2:13: settings.tls.cache_dir = "/c/{name}": {name} cannot be used in'
        .. " settings.tls.cache_dir (the certificate cache is global, not per instance);"
        .. " allowed here: {data_dir}, ${VAR}",
    }, tls_errors('cache_dir = "/c/{name}"'))
  end)

  it("requires acme_email and domain when enabled", function()
    assert.same({
      "tenement.toml:2:1: settings.tls.acme_email: missing: required when settings.tls.enabled"
        .. " = true (Let's Encrypt needs a contact address)",
      "tenement.toml:2:1: settings.tls.domain: missing: required when settings.tls.enabled"
        .. " = true (the certificate is issued for it)",
    }, tls_errors("enabled = true"))
  end)

  it("does not require them when disabled", function()
    assert.is_false(tls("enabled = false").enabled)
  end)

  it("rejects a bad email and a bad domain", function()
    assert.same({
      'tenement.toml:2:14: settings.tls.acme_email = "admin": expected an email address like'
        .. ' "admin@example.com"',
      'tenement.toml:3:10: settings.tls.domain = "*.example.com": expected a DNS name like'
        .. ' "example.com": label "*" is not valid (a DNS label is 1-63 letters, digits and "-",'
        .. ' not starting or ending with "-")',
    }, tls_errors('acme_email = "admin"\ndomain = "*.example.com"'))
  end)

  it("rejects wrong types", function()
    assert.same({
      'tenement.toml:2:11: settings.tls.enabled = "yes": expected a boolean, got a string',
      'tenement.toml:3:11: settings.tls.staging = 1: expected a boolean, got an integer',
      'tenement.toml:4:16: settings.tls.dns_provider = false: expected a string, got a boolean'
        .. ' (quote it: "false")',
    }, tls_errors('enabled = "yes"\nstaging = 1\ndns_provider = false'))
  end)

  it("rejects ports out of range", function()
    assert.same({
      "tenement.toml:2:14: settings.tls.https_port = 0: out of range: expected an integer"
        .. " from 1 to 65535",
      "tenement.toml:3:13: settings.tls.http_port = 65536: out of range: expected an integer"
        .. " from 1 to 65535",
    }, tls_errors("https_port = 0\nhttp_port = 65536"))
  end)

  it("rejects one port for both HTTP and HTTPS when enabled", function()
    assert.same({
      "tenement.toml:5:13: settings.tls.http_port = 8443: must differ from https_port:"
        .. " HTTP and HTTPS cannot share a port",
    }, tls_errors('enabled = true\nacme_email = "a@b.io"\ndomain = "b.io"\nhttp_port = 8443\n'
      .. "https_port = 8443"))
  end)

  it("suggests the nearest key for a misspelt one", function()
    assert.same({
      'tenement.toml:2:1: settings.tls.acme_mail = "a@b.io": unknown key;'
        .. ' did you mean "acme_email"?',
    }, tls_errors('acme_mail = "a@b.io"'))
  end)

  it("rejects tls that is not a table", function()
    assert.same({
      "tenement.toml:2:7: settings.tls = true: expected a table, got a boolean",
    }, errors("tls = true"))
  end)
end)
