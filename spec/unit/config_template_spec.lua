-- tenement.config: templates ({name} {id} {data_dir} {socket} {port} {instance_dir} and
-- ${VAR}), validated at load time and expanded per instance by expand, instance_vars and
-- resolve.

local config = require("tenement.config")

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

local function errors(text, env)
  local cfg, err = config.parse(text, "tenement.toml", env or {})
  assert.is_nil(cfg)
  return lines(err)
end

local KNOWN = "{name}, {id}, {data_dir}, {socket}, {port}, {instance_dir} and ${VAR} for a host"
  .. " environment variable"

describe("templates at load time", function()
  it("accept every placeholder in command, args, workdir and env", function()
    local cfg = parse_ok(table.concat({
      "[service.api]",
      'command = "{instance_dir}/bin/api {name} {id}"',
      'args = ["--socket", "{socket}", "--port", "{port}", "--data", "{data_dir}"]',
      'workdir = "{instance_dir}"',
      "[service.api.env]",
      'SOCK = "{socket}"',
      'URL = "http://127.0.0.1:{port}/{name}/{id}"',
    }, "\n"))
    local s = cfg.services.api
    assert.equal("{instance_dir}/bin/api {name} {id}", s.command)
    assert.same({ "--socket", "{socket}", "--port", "{port}", "--data", "{data_dir}" }, s.args)
    assert.equal("{instance_dir}", s.workdir)
    assert.same({ SOCK = "{socket}", URL = "http://127.0.0.1:{port}/{name}/{id}" }, s.env)
  end)

  it("leave a $ that does not start ${...} alone", function()
    local cfg = parse_ok('[service.api]\ncommand = "sh -c \'echo $HOME costs $5\'"\n')
    assert.equal("sh -c 'echo $HOME costs $5'", cfg.services.api.command)
  end)

  it("reject an unknown placeholder, suggesting the nearest", function()
    assert.same({
      'tenement.toml:2:11: service.api.command = "run {nmae}": unknown placeholder {nmae};'
        .. " known placeholders are " .. KNOWN .. "; did you mean {name}?",
    }, errors('[service.api]\ncommand = "run {nmae}"\n'))
  end)

  it("reject an unknown placeholder with nothing close", function()
    assert.same({
      'tenement.toml:2:11: service.api.command = "run {tenant}": unknown placeholder {tenant};'
        .. " known placeholders are " .. KNOWN,
    }, errors('[service.api]\ncommand = "run {tenant}"\n'))
  end)

  it("report each bad placeholder of one value", function()
    assert.same({
      'tenement.toml:2:11: service.api.command = "{a} {b}": unknown placeholder {a};'
        .. " known placeholders are " .. KNOWN,
      'tenement.toml:2:11: service.api.command = "{a} {b}": unknown placeholder {b};'
        .. " known placeholders are " .. KNOWN,
    }, errors('[service.api]\ncommand = "{a} {b}"\n'))
  end)

  it("point at the array item and the env value that is wrong", function()
    assert.same({
      'tenement.toml:3:14: service.api.args[2] = "{ids}": unknown placeholder {ids};'
        .. " known placeholders are " .. KNOWN .. "; did you mean {id}?",
      'tenement.toml:4:9: service.api.workdir = "{home}": unknown placeholder {home};'
        .. " known placeholders are " .. KNOWN,
      'tenement.toml:6:7: service.api.env.DB = "{datadir}/x": unknown placeholder {datadir};'
        .. " known placeholders are " .. KNOWN .. "; did you mean {data_dir}?",
    }, errors(table.concat({
      "[service.api]",
      'command = "x"',
      'args = ["a", "{ids}"]',
      'workdir="{home}"',
      "[service.api.env]",
      'DB  = "{datadir}/x"',
    }, "\n")))
  end)

  it("reject {socket} inside the socket template itself", function()
    assert.same({
      'tenement.toml:3:10: service.api.socket = "{socket}.2": {socket} cannot be used in'
        .. " service.api.socket (the socket template cannot refer to itself); allowed here:"
        .. " {name}, {id}, {data_dir}, {port}, {instance_dir}, ${VAR}",
    }, errors('[service.api]\ncommand = "x"\nsocket = "{socket}.2"\n'))
  end)

  it("reject a socket template that can never give an absolute path", function()
    local fix = 'must be an absolute path: start it with "/", {data_dir}, {instance_dir} or'
      .. " a ${VAR} that holds one"
    assert.same({ 'tenement.toml:3:10: service.api.socket = "{name}-{id}.sock": ' .. fix },
      errors('[service.api]\ncommand = "x"\nsocket = "{name}-{id}.sock"\n'))
    assert.same({ 'tenement.toml:3:10: service.api.socket = "run/{id}.sock": ' .. fix },
      errors('[service.api]\ncommand = "x"\nsocket = "run/{id}.sock"\n'))
    assert.same({ 'tenement.toml:3:10: service.api.socket = "${RUN}/{id}.sock": ' .. fix },
      errors('[service.api]\ncommand = "x"\nsocket = "${RUN}/{id}.sock"\n', { RUN = "run" }))
    assert.equal("${RUN}/{id}.sock", parse_ok('[service.api]\ncommand = "x"\nsocket = "${RUN}/{id}.sock"\n',
      { RUN = "/run/t" }).services.api.socket)
    assert.equal("{instance_dir}/s", parse_ok('[service.api]\ncommand = "x"\nsocket = "{instance_dir}/s"\n')
      .services.api.socket)
  end)

  it("reject a socket template too long for any instance", function()
    local socket = "/run/" .. ("d"):rep(100) .. "/{name}-{id}.sock"
    assert.same({ ('tenement.toml:3:10: service.api.socket = "%s: expanded, it is at least'
      .. " 114 bytes long, and Unix sockets allow at most 107: use a shorter directory"):format(socket:sub(1, 55) .. '..."') },
      errors('[service.api]\ncommand = "x"\nsocket = "' .. socket .. '"\n'))
  end)

  it("reject braces that do not form a placeholder", function()
    local where = "braces are only allowed in " .. KNOWN
    assert.same({
      'tenement.toml:2:11: service.api.command = "awk \'{print}\'": unknown placeholder {print};'
        .. " known placeholders are " .. KNOWN,
      'tenement.toml:3:9: service.api.args[1] = "{{name}}": "{" at character 1 does not start'
        .. " a placeholder; " .. where,
      'tenement.toml:3:21: service.api.args[2] = "a}": "}" at character 2 does not close a'
        .. " placeholder; " .. where,
      'tenement.toml:3:27: service.api.args[3] = "{ name }": "{" at character 1 does not start'
        .. " a placeholder; " .. where,
      'tenement.toml:3:39: service.api.args[4] = "x{": "{" at character 2 does not start a'
        .. " placeholder; " .. where,
    }, errors('[service.api]\ncommand = "awk \'{print}\'"\n'
      .. 'args = ["{{name}}", "a}", "{ name }", "x{"]\n'))
  end)

  it("reject malformed ${...}", function()
    assert.same({
      'tenement.toml:3:9: service.api.args[1] = "${HOME": unterminated "${" at character 1;'
        .. " write ${VAR}",
      'tenement.toml:3:19: service.api.args[2] = "${1X}": "${1X}" is not a valid environment'
        .. ' variable reference; write ${VAR} with letters, digits and "_"',
      'tenement.toml:3:28: service.api.args[3] = "${}": "${}" is not a valid environment'
        .. ' variable reference; write ${VAR} with letters, digits and "_"',
    }, errors('[service.api]\ncommand = "x"\nargs = ["${HOME", "${1X}", "${}"]\n',
      { HOME = "/root" }))
  end)
end)

describe("${VAR} at load time", function()
  it("points at the placeholder when the variable is one tenement sets for the app", function()
    assert.same({
      'tenement.toml:2:11: service.api.command = "./app --port ${PORT}": PORT is not set in the'
        .. " environment of ten serve (${VAR} is read when the file loads); for the instance's"
        .. " own PORT write {port}",
      'tenement.toml:4:6: service.api.env.DB = "${INSTANCE_DIR}/db": INSTANCE_DIR is not set in the'
        .. " environment of ten serve (${VAR} is read when the file loads); for the instance's"
        .. " own INSTANCE_DIR write {instance_dir}",
    }, errors('[service.api]\ncommand = "./app --port ${PORT}"\n[service.api.env]\nDB = "${INSTANCE_DIR}/db"\n'))
  end)

  it("is an error when the variable is not set, in env values", function()
    assert.same({
      'tenement.toml:4:14: service.api.env.SECRET_KEY = "${SECRET_KEY}": SECRET_KEY is not set'
        .. " in the environment of ten serve",
    }, errors('[service.api]\ncommand = "x"\n[service.api.env]\nSECRET_KEY = "${SECRET_KEY}"\n',
      { OTHER = "1" }))
  end)

  it("is an error when the variable is not set, in command and socket", function()
    assert.same({
      'tenement.toml:2:11: service.api.command = "${APP_BIN}/api": APP_BIN is not set in the'
        .. " environment of ten serve",
      'tenement.toml:3:10: service.api.socket = "${RUN}/{id}.sock": RUN is not set in the'
        .. " environment of ten serve",
    }, errors('[service.api]\ncommand = "${APP_BIN}/api"\nsocket = "${RUN}/{id}.sock"\n'))
  end)

  it("keeps the template and captures only the referenced variables", function()
    local cfg = parse_ok('[service.api]\ncommand = "x"\n[service.api.env]\n'
      .. 'SECRET_KEY = "${SECRET_KEY}"\nEMPTY = "${EMPTY}"\n',
      { SECRET_KEY = "s3cret", EMPTY = "", TENEMENT_TOKEN = "do-not-copy" })
    assert.equal("${SECRET_KEY}", cfg.services.api.env.SECRET_KEY)
    assert.same({ SECRET_KEY = "s3cret", EMPTY = "" }, cfg.host_env)
  end)
end)

describe("config.expand", function()
  local vars = {
    name = "api", id = "prod", data_dir = "/srv/t", socket = "/tmp/tenement/api-prod.sock",
    port = 30123, instance_dir = "/srv/t/api/prod", env = { HOME = "/home/ann", B = "{id}" },
  }

  it("substitutes every placeholder", function()
    assert.equal("api prod /srv/t /tmp/tenement/api-prod.sock 30123 /srv/t/api/prod",
      config.expand("{name} {id} {data_dir} {socket} {port} {instance_dir}", vars))
  end)

  it("substitutes ${VAR} from vars.env", function()
    assert.equal("/home/ann/x", config.expand("${HOME}/x", vars))
  end)

  it("does not expand text that came from a variable", function()
    assert.equal("{id}-prod", config.expand("${B}-{id}", vars))
  end)

  it("returns a template without placeholders unchanged", function()
    assert.equal("plain $text", config.expand("plain $text", vars))
    assert.equal("", config.expand("", vars))
  end)

  it("fails on an unknown placeholder", function()
    local r, err = config.expand("{nam}", vars)
    assert.is_nil(r)
    assert.equal("unknown placeholder {nam}; known placeholders are " .. KNOWN
      .. "; did you mean {name}?", err)
  end)

  it("fails on a placeholder without a value", function()
    local r, err = config.expand("{port}", { name = "api" })
    assert.is_nil(r)
    assert.equal("{port} has no value here", err)
  end)

  it("fails on an unset variable", function()
    local r, err = config.expand("${NOPE}", vars)
    assert.is_nil(r)
    assert.equal("NOPE is not set in the environment of ten serve", err)
    r, err = config.expand("${NOPE}", {})
    assert.is_nil(r)
    assert.equal("NOPE is not set in the environment of ten serve", err)
  end)

  it("fails on a stray brace", function()
    local r, err = config.expand("a}", vars)
    assert.is_nil(r)
    assert.equal('"}" at character 2 does not close a placeholder; braces are only allowed in '
      .. KNOWN, err)
  end)

  it("fails on a template that is not a string", function()
    local r, err = config.expand(42, vars)
    assert.is_nil(r)
    assert.equal("template: expected a string, got an integer", err)
  end)
end)

describe("config.instance_vars", function()
  local cfg = parse_ok(table.concat({
    "[settings]",
    'data_dir = "/srv/t"',
    "[service.api]",
    'command = "x"',
    "[service.web]",
    'command = "y"',
    'socket = "{instance_dir}/${RUN_SUFFIX}-{port}.sock"',
    "[service.rel]",
    'command = "z"',
    "[service.long]",
    'command = "z"',
  }, "\n"), { RUN_SUFFIX = "s" })
  -- Loading refuses these two; instance_vars must refuse them all the same.
  cfg.services.rel.socket = "{name}-{id}.sock"
  cfg.services.long.socket = "/run/" .. ("d"):rep(100) .. "/{name}-{id}.sock"

  it("builds the values of one instance", function()
    assert.same({
      name = "api", id = "prod", port = 30001, data_dir = "/srv/t",
      instance_dir = "/srv/t/api/prod", socket = "/tmp/tenement/api-prod.sock",
      env = { RUN_SUFFIX = "s" },
    }, assert(config.instance_vars(cfg, "api", "prod", 30001)))
  end)

  it("expands the socket from its template, port and host variables included", function()
    local v = assert(config.instance_vars(cfg, "web", "blue", 30002))
    assert.equal("/srv/t/web/blue/s-30002.sock", v.socket)
  end)

  it("works without a port when the socket does not need one", function()
    local v = assert(config.instance_vars(cfg, "api", "prod"))
    assert.is_nil(v.port)
    assert.equal("/tmp/tenement/api-prod.sock", v.socket)
  end)

  it("fails when the socket needs a port and none is given", function()
    local v, err = config.instance_vars(cfg, "web", "blue")
    assert.is_nil(v)
    assert.equal('web:blue: socket "{instance_dir}/${RUN_SUFFIX}-{port}.sock": {port} has no'
      .. " value here", err)
  end)

  local RULE = 'names use 1-63 characters from a-z, 0-9 and "-", starting with a letter or digit,'
    .. " because they become socket paths, directories and DNS labels"
  local bad_ids = {
    { "../x", 'it starts with "."' },
    { "..", 'it starts with "."' },
    { "a/b", '"/" is not allowed' },
    { "Prod", 'uppercase "P" is not allowed' },
    { ("a"):rep(64), "it is 64 characters long" },
    { "", "it is empty" },
  }
  for _, c in ipairs(bad_ids) do
    it(("rejects the id %q"):format(c[1]), function()
      local v, err = config.instance_vars(cfg, "api", c[1], 30001)
      assert.is_nil(v)
      assert.equal(('instance id "%s": not a valid instance id: %s; %s'):format(c[1], c[2], RULE),
        err)
    end)
  end

  it("rejects an id that is not a string", function()
    local v, err = config.instance_vars(cfg, "api", 7, 30001)
    assert.is_nil(v)
    assert.equal("instance id 7: expected a string, got an integer", err)
  end)

  it("rejects an unknown service, suggesting the nearest", function()
    local v, err = config.instance_vars(cfg, "apo", "prod", 30001)
    assert.is_nil(v)
    assert.equal('no service "apo" is defined; did you mean "api"?', err)
  end)

  it("rejects a port out of range", function()
    local v, err = config.instance_vars(cfg, "api", "prod", 70000)
    assert.is_nil(v)
    assert.equal("port 70000: expected an integer from 1 to 65535", err)
  end)

  it("rejects a socket that is not an absolute path", function()
    local v, err = config.instance_vars(cfg, "rel", "a", 30001)
    assert.is_nil(v)
    assert.equal('rel:a: socket "rel-a.sock" must be an absolute path', err)
  end)

  it("rejects a socket path longer than a Unix socket allows", function()
    local v, err = config.instance_vars(cfg, "long", "a", 30001)
    assert.is_nil(v)
    local path = "/run/" .. ("d"):rep(100) .. "/long-a.sock"
    assert.equal(('long:a: socket path "%s" is %d bytes, Unix sockets allow at most 107')
      :format(path, #path), err)
  end)
end)

describe("config.resolve", function()
  it("expands every template of one instance", function()
    local cfg = parse_ok(table.concat({
      "[settings]",
      'data_dir = "/srv/t"',
      "[service.api]",
      'command = "{instance_dir}/bin/api"',
      'args = ["--listen", "{socket}", "--port", "{port}", "--key", "${KEY}"]',
      'workdir = "{data_dir}/{name}"',
      "[service.api.env]",
      'DATABASE_PATH = "{data_dir}/{id}/app.db"',
      'SECRET = "${KEY}"',
    }, "\n"), { KEY = "k{id}" })
    assert.same({
      service = "api", id = "prod", port = 30001,
      socket = "/tmp/tenement/api-prod.sock",
      instance_dir = "/srv/t/api/prod",
      command = "/srv/t/api/prod/bin/api",
      args = { "--listen", "/tmp/tenement/api-prod.sock", "--port", "30001", "--key", "k{id}" },
      workdir = "/srv/t/api",
      env = { DATABASE_PATH = "/srv/t/prod/app.db", SECRET = "k{id}" },
    }, assert(config.resolve(cfg, "api", "prod", 30001)))
  end)

  it("names the field that cannot be expanded", function()
    local cfg = parse_ok('[service.api]\ncommand = "x --port {port}"\n')
    local r, err = config.resolve(cfg, "api", "prod")
    assert.is_nil(r)
    assert.equal("api:prod: command: {port} has no value here", err)
  end)

  it("fails like instance_vars on a bad id", function()
    local cfg = parse_ok('[service.api]\ncommand = "x"\n')
    local r, err = config.resolve(cfg, "api", "../etc")
    assert.is_nil(r)
    assert.matches('^instance id "../etc": not a valid instance id: it starts with "%."', err)
  end)
end)
