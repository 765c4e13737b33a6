local config = require "tenement.config"

describe("config.describe", function()
  it("prints every resolved field with defaults, env and instances", function()
    local cfg = assert(config.parse([[
[service.api]
command = "./api"
health = "/health"
[service.api.env]
LOG = "info"
[instances]
api = ["prod", "b"]
[routing]
default = "api"
]], "t.toml", {}))
    local text = config.describe(cfg)
    assert.matches('data_dir = "/var/lib/tenement"', text, 1, true)
    assert.matches("health_check_interval = 10 ", text, 1, true)
    assert.matches("[service.api]", text, 1, true)
    assert.matches('isolation = "namespace"', text, 1, true)
    assert.matches("# memory_limit_mb (not set)", text, 1, true)
    assert.matches('LOG = "info"', text, 1, true)
    assert.matches('api = ["prod", "b"]', text, 1, true)
    assert.matches('default = "api"', text, 1, true)
    -- what it prints is valid TOML that loads to the same services
    local again = assert(config.parse(text:gsub("%[settings%.tls%][^%[]*", ""), "again.toml", {}))
    assert.are.same(cfg.services.api.env, again.services.api.env)
    assert.are.same(cfg.instances, again.instances)
  end)

  -- string.format refuses a width over 99: a long command line made ten config an internal error
  it("prints a value of any length, its comment two spaces after it", function()
    local command = "/srv/app/bin/server --listen $SOCKET_PATH " .. ("--flag "):rep(30)
    local cfg = assert(config.parse(string.format('[service.a]\ncommand = %q\n', command), "t.toml", {}))
    local text = config.describe(cfg)
    assert.matches(string.format("\ncommand = %q  # Command that starts the service\n", command), text, 1, true)
    -- the others still line up with one another
    local a = text:match("\n(restart = [^\n]*)")
    local b = text:match("\n(isolation = [^\n]*)")
    assert.are.equal(a:find("#", 1, true), b:find("#", 1, true))
  end)

  it("never shows host environment values captured for ${VAR}", function()
    local cfg = assert(config.parse('[service.a]\ncommand = "x"\n[service.a.env]\nK = "${SECRET}"\n',
      "t.toml", { SECRET = "hunter2" }))
    assert.are.equal("hunter2", cfg.host_env.SECRET)
    local json = require "tenement.json"
    assert.is_nil(json.encode(config.public(cfg, json.array)):find("hunter2", 1, true))
    assert.is_nil(config.describe(cfg):find("hunter2", 1, true))
  end)
end)

describe("reserved service names", function()
  it("refuses a service named after a directory the server owns", function()
    local cfg, err = config.parse('[service.acme]\ncommand = "x"\n', "t.toml", {})
    assert.is_nil(cfg)
    assert.matches('t.toml:1:10: service.acme: the name "acme" is reserved', err, 1, true)
  end)
end)
