-- tenement.config: the sections that refer to services ([instances], [routing]) and
-- [hooks].

local config = require("tenement.config")

local function lines(s)
  local out = {}
  for l in (s .. "\n"):gmatch("(.-)\n") do out[#out + 1] = l end
  return out
end

local function parse_ok(text, source)
  local cfg, err = config.parse(text, source or "tenement.toml", {})
  assert(cfg, err)
  return cfg
end

local function errors(text)
  local cfg, err = config.parse(text, "tenement.toml", {})
  assert.is_nil(cfg)
  return lines(err)
end

local RULE = 'names use 1-63 characters from a-z, 0-9 and "-", starting with a letter or digit,'
  .. " because they become socket paths, directories and DNS labels"

describe("[instances]", function()
  it("lists instances in file order, not name order", function()
    local cfg = parse_ok(table.concat({
      "[service.zeta]",
      'command = "z"',
      "[service.alpha]",
      'command = "a"',
      "[instances]",
      'zeta = ["b", "a"]',
      'alpha = ["x"]',
    }, "\n"))
    assert.same({
      { service = "zeta", id = "b" },
      { service = "zeta", id = "a" },
      { service = "alpha", id = "x" },
    }, cfg.instances)
  end)

  it("accepts an empty list and services from [process.NAME]", function()
    local cfg = parse_ok('[process.api]\ncommand = "x"\n[instances]\napi = []\n')
    assert.same({}, cfg.instances)
    cfg = parse_ok('[process.api]\ncommand = "x"\n[instances]\napi = ["one"]\n')
    assert.same({ { service = "api", id = "one" } }, cfg.instances)
  end)

  it("rejects an unknown service, suggesting the nearest", function()
    assert.same({
      'tenement.toml:4:1: instances.wrker: no service "wrker" is defined; did you mean "worker"?',
    }, errors('[service.worker]\ncommand = "w"\n[instances]\nwrker = ["default"]\n'))
  end)

  it("lists the services when no name is close", function()
    assert.same({
      'tenement.toml:6:1: instances.db: no service "db" is defined; defined services: api, worker',
    }, errors('[service.worker]\ncommand = "w"\n[service.api]\ncommand = "a"\n[instances]\n'
      .. 'db = ["main"]\n'))
    -- a name that does not load is not offered
    local got = errors('[service.worker]\ncommand = "w"\n[service.Bad_Name]\ncommand = "a"\n[instances]\n'
      .. 'db = ["main"]\n')
    assert.matches('no service "db" is defined; defined services: worker$', got[#got])
  end)

  it("says so when no service is defined at all", function()
    assert.same({
      'tenement.toml:2:1: instances.api: no service "api" is defined (there are no'
        .. " [service.NAME] sections)",
    }, errors('[instances]\napi = ["prod"]\n'))
  end)

  it("names a character outside the rule whole, not its first byte", function()
    assert.same({
      'tenement.toml:4:8: instances.api[1] = "ünï": not a valid instance id: it starts with "ü"; ' .. RULE,
      'tenement.toml:4:15: instances.api[2] = "aé": not a valid instance id: "é" is not allowed; ' .. RULE,
    }, errors('[service.api]\ncommand = "a"\n[instances]\napi = ["ünï", "aé"]\n'))
    -- bytes that are no character: shown, not sent to the terminal
    local ok, why = config.valid_name("a\226\128")
    assert.is_nil(ok)
    assert.matches("not a valid name: bytes \\xe2\\x80 is not allowed", why, 1, true)
  end)

  it("rejects bad ids: path traversal, slashes, uppercase, 64 characters, non-strings,"
    .. " duplicates", function()
    local long = ("a"):rep(64)
    assert.same({
      'tenement.toml:4:8: instances.api[1] = "../x": not a valid instance id: it starts with'
        .. ' "."; ' .. RULE,
      'tenement.toml:4:16: instances.api[2] = "a/b": not a valid instance id: "/" is not'
        .. " allowed; " .. RULE,
      'tenement.toml:4:23: instances.api[3] = "..": not a valid instance id: it starts with'
        .. ' "."; ' .. RULE,
      'tenement.toml:4:29: instances.api[4] = "API": not a valid instance id: uppercase "A" is'
        .. " not allowed; " .. RULE,
      'tenement.toml:4:36: instances.api[5] = "' .. ("a"):rep(55) .. '...": not a valid'
        .. " instance id: it is 64 characters long; " .. RULE,
      'tenement.toml:4:104: instances.api[6] = 5: expected a string, got an integer'
        .. ' (quote it: "5")',
      'tenement.toml:4:115: instances.api[8] = "prod": duplicate instance id: "prod" is'
        .. " already listed as instances.api[7]",
    }, errors('[service.api]\ncommand = "x"\n[instances]\napi = ["../x", "a/b", "..", "API", "'
      .. long .. '", 5, "prod", "prod"]\n'))
  end)

  it("rejects a list that is not an array", function()
    assert.same({
      'tenement.toml:4:7: instances.api = "prod": expected an array of instance ids like'
        .. ' ["prod", "staging"], got a string',
    }, errors('[service.api]\ncommand = "x"\n[instances]\napi = "prod"\n'))
  end)

  it("reports an unknown service and its bad ids together", function()
    assert.same({
      'tenement.toml:2:1: instances.apo: no service "apo" is defined (there are no'
        .. " [service.NAME] sections)",
      'tenement.toml:2:8: instances.apo[1] = "a b": not a valid instance id: " " is not'
        .. " allowed; " .. RULE,
    }, errors('[instances]\napo = ["a b"]\n'))
  end)
end)

describe("[routing]", function()
  local SERVICES = '[service.api]\ncommand = "a"\n[service.admin-service]\ncommand = "b"\n'
    .. '[service.docs]\ncommand = "d"\n'

  it("has no rules by default", function()
    assert.same({ subdomain = {}, path = {} }, parse_ok(SERVICES).routing)
  end)

  it("accepts default, subdomain and path rules; paths longest first", function()
    local cfg = parse_ok(SERVICES .. table.concat({
      "[routing]",
      'default = "api"',
      "[routing.subdomain]",
      'admin = "admin-service"',
      'Docs = "docs"',
      "[routing.path]",
      '"/api" = "api"',
      '"/api/v2" = "docs"',
      '"/" = "docs"',
      '"/docs" = "docs"',
      '"/dogs" = "api"',
    }, "\n"))
    assert.same({
      default = "api",
      subdomain = { admin = "admin-service", docs = "docs" },
      path = {
        { prefix = "/api/v2", service = "docs" },
        { prefix = "/docs", service = "docs" },
        { prefix = "/dogs", service = "api" },
        { prefix = "/api", service = "api" },
        { prefix = "/", service = "docs" },
      },
    }, cfg.routing)
  end)

  it("reports every bad rule", function()
    local LABEL = 'not a valid DNS label: a DNS label is 1-63 letters, digits and "-", not starting'
      .. ' or ending with "-"'
    assert.same({
      'tenement.toml:4:11: routing.default = "apii": no service "apii" is defined;'
        .. ' did you mean "api"?',
      'tenement.toml:6:1: routing.subdomain."a.b": ' .. LABEL,
      "tenement.toml:7:1: routing.subdomain.-x: " .. LABEL,
      'tenement.toml:8:9: routing.subdomain.admin = "nope": no service "nope" is defined;'
        .. " defined services: api",
      'tenement.toml:10:1: routing.path.api: a path prefix must start with "/", like "/api"',
      'tenement.toml:11:1: routing.path."/a b": a path prefix must not contain spaces,'
        .. ' control characters, "?" or "#"',
      'tenement.toml:12:8: routing.path."/x" = "nope": no service "nope" is defined;'
        .. " defined services: api",
      'tenement.toml:13:8: routing.path."/y" = 5: expected a string, got an integer'
        .. ' (quote it: "5")',
    }, errors(table.concat({
      "[service.api]",
      'command = "a"',
      "[routing]",
      'default = "apii"',
      "[routing.subdomain]",
      '"a.b" = "api"',
      '-x = "api"',
      'admin = "nope"',
      "[routing.path]",
      'api = "api"',
      '"/a b" = "api"',
      '"/x" = "nope"',
      '"/y" = 5',
    }, "\n")))
  end)

  it("rejects two labels that differ only in case", function()
    assert.same({
      'tenement.toml:5:1: routing.subdomain.admin: the same key as "Admin": case does not'
        .. " matter here",
    }, errors('[service.api]\ncommand = "a"\n[routing.subdomain]\nAdmin = "api"\nadmin = "api"\n'))
  end)

  it("rejects a default when no service is defined", function()
    assert.same({
      'tenement.toml:2:11: routing.default = "api": no service "api" is defined (there are no'
        .. " [service.NAME] sections)",
    }, errors('[routing]\ndefault = "api"\n'))
  end)

  it("suggests the nearest key for a misspelt one", function()
    assert.same({
      'tenement.toml:4:1: routing.defualt = "api": unknown key; did you mean "default"?',
      'tenement.toml:5:10: routing.paths: unknown key; did you mean "path"?',
    }, errors('[service.api]\ncommand = "a"\n[routing]\ndefualt = "api"\n[routing.paths]\n'
      .. '"/a" = "api"\n'))
  end)

  it("rejects rules that are not tables", function()
    assert.same({
      'tenement.toml:4:13: routing.subdomain = "admin": expected a table, got a string',
      'tenement.toml:5:8: routing.path = ["/api"]: expected a table, got an array',
    }, errors('[service.api]\ncommand = "a"\n[routing]\nsubdomain = "admin"\npath = ["/api"]\n'))
  end)
end)

describe("[hooks]", function()
  it("has no hooks by default", function()
    assert.same({}, parse_ok("").hooks)
  end)

  -- the file is read at load (config_spec), and none of these exists: the
  -- path it was looked for at is in the error
  local function router(path, source)
    local cfg, err = config.parse(('[hooks]\nrouter = "%s"\n'):format(path), source or "tenement.toml", {})
    assert.is_nil(cfg)
    return err:match("hooks.router: cannot read (.-): No such file or directory")
  end

  it("resolves a relative router against the config file's directory", function()
    assert.equal("/etc/tenement/hooks/router.lua",
      router("hooks/router.lua", "/etc/tenement/tenement.toml"))
    assert.equal("/etc/tenement/router.lua", router("./router.lua", "/etc/tenement/tenement.toml"))
    assert.equal("/etc/shared/router.lua",
      router("../shared/router.lua", "/etc/tenement/tenement.toml"))
    assert.equal("/router.lua", router("router.lua", "/tenement.toml"))
    assert.equal("conf/hooks/router.lua", router("hooks/router.lua", "conf/tenement.toml"))
    assert.equal("hooks/router.lua", router("hooks/router.lua", "tenement.toml"))
  end)

  it("keeps an absolute router, normalized", function()
    assert.equal("/opt/hooks/router.lua", router("/opt/hooks//router.lua", "/etc/tenement/tenement.toml"))
  end)

  it("rejects an empty or non-string router", function()
    assert.same({ 'tenement.toml:2:10: hooks.router = "": must not be empty' },
      errors('[hooks]\nrouter = ""\n'))
    assert.same({ 'tenement.toml:2:10: hooks.router = ["a.lua"]: expected a string, got an array' },
      errors('[hooks]\nrouter = ["a.lua"]\n'))
  end)

  it("rejects unknown hooks, suggesting the nearest", function()
    assert.same({
      'tenement.toml:2:1: hooks.routr = "r.lua": unknown key; did you mean "router"?',
      'tenement.toml:3:1: hooks.on_crash = "c.lua": unknown key; known keys in [hooks]: router',
    }, errors('[hooks]\nroutr = "r.lua"\non_crash = "c.lua"\n'))
  end)
end)
