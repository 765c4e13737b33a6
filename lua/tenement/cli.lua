-- The `ten` command line: argument parsing, help, and the commands.
-- Each command is a table (name, summary, usage, options, run); the help is
-- built from the same tables, so it lists exactly what works.
local cli = {}

local VERSION = "0.1.0"

local commands, by_name = {}, {}

local function command(def)
  commands[#commands + 1] = def
  by_name[def.name] = def
  for _, alias in ipairs(def.aliases or {}) do by_name[alias] = def end
end

-- Options every command accepts.
local global_options = {
  { long = "config", arg = "FILE", help = "configuration file (default: $TENEMENT_CONFIG, else ./tenement.toml)" },
  { long = "data-dir", arg = "DIR", help = "the server's data directory (default: $TENEMENT_DATA_DIR, else the config's data_dir)" },
  { long = "server", arg = "URL", help = "talk to a remote server over HTTP (default: $TENEMENT_SERVER; else the local control socket)" },
  { long = "token", arg = "TOKEN", help = "bearer token for --server (default: $TENEMENT_TOKEN, else the first "
    .. "line of {data_dir}/api_token if you saved one there)" },
  { long = "help", short = "h", help = "show help" },
  { long = "version", help = "print the version" },
}

local function edit_distance(a, b)
  local prev, cur = {}, {}
  for j = 0, #b do prev[j] = j end
  for i = 1, #a do
    cur[0] = i
    for j = 1, #b do
      local cost = a:sub(i, i) == b:sub(j, j) and 0 or 1
      cur[j] = math.min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + cost)
    end
    prev, cur = cur, prev
  end
  return prev[#b]
end

local function nearest(word, candidates)
  local best, best_d
  for _, c in ipairs(candidates) do
    local d = edit_distance(word, c)
    if not best_d or d < best_d then best, best_d = c, d end
  end
  if best_d and best_d <= math.max(2, #word // 3) then return best end
end

-- " (did you mean 'x'?)" for a mistyped command: those it begins (ten toke:
-- token-gen, token-list or token-revoke), else the nearest; "" when none is.
local function command_hint(word, names)
  local starting = {}
  for _, n in ipairs(names) do
    if #word >= 2 and n:sub(1, #word) == word then starting[#starting + 1] = "'" .. n .. "'" end
  end
  if #starting > 0 and #starting <= 3 then
    return string.format(" (did you mean %s?)", table.concat(starting, " or "))
  end
  local guess = nearest(word, names)
  return guess and string.format(" (did you mean '%s'?)", guess) or ""
end

local UsageError = {}
UsageError.__index = UsageError
local function usage_error(msg) return setmetatable({ msg = msg }, UsageError) end

-- Parses args against the command's options and the global ones.
-- Returns opts (long name -> value or true), positionals.
local function parse_args(cmd, args)
  local specs, by_long, by_short = {}, {}, {}
  for _, o in ipairs(global_options) do specs[#specs + 1] = o end
  for _, o in ipairs(cmd and cmd.options or {}) do specs[#specs + 1] = o end
  for _, o in ipairs(specs) do
    by_long[o.long] = o
    if o.short then by_short[o.short] = o end
  end
  local opts, positional = {}, {}
  local i = 1
  while i <= #args do
    local a = args[i]
    local spec, value
    if a == "--" then
      for j = i + 1, #args do positional[#positional + 1] = args[j] end
      break
    elseif a:sub(1, 2) == "--" then
      local name, v = a:match("^%-%-([^=]+)=(.*)$")
      name = name or a:sub(3)
      value = v
      spec = by_long[name]
      if not spec then
        local names = {}
        for _, o in ipairs(specs) do names[#names + 1] = o.long end
        local hint = nearest(name, names)
        error(usage_error(string.format("unknown option '--%s'%s", name,
          hint and string.format(" (did you mean --%s?)", hint) or "")))
      end
    elseif a:match("^%-%a") then
      spec = by_short[a:sub(2, 2)]
      if not spec then error(usage_error(string.format("unknown option '%s'", a))) end
      if #a > 2 then value = a:sub(3) end
    else
      positional[#positional + 1] = a
    end
    if spec then
      if spec.arg then
        if value == nil then
          i = i + 1
          value = args[i]
          -- `--id --data-dir D` forgot the id: taking "--data-dir" as the id
          -- would blame D instead. A value that looks like an option can be
          -- given as --id=VALUE.
          local next_name = value and value:match("^%-%-([^=]+)")
          if next_name and by_long[next_name] then value = nil end
          if value == nil then
            error(usage_error(string.format("option '--%s' needs a value (%s)", spec.long, spec.arg)))
          end
        end
        if spec.check then
          local ok, err = spec.check(value)
          if not ok then error(usage_error(string.format("--%s %s: %s", spec.long, value, err))) end
          value = ok == true and value or ok
        end
        opts[spec.long] = value
      else
        if value ~= nil then
          error(usage_error(string.format("option '--%s' takes no value", spec.long)))
        end
        opts[spec.long] = true
      end
    end
    i = i + 1
  end
  return opts, positional
end

local function format_options(list)
  local rows, width = {}, 0
  for _, o in ipairs(list) do
    local left = (o.short and ("-" .. o.short .. ", ") or "    ") .. "--" .. o.long ..
      (o.arg and (" " .. o.arg) or "")
    rows[#rows + 1] = { left, o.help }
    width = math.max(width, #left)
  end
  local out = {}
  for _, r in ipairs(rows) do
    out[#out + 1] = string.format("  %-" .. width .. "s  %s", r[1], r[2])
  end
  return table.concat(out, "\n")
end

local function main_help()
  local lines = {
    "ten: cramped housing for your processes (tenement " .. VERSION .. ")",
    "",
    "Runs many small web services on one Linux server: supervises each instance on",
    "its own Unix socket, routes HTTP to it, and stops it when idle.",
    "",
    "Usage: ten [--config FILE] COMMAND [ARGS...]",
    "",
    "Commands:",
  }
  local width = 0
  for _, c in ipairs(commands) do width = math.max(width, #c.name) end
  for _, c in ipairs(commands) do
    lines[#lines + 1] = string.format("  %-" .. width .. "s  %s", c.name, c.summary)
  end
  lines[#lines + 1] = ""
  lines[#lines + 1] = "Global options:"
  lines[#lines + 1] = format_options(global_options)
  lines[#lines + 1] = ""
  lines[#lines + 1] = "Run 'ten help COMMAND' for what a command does and its options."
  return table.concat(lines, "\n") .. "\n"
end

local function command_help(c)
  local lines = { "Usage: " .. c.usage, "", c.summary .. "." }
  if c.description then
    lines[#lines + 1] = ""
    lines[#lines + 1] = c.description
  end
  if c.options and #c.options > 0 then
    lines[#lines + 1] = ""
    lines[#lines + 1] = "Options:"
    lines[#lines + 1] = format_options(c.options)
  end
  -- only those the command reads: --server and --token mean nothing to a
  -- command that works on this host's files, none but -h to version and help
  local globals = {}
  for _, o in ipairs(global_options) do
    local remote = o.long == "server" or o.long == "token"
    local config = o.long == "config" or o.long == "data-dir"
    if not (c.local_only and remote) and not (c.no_config and (remote or config)) then globals[#globals + 1] = o end
  end
  lines[#lines + 1] = ""
  lines[#lines + 1] = "Global options:"
  lines[#lines + 1] = format_options(globals)
  return table.concat(lines, "\n") .. "\n"
end

local function environment()
  local ok, core = pcall(require, "tenement.core")
  if ok and core.proc and core.proc.environ then return core.proc.environ() end
  return setmetatable({}, { __index = function(_, k) return os.getenv(k) end })
end

-- Loads the configuration the command line points at; on failure prints the
-- error and returns nil.
-- An absolute path, so paths relative to the config file resolve to
-- absolute ones whatever directory the server later runs in.
local function absolute(path)
  if path:sub(1, 1) == "/" then return path end
  local cwd = require("tenement.core").fs.cwd()
  return (cwd .. "/" .. path):gsub("/%./", "/")
end

local function load_config(ctx)
  local config = require "tenement.config"
  local path = absolute(config.find(ctx.opts.config, ctx.env))
  local cfg, err = config.load(path, ctx.env)
  if not cfg then
    ctx.err:write(err, "\n")
    return nil
  end
  for _, w in ipairs(cfg.warnings) do
    -- ten serve's are lines of its log, with their time, as its others
    if ctx.command == "serve" then require("tenement.log").warn("%s", w) else ctx.err:write("warning: ", w, "\n") end
  end
  return cfg
end

-- --data-dir, else $TENEMENT_DATA_DIR, over the file's data_dir: the client
-- commands find the control socket the same way, so ten serve (and ten
-- config, which shows what serve will use) must agree. -> true | nil, err
local function apply_data_dir(ctx, cfg)
  local dir, origin = ctx.opts["data-dir"], "--data-dir"
  if not dir and ctx.env.TENEMENT_DATA_DIR and ctx.env.TENEMENT_DATA_DIR ~= "" then
    dir, origin = ctx.env.TENEMENT_DATA_DIR, "TENEMENT_DATA_DIR"
  end
  if not dir then return true end
  return require("tenement.config").override(cfg, "data_dir", absolute(dir), origin)
end

---------------------------------------------------------------------------
-- commands

command {
  name = "config",
  local_only = true,
  summary = "Load, validate and print the resolved configuration",
  usage = "ten config [--json]",
  description = "Reads tenement.toml (see --config), checks every field, fills in the\n" ..
    "defaults and prints the result. Exits 1 with every problem found, each\n" ..
    "with its file, line and what is allowed. ${VAR}s are read from this\n" ..
    "shell's environment: ten serve reads them from its own, which may differ.",
  options = {
    { long = "json", help = "print JSON instead of TOML-like text" },
  },
  run = function(ctx)
    local cfg = load_config(ctx)
    if not cfg then return 1 end
    local ok, err = apply_data_dir(ctx, cfg)
    if not ok then ctx.err:write("ten config: ", err, "\n") return 2 end
    if ctx.opts.json then
      local json = require "tenement.json"
      ctx.out:write(json.encode(require("tenement.config").public(cfg, json.array), "  "), "\n")
    else
      ctx.out:write(require("tenement.config").describe(cfg))
    end
    return 0
  end,
}

-- The data directory a client command talks to.
-- The configuration file read as TOML only, nothing checked: a ${VAR}
-- elsewhere in the file that only ten serve's environment has (a secret for
-- an app, say) must not stop ten ps in an admin's shell.
-- -> doc (a table, or nil when the file is missing or not TOML), path,
-- origin (config.find's), whether the file is there
local function file_doc(ctx)
  local path, origin = require("tenement.config").find(ctx.opts.config, ctx.env)
  local f = io.open(path)
  if not f then return nil, path, origin, false end
  local text = f:read("a")
  f:close()
  local doc = text and require("tenement.toml").parse(text, path)
  return type(doc) == "table" and doc or nil, path, origin, true
end

local function data_dir(ctx)
  local dir = ctx.opts["data-dir"] or ctx.env.TENEMENT_DATA_DIR
  if dir and dir ~= "" then return dir end
  local config = require "tenement.config"
  local doc, path, origin, there = file_doc(ctx)
  if not there and origin == "default" then
    ctx.default_data_dir = path -- the file looked for, for report_failure
    return config.defaults().settings.data_dir
  end
  -- Only data_dir matters here; the whole file is checked only when data_dir
  -- itself is in doubt, for the errors with their lines.
  local settings = doc and (doc.settings or {})
  if type(settings) == "table" then
    local cfg = config.check({ settings = { data_dir = settings.data_dir } }, absolute(path), ctx.env)
    if cfg then return cfg.settings.data_dir end
  end
  -- A file named but missing is reported by load_config, reason and fix included.
  local cfg = load_config(ctx)
  if not cfg and there then
    -- the server runs on as it was; only the way to it is in doubt
    ctx.err:write(string.format("ten %s: the server's data directory is read from %s: fix the file, or name the "
      .. "directory with --data-dir DIR (or $TENEMENT_DATA_DIR)\n", ctx.command or "", absolute(path)))
  end
  return cfg and cfg.settings.data_dir
end

-- The service names of the configuration file. -> set, path | nil
local function file_services(ctx)
  local doc, path = file_doc(ctx)
  if not doc then return nil end
  local set = {}
  for name in pairs(type(doc.service) == "table" and doc.service or {}) do set[name] = true end
  return set, path
end

-- Runs fn(client) in a task with a client of the running server: the local
-- control socket, or --server/$TENEMENT_SERVER with a token. fn returns an exit code.
local function with_server(ctx, fn)
  local core = require "tenement.core"
  local client = require "tenement.client"
  local server = ctx.opts.server or ctx.env.TENEMENT_SERVER
  local c, err
  if server and server ~= "" then
    local token = ctx.opts.token or ctx.env.TENEMENT_TOKEN
    if not token or token == "" then
      local dir = ctx.opts["data-dir"] or ctx.env.TENEMENT_DATA_DIR
      local f = dir and io.open(dir .. "/api_token")
      if f then token = f:read("l") f:close() end
    end
    c, err = client.new { server = server, token = token }
  else
    local dir = data_dir(ctx)
    if not dir then return 1 end
    c = client.new { socket = dir .. "/ten.sock" }
  end
  if not c then ctx.err:write("ten: ", err, "\n") return 2 end
  return core.run(fn, c)
end

local function target_arg(ctx, cmd, args, allow_id_option)
  local supervisor = require "tenement.supervisor"
  local spec = args[1]
  if not spec then
    ctx.err:write("ten ", cmd.name, ": missing ", cmd.usage:match("SERVICE:%u+") or "SERVICE:ID", "\nUsage: ",
      cmd.usage, "\n")
    return nil
  end
  if allow_id_option and ctx.opts.id then
    if spec:find(":") then
      ctx.err:write("ten ", cmd.name, ": give either SERVICE:ID or SERVICE --id ID, not both\n")
      return nil
    end
    spec = spec .. ":" .. ctx.opts.id
  end
  local service, id = supervisor.parse_key(spec)
  if not service then
    -- in the command's own words: deploy takes SERVICE:VERSION
    local shape = cmd.usage:match("SERVICE:%u+") or "SERVICE:ID"
    ctx.err:write("ten ", cmd.name, ": ", (id:gsub("SERVICE:ID", shape)), "\nUsage: ", cmd.usage, "\n")
    return nil
  end
  return service, id
end

local function report_failure(ctx, name, status, value)
  local client = require "tenement.client"
  if status == nil then
    ctx.err:write("ten ", name, ": ", value, "\n")
    if ctx.default_data_dir then
      ctx.err:write("(there is no ", ctx.default_data_dir, ", so that is the default data directory: give --config ",
        "FILE or --data-dir DIR for another)\n")
    end
  else
    local msg = client.error_message(status, value)
    if status == 401 and ctx.opts.server then
      -- the answer speaks HTTP; the person typed a command
      msg = msg .. "; give this command a token: --token TOKEN or TENEMENT_TOKEN (`ten token-gen` on the server "
        .. "makes one)"
    end
    ctx.err:write("ten ", name, ": ", msg, "\n")
  end
  return 1
end

local function duration(secs)
  if not secs then return "-" end
  secs = math.floor(secs)
  if secs < 60 then return secs .. "s" end
  if secs < 3600 then return string.format("%dm%02ds", secs // 60, secs % 60) end
  if secs < 86400 then return string.format("%dh%02dm", secs // 3600, secs % 3600 // 60) end
  return string.format("%dd%02dh", secs // 86400, secs % 86400 // 3600)
end

-- "90s", "15m", "2h", "7d" -> seconds
local function parse_duration(s)
  local n, unit = tostring(s):match("^(%d+)([smhd]?)$")
  if not n then return nil, "expected a duration like 30s, 15m, 2h or 7d" end
  return tonumber(n) * ({ [""] = 1, s = 1, m = 60, h = 3600, d = 86400 })[unit]
end

local printable = require("tenement.log").printable

local function table_text(header, rows)
  local widths = {}
  for i, h in ipairs(header) do widths[i] = #h end
  for _, r in ipairs(rows) do
    for i, cell in ipairs(r) do widths[i] = math.max(widths[i], #cell) end
  end
  local lines = {}
  local function line(cells)
    local parts = {}
    for i, cell in ipairs(cells) do
      parts[i] = i == #cells and cell or cell .. string.rep(" ", widths[i] - #cell)
    end
    lines[#lines + 1] = table.concat(parts, "  ")
  end
  line(header)
  for _, r in ipairs(rows) do line(r) end
  return table.concat(lines, "\n") .. "\n"
end

command {
  name = "serve",
  local_only = true,
  summary = "Run the server: supervise the instances, keep their logs",
  usage = "ten serve [--config FILE] [-p PORT] [--listen ADDR] [-d DOMAIN] [--tls --email EMAIL [--staging]]",
  options = {
    { long = "port", short = "p", arg = "PORT", help = "HTTP port (overrides settings.port)",
      check = function(v) local n = math.tointeger(tonumber(v)) return n, "expected a port number" end },
    { long = "listen", arg = "ADDR", help = "address to listen on (overrides settings.listen)" },
    { long = "domain", short = "d", arg = "DOMAIN", help = "routing domain (overrides settings.domain)" },
    -- Flags of earlier versions: their users' scripts pass them.
    { long = "tls", help = "set settings.tls.enabled; accepted, but this version serves plain HTTP only (it says so when it starts)" },
    { long = "email", arg = "EMAIL", help = "ACME account email (overrides settings.tls.acme_email; no effect yet, see --tls)",
      check = function(v)
        local _, err = require("tenement.config").check({ settings = { tls = { acme_email = v } } }, nil, {})
        return err == nil, err and err:gsub("^[^:]*: ", "")
      end },
    { long = "staging", help = "use the ACME staging environment (settings.tls.staging; no effect yet, see --tls)" },
  },
  description = "Starts the instances of [instances] and those that were running when the\n" ..
    "server last stopped, restarts them by their policy, and answers the other\n" ..
    "commands on the control socket {data_dir}/ten.sock. SIGTERM or SIGINT stops\n" ..
    "it: requests in flight get drain_timeout to finish, then every instance gets\n" ..
    "SIGTERM, and SIGKILL after stop_timeout; exit 0. A second SIGTERM or SIGINT\n" ..
    "(Ctrl-C again) closes the connections left and SIGKILLs the instances now.\n" ..
    "Its own log goes to stderr, a line an event; TENEMENT_LOG_LEVEL (debug, info,\n" ..
    "warn or error; default info) sets how much of it.",
  run = function(ctx)
    local cfg = load_config(ctx)
    if not cfg then return 1 end
    local config = require "tenement.config"
    local dok, derr = apply_data_dir(ctx, cfg)
    if not dok then ctx.err:write("ten serve: ", derr, "\n") return 2 end
    for _, o in ipairs { { "port", "--port" }, { "listen", "--listen" }, { "domain", "--domain" } } do
      local v = ctx.opts[o[1]]
      if v ~= nil then
        if o[1] == "domain" then v = v:lower() end
        local ok, err = config.override(cfg, o[1], v, o[2])
        -- said in the words of the command line, not of the file
        if not ok then
          err = err:gsub('a key of its own: listen = "([^"]*)" and port = (%d+)',
            "an option of its own: --listen %1 --port %2")
          ctx.err:write("ten serve: ", err, "\n")
          return 2
        end
      end
    end
    local o = ctx.opts
    if o.tls or o.email or o.staging then
      local tls = {}
      for k, v in pairs(cfg.settings.tls) do tls[k] = v end
      tls.enabled = tls.enabled or o.tls == true
      tls.staging = tls.staging or o.staging == true
      tls.acme_email = o.email or tls.acme_email
      if o.domain and tls.domain == nil then tls.domain = o.domain:lower() end
      local checked, err = config.check({ settings = { tls = tls } }, nil, {})
      if not checked then
        ctx.err:write("ten serve: --tls: ", (err:gsub("\n", "\n  ")),
          "\n(on the command line: --email EMAIL, --domain DOMAIN)\n")
        return 2
      end
      cfg.settings.tls = checked.settings.tls
      cfg.overrides = cfg.overrides or {}
      cfg.overrides.tls = cfg.settings.tls
    end
    -- The original's configs carry [settings.tls]; they load, but nothing
    -- here speaks TLS yet, and a user who asked for HTTPS must not find out
    -- from a browser.
    if cfg.settings.tls.enabled then
      require("tenement.log").warn("settings.tls.enabled = true: HTTPS is not served by this version"
        .. " of ten; it serves plain HTTP on %s:%d. Put a TLS proxy (Caddy, say) in front of it",
        cfg.settings.listen, cfg.settings.port)
    end
    local core = require "tenement.core"
    local server = require "tenement.server"
    return core.run(function()
      local srv = server.new(cfg, { environ = ctx.env })
      local ok, err = srv:start()
      if not ok then
        ctx.err:write("ten serve: ", err, "\n")
        if srv.sup then srv:shutdown() end
        return 1
      end
      return srv:serve_until_signal()
    end)
  end,
}

command {
  name = "spawn",
  summary = "Start an instance and wait until it runs",
  usage = "ten spawn SERVICE:ID  |  ten spawn SERVICE --id ID",
  max_args = 1,
  options = { { long = "id", arg = "ID", help = "the instance id (with a bare SERVICE)" } },
  run = function(ctx, args)
    local cmd = by_name.spawn
    local service, id = target_arg(ctx, cmd, args, true)
    if not service then return 2 end
    return with_server(ctx, function(c)
      local status, v = c:request("POST", "/api/instances", { service = service, id = id })
      if status ~= 201 and status ~= 200 then return report_failure(ctx, "spawn", status, v) end
      ctx.out:write(string.format("%s is %s on %s\n", v.instance, v.state, v.socket))
      -- running, but not as the operator asked: kept across restarts
      if v.unsaved then
        ctx.err:write("ten spawn: ", v.instance, ": ", v.unsaved, "\n")
        return 1
      end
      return 0
    end)
  end,
}

command {
  name = "stop",
  summary = "Stop an instance (SIGTERM, then SIGKILL after stop_timeout); it stays down until spawned",
  usage = "ten stop SERVICE:ID",
  description = "Its directory ($INSTANCE_DIR, with its storage_quota_mb image) is deleted with it,\n" ..
    "unless the service sets storage_persist = true: a stopped instance starts empty.\n" ..
    "An instance that goes to sleep (idle_timeout) keeps its directory.",
  max_args = 1,
  run = function(ctx, args)
    local service, id = target_arg(ctx, by_name.stop, args)
    if not service then return 2 end
    return with_server(ctx, function(c)
      local path = "/api/instances/" .. service .. ":" .. id
      local status, v = c:request("GET", path)
      local was = status == 200 and type(v) == "table" and v.state
      status, v = c:request("DELETE", path)
      -- 200 when the stop was done but not recorded: the GET below says so
      if status ~= 204 and status ~= 200 then return report_failure(ctx, "stop", status, v) end
      -- how the process ended is the instance's last exit, "stopped (exited
      -- with code 0)" or a SIGKILL it needed
      status, v = c:request("GET", path)
      local after = status == 200 and type(v) == "table" and v or {}
      -- no process to end: the stop only holds it (and drops a sleeper's data)
      local held = { sleeping = "it was asleep", failed = "it had failed" }
      if was == "stopped" then
        ctx.out:write(service, ":", id, " was already stopped\n")
      elseif held[was] then
        ctx.out:write(service, ":", id, " stopped (", held[was], ")\n")
      else
        local how = type(after.last_exit) == "string" and after.last_exit:match("^stopped %((.*)%)$")
        ctx.out:write(service, ":", id, " stopped", how and (": " .. how) or "", "\n")
      end
      -- stopped, but not as the operator asked: for good
      if after.unsaved then
        ctx.err:write("ten stop: ", service, ":", id, ": ", after.unsaved, "\n")
        return 1
      end
      return 0
    end)
  end,
}

command {
  name = "restart",
  summary = "Restart an instance (also clears a failed one)",
  usage = "ten restart SERVICE:ID",
  max_args = 1,
  run = function(ctx, args)
    local service, id = target_arg(ctx, by_name.restart, args)
    if not service then return 2 end
    return with_server(ctx, function(c)
      local status, v = c:request("POST", "/api/instances/" .. service .. ":" .. id .. "/restart")
      if status ~= 200 then return report_failure(ctx, "restart", status, v) end
      ctx.out:write(string.format("%s is %s on %s\n", v.instance, v.state, v.socket))
      return 0
    end)
  end,
}

command {
  name = "ps",
  aliases = { "ls" },
  summary = "List every known instance, sleeping and failed ones included",
  usage = "ten ps [--json]",
  description = "STATE: starting, running, unhealthy (its health check fails), backoff (waiting to\n" ..
    "restart), stopping, sleeping (stopped when idle; a request wakes it), stopped, failed\n" ..
    "(gave up restarting; ten restart clears it). UPTIME: since its process started;\n" ..
    "IDLE: since its last request. WEIGHT: its share of its service's traffic, relative\n" ..
    "to the others' (0: none). LAST EXIT: how its last process ended.",
  options = { { long = "json", help = "print JSON (an array of instances)" } },
  run = function(ctx)
    return with_server(ctx, function(c)
      local status, list = c:request("GET", "/api/instances")
      if status ~= 200 then return report_failure(ctx, "ps", status, list) end
      if ctx.opts.json then
        ctx.out:write(require("tenement.json").encode(require("tenement.json").array(list), "  "), "\n")
        return 0
      end
      if #list == 0 then
        ctx.out:write("no instances (start one with `ten spawn SERVICE:ID`)\n")
        return 0
      end
      local rows = {}
      for _, i in ipairs(list) do
        rows[#rows + 1] = {
          i.id, i.state, i.health, i.pid and tostring(i.pid) or "-", duration(i.uptime_secs),
          duration(i.idle_secs), tostring(i.restarts or 0), tostring(i.weight or "-"),
          i.isolation or "-", i.socket or "-", (i.last_exit or "-"):match("^[^\n]*"),
        }
      end
      ctx.out:write(table_text({ "INSTANCE", "STATE", "HEALTH", "PID", "UPTIME", "IDLE", "RESTARTS",
        "WEIGHT", "ISOLATION", "SOCKET", "LAST EXIT" }, rows))
      -- a start or stop a restart of the server would undo (a full disk)
      for _, i in ipairs(list) do
        if i.unsaved then ctx.err:write("warning: ", i.id, ": ", i.unsaved, "\n") end
      end
      return 0
    end)
  end,
}

command {
  name = "health",
  summary = "Run a health check on an instance now",
  usage = "ten health SERVICE:ID",
  description = "Exits 0 when the instance answers its health check, or sleeps (scaled to\n" ..
    "zero after idle_timeout: nothing runs to check, and its next request wakes\n" ..
    "it); 1 when it fails the check or is not running otherwise.",
  max_args = 1,
  run = function(ctx, args)
    local service, id = target_arg(ctx, by_name.health, args)
    if not service then return 2 end
    return with_server(ctx, function(c)
      local status, v = c:request("GET", "/api/instances/" .. service .. ":" .. id .. "/health")
      if status ~= 200 then return report_failure(ctx, "health", status, v) end
      if v.check == "ok" then
        ctx.out:write(v.instance, ": healthy\n")
        return 0
      end
      if v.state == "sleeping" then
        ctx.out:write(v.instance, ": asleep, not checked (its next request wakes it)\n")
        return 0
      elseif v.state ~= "running" and v.state ~= "unhealthy" then
        ctx.out:write(v.error or (v.instance .. " is " .. v.state), "\n")
      else
        -- this check's answer first: the health the periodic checks keep
        -- may still say healthy (they had not run since, or ran otherwise)
        ctx.out:write(v.instance, ": the check failed: ", v.error or v.state, " (the periodic checks say: ",
          v.health or "unknown", ")\n")
      end
      return 1
    end)
  end,
}

-- Digits only: tonumber also takes " 7", "0x10" and "1e1", which no one
-- typing a count or a weight means.
local function whole_number(v)
  return type(v) == "string" and v:match("^%d+$") and math.tointeger(tonumber(v)) or nil
end

-- -n and --limit: the store answers at most 10000 lines, and a count it
-- would cut without a word is refused here
local function log_line_count(v)
  local n = whole_number(v)
  return n and n >= 1 and n <= 10000 and n, "expected a whole number from 1 to 10000"
end

-- ten logs with no server running: the lines are in the store all the same,
-- and after a crash is when they are wanted most. In a task.
local function logs_from_store(ctx, instance, unreachable, show)
  local dir = data_dir(ctx)
  local path = dir and (dir .. "/tenement.db")
  if not path or not require("tenement.core").fs.stat(path) then
    ctx.err:write("ten logs: ", unreachable, "\n")
    return 1
  end
  if ctx.opts.follow then
    ctx.err:write("ten logs: --follow needs a running server: ", unreachable, "\n")
    return 1
  end
  local store, err = require("tenement.store").open(path)
  if not store then ctx.err:write("ten logs: ", err, "\n") return 1 end
  local rows, lerr = store:logs { instance = instance, q = ctx.opts.search, stream = ctx.opts.stream or ctx.opts.level,
    since = ctx.opts.since and (os.time() - ctx.opts.since), limit = ctx.opts.lines or ctx.opts.limit or 100 }
  store:close()
  if not rows then ctx.err:write("ten logs: ", lerr, "\n") return 1 end
  ctx.err:write("ten logs: no server is running; the lines below are read from ", path, "\n")
  local list = {}
  for i = #rows, 1, -1 do -- oldest first
    local r = rows[i]
    list[#list + 1] = { time = r.ts, instance = r.instance, stream = r.stream, pid = r.pid, message = r.message }
  end
  show(list)
  return 0
end

command {
  name = "logs",
  summary = "Show an instance's output, search it, follow it",
  usage = "ten logs [SERVICE:ID] [-n N] [-f] [--search QUERY] [--since DURATION] [--stream stdout|stderr]",
  description = "Without SERVICE:ID, the lines of every instance, each line naming its own.\n" ..
    "Lines come from the store, so they survive restarts of instances and of the\n" ..
    "server; with no server running they are read from the store directly (not\n" ..
    "--follow). --search is full-text (every word must appear; the last one may be a prefix).\n" ..
    "Each line names the process that wrote it, as [PID] (ten ps shows the running one's).\n" ..
    "On a terminal an app's colours show as colours (NO_COLOR=1 keeps them out); every\n" ..
    "other control character is shown by its code, as it is to a pipe.",
  max_args = 1,
  options = {
    { long = "lines", short = "n", arg = "N", help = "how many lines (default 100, at most 10000)",
      check = log_line_count },
    { long = "limit", arg = "N", help = "the same as -n (its name in earlier versions)", check = log_line_count },
    { long = "follow", short = "f", help = "keep printing new lines as they come" },
    { long = "search", arg = "QUERY", help = "only lines matching QUERY" },
    { long = "since", arg = "DURATION", help = "only lines newer than DURATION (30s, 15m, 2h, 7d)",
      check = parse_duration },
    { long = "stream", arg = "STREAM", help = "stdout or stderr",
      check = function(v) return (v == "stdout" or v == "stderr") and true, "expected stdout or stderr" end },
    { long = "level", arg = "STREAM", help = "the same as --stream (its name in earlier versions)",
      check = function(v) return (v == "stdout" or v == "stderr") and true, "expected stdout or stderr" end },
  },
  run = function(ctx, args)
    local instance
    if args[1] then
      local service, id = target_arg(ctx, by_name.logs, args)
      if not service then return 2 end
      instance = service .. ":" .. id
    end
    local q = {}
    local function add(k, v) if v then q[#q + 1] = k .. "=" .. tostring(v):gsub("[^%w%-_.~:]", function(ch)
      return string.format("%%%02X", ch:byte()) end) end end
    add("instance", instance)
    add("limit", ctx.opts.lines or ctx.opts.limit or 100)
    add("q", ctx.opts.search)
    add("stream", ctx.opts.stream or ctx.opts.level)
    if ctx.opts.since then add("since", os.time() - ctx.opts.since) end
    local base = "/api/logs?" .. table.concat(q, "&")
    -- an app's colours shown as colours on a terminal (NO_COLOR keeps them
    -- out); every other control, and anything to a pipe, by its code
    local paint = printable
    if ctx.out == io.stdout and (ctx.env.NO_COLOR or "") == "" and require("tenement.core").fs.isatty(1) then
      paint = require("tenement.log").printable_coloured
    end
    local function show(list)
      for _, l in ipairs(list) do
        local prefix = os.date("!%Y-%m-%dT%H:%M:%S", math.floor(l.time)) .. string.format(".%03dZ", math.floor(l.time * 1000) % 1000)
        local message = paint(l.message)
        -- [pid] as syslog writes it: during a rollout or a restart two
        -- processes of one instance write side by side
        local who = (instance and "" or l.instance) .. (l.pid and ("[" .. l.pid .. "]") or "")
        ctx.out:write(prefix, " ", who ~= "" and (who .. " ") or "", l.stream == "stderr" and "stderr " or "",
          message, "\n")
      end
      if ctx.out.flush then ctx.out:flush() end
    end
    return with_server(ctx, function(c)
      local status, list, why = c:request("GET", base)
      if why == "unreachable" and not c.server then return logs_from_store(ctx, instance, list, show) end
      if status ~= 200 then return report_failure(ctx, "logs", status, list) end
      if instance and #list == 0 and c:request("GET", "/api/instances/" .. instance) == 404 then
        -- a typo would otherwise look like a quiet instance
        local kept = ctx.opts.search or ctx.opts.stream or ctx.opts.level or ctx.opts.since
        ctx.err:write("ten logs: no instance ", instance, kept and ", and no lines of it that match"
          or ", and no lines of it in the store", "\n")
        return 1
      end
      show(list)
      local asked = ctx.opts.lines or ctx.opts.limit or 100
      if #list > 0 and #list < asked then
        -- fewer than asked, with as much text as an answer holds: the
        -- answer was cut there, not the log
        local bytes = 0
        for _, l in ipairs(list) do bytes = bytes + #l.message end
        local cap = require("tenement.api").LOG_ANSWER_BYTES
        if bytes > cap - 64 * 1024 then
          ctx.err:write(string.format("ten logs: the newest %d of the %d lines asked for: an answer holds at most %d "
            .. "MiB of text; --since or --search narrows what to show\n", #list, asked, cap // (1024 * 1024)))
        end
      end
      -- quiet otherwise: nothing found looks like nothing written. Asked of
      -- the index's own tokenizer: "✓" or an emoji is no word to it either
      if #list == 0 and ctx.opts.search and #require("tenement.core").db.tokens(ctx.opts.search) == 0 then
        ctx.err:write("ten logs: --search finds words of letters or digits, and ", string.format("%q", ctx.opts.search),
          " has none: the index does not hold punctuation or symbols; search for the words around it\n")
      end
      if not ctx.opts.follow then return 0 end
      -- then the live Server-Sent Events stream, from the last line shown
      local after = #list > 0 and list[#list].seq or 0
      local json = require "tenement.json"
      local ok, err = c:events(base:gsub("^/api/logs%?", "/api/logs/stream?") .. "&after=" .. after,
        function(data, kind)
          local value = json.decode(data)
          -- the stream's last word (a revoked token): said, and the follow ends
          if kind == "error" then return require("tenement.client").error_message("in the stream", value) end
          if type(value) == "table" and value.time then show({ value }) end
        end)
      if not ok then ctx.err:write("ten logs: ", err, "\n") return 1 end
      -- the server ends a follow only when it stops
      ctx.err:write("ten logs: the server ended the stream (it is stopping)\n")
      return 1
    end)
  end,
}

local function int_check(lo, hi)
  return function(v)
    local n = whole_number(v)
    if n and n >= lo and (not hi or n <= hi) then return n end
    return nil, hi and string.format("expected a whole number from %d to %d", lo, hi)
      or string.format("expected a whole number >= %d", lo)
  end
end

command {
  name = "weight",
  summary = "Set an instance's share of its service's traffic (0-100, 0 drains)",
  usage = "ten weight SERVICE:ID WEIGHT",
  max_args = 2,
  run = function(ctx, args)
    local service, id = target_arg(ctx, by_name.weight, args)
    if not service then return 2 end
    local w, werr = int_check(0, 100)(args[2] or "")
    if not w then
      ctx.err:write("ten weight: WEIGHT ", args[2] and ("'" .. args[2] .. "': ") or "is missing: ", werr,
        "\nUsage: ", by_name.weight.usage, "\n")
      return 2
    end
    return with_server(ctx, function(c)
      local status, v = c:request("PUT", "/api/instances/" .. service .. ":" .. id .. "/weight", { weight = w })
      if status ~= 200 then return report_failure(ctx, "weight", status, v) end
      ctx.out:write(v.instance, " weight ", v.weight, "\n")
      return 0
    end)
  end,
}

command {
  name = "route",
  summary = "Show a service's weights, or move one instance's traffic to another",
  usage = "ten route SERVICE [--from ID --to ID]",
  description = "With --from and --to: the --to instance is started if needed and health-\n" ..
    "checked, then gets weight 100 and --from gets 0, at once (blue-green).\n" ..
    "Weights are relative: other instances of the service keep theirs, and\n" ..
    "each instance gets its weight over the sum of all of them.",
  max_args = 1,
  options = {
    { long = "from", arg = "ID", help = "the instance that gives up its traffic" },
    { long = "to", arg = "ID", help = "the instance that takes its traffic (weight 100)" },
  },
  run = function(ctx, args)
    local service = args[1]
    local ok, err = require("tenement.config").valid_name(service or "")
    if not service or not ok then
      ctx.err:write("ten route: ", service and ("service " .. err) or "missing SERVICE",
        "\nUsage: ", by_name.route.usage, "\n")
      return 2
    end
    if (ctx.opts.from == nil) ~= (ctx.opts.to == nil) then
      ctx.err:write("ten route: give both --from and --to\nUsage: ", by_name.route.usage, "\n")
      return 2
    end
    return with_server(ctx, function(c)
      if ctx.opts.from then
        local status, v = c:request("POST", "/api/route", { service = service, from = ctx.opts.from, to = ctx.opts.to })
        if status ~= 200 then return report_failure(ctx, "route", status, v) end
        ctx.out:write(string.format("%s: weight %d\n%s: weight %d\n", v.from_instance, v.from_weight,
          v.to_instance, v.to_weight))
        return 0
      end
      local status, v = c:request("GET", "/api/routes/" .. service)
      if status ~= 200 then return report_failure(ctx, "route", status, v) end
      local rows = {}
      for _, i in ipairs(v.instances) do rows[#rows + 1] = { i.instance, tostring(i.weight), i.state } end
      ctx.out:write(table_text({ "INSTANCE", "WEIGHT", "STATE" }, rows))
      return 0
    end)
  end,
}

command {
  name = "deploy",
  summary = "Start a new version, wait until healthy, then give it traffic",
  usage = "ten deploy SERVICE:VERSION [-w WEIGHT] [--timeout SECONDS]",
  description = "The new instance starts with weight 0 and gets WEIGHT only once it is\n" ..
    "healthy. If it fails or is not healthy in time, it is removed and nothing\n" ..
    "else changes. Move the rest of the traffic with `ten route` or `ten weight`.\n" ..
    "VERSION is the new instance's id: it runs the service as the server has it\n" ..
    "loaded (after an edit of the file, `ten reload` first), and differs from the\n" ..
    "others through {id} in its command, args or env (e.g. command = \"./app-{id}\").",
  max_args = 1,
  options = {
    { long = "weight", short = "w", arg = "WEIGHT", help = "weight once healthy (default 100)", check = int_check(0, 100) },
    { long = "timeout", arg = "SECONDS", help = "how long it has to become healthy (default 30)", check = int_check(1) },
  },
  run = function(ctx, args)
    local service, version = target_arg(ctx, by_name.deploy, args)
    if not service then return 2 end
    return with_server(ctx, function(c)
      local status, v = c:request("POST", "/api/deploy", { service = service, version = version,
        weight = ctx.opts.weight or 100, timeout = ctx.opts.timeout or 30 }, ((ctx.opts.timeout or 30) + 30) * 1000)
      if status ~= 200 then return report_failure(ctx, "deploy", status, v) end
      ctx.out:write(string.format("%s is %s with weight %d\n", v.instance, v.status, v.weight))
      return 0
    end)
  end,
}

-- Runs fn(store) in a task on the server's store (token commands work
-- whether or not a server runs: SQLite in WAL mode has room for both).
local function with_store(ctx, fn)
  local dir = data_dir(ctx)
  if not dir then return 1 end
  local core = require "tenement.core"
  return core.run(function()
    local ok, err = core.fs.mkdir(dir, tonumber("711", 8))
    if not ok then ctx.err:write("ten: data_dir ", err, "\n") return 1 end
    local private, perr = require("tenement.server").private_store(dir .. "/tenement.db")
    if not private then ctx.err:write("ten: ", perr, "\n") return 1 end
    local store, serr = require("tenement.store").open(dir .. "/tenement.db")
    if not store then ctx.err:write("ten: ", serr, "\n") return 1 end
    local code = fn(store)
    store:close()
    return code
  end)
end

command {
  name = "rollout",
  summary = "Replace a service's running instances one by one, with no dropped request",
  usage = "ten rollout SERVICE",
  description = "Reads the service's definition from tenement.toml again, then for each\n" ..
    "running instance: starts the new process on a fresh socket, waits until it is\n" ..
    "healthy, switches traffic to it, lets the old one finish its requests and\n" ..
    "stops it. On the first failure it stops and puts back the old version.",
  max_args = 1,
  run = function(ctx, args)
    local service = args[1]
    local ok, err = require("tenement.config").valid_name(service or "")
    if not service or not ok then
      ctx.err:write("ten rollout: ", service and ("service " .. err) or "missing SERVICE", "\nUsage: ten rollout SERVICE\n")
      return 2
    end
    return with_server(ctx, function(c)
      local status, v = c:request("POST", "/api/services/" .. service .. "/rollout", nil, 3600 * 1000)
      if status ~= 200 then return report_failure(ctx, "rollout", status, v) end
      ctx.out:write(string.format("%s: %d instance(s) replaced\n", v.service, v.replaced))
      return 0
    end)
  end,
}

command {
  name = "token-gen",
  local_only = true,
  summary = "Create an API token and print it once",
  usage = "ten token-gen [--name NAME] [--tenant SERVICE:ID|ID] [--description TEXT]",
  description = "Prints a new bearer token (43 characters). Only its hash is stored: copy it\n" ..
    "now, it cannot be shown again. A --tenant token only reaches that instance\n" ..
    "(SERVICE:ID), or that id in every service (ID), on every path including logs.",
  options = {
    { long = "name", arg = "NAME", help = "a name to list and revoke it by (default: made up)" },
    { long = "tenant", arg = "SCOPE", help = "limit the token to SERVICE:ID, or to ID in every service" },
    { long = "description", arg = "TEXT", help = "what the token is for" },
  },
  run = function(ctx)
    local auth = require "tenement.auth"
    if ctx.opts.tenant then
      local scope, err = auth.parse_scope(ctx.opts.tenant)
      if not scope then ctx.err:write("ten token-gen: --tenant ", ctx.opts.tenant, ": ", err, "\n") return 2 end
      -- made all the same (the service may be added later), but a typo here
      -- would only show as a token that reaches nothing
      local services, path = file_services(ctx)
      if scope.service and services and not services[scope.service] then
        ctx.err:write(string.format("ten token-gen: warning: %s defines no service %q: the token reaches nothing "
          .. "until it does\n", path, scope.service))
      end
    end
    local name = ctx.opts.name
    if name and not (name:match("^[%w._-]+$") and #name <= 64) then
      ctx.err:write("ten token-gen: --name may hold up to 64 letters, digits, '.', '_' and '-'\n")
      return 2
    end
    local description = ctx.opts.description
    if description and (#description > 200 or description:find("[%c]")) then
      ctx.err:write("ten token-gen: --description is one line of at most 200 bytes, without control characters\n")
      return 2
    end
    return with_store(ctx, function(store)
      local token, prefix, hash = auth.new_token()
      name = name or ("token-" .. prefix:lower():gsub("[^%w]", "x"))
      local ok, err = store:token_create(name, prefix, hash, ctx.opts.tenant, ctx.opts.description)
      if not ok then ctx.err:write("ten token-gen: ", err, "\n") return 1 end
      ctx.out:write(token, "\n")
      ctx.err:write("token ", name, ctx.opts.tenant and (" for " .. ctx.opts.tenant) or " (admin)",
        " created; it is shown only this once\n")
      return 0
    end)
  end,
}

command {
  name = "token-list",
  local_only = true,
  summary = "List API tokens (names and scopes, never the tokens)",
  usage = "ten token-list",
  run = function(ctx)
    return with_store(ctx, function(store)
      local rows, err = store:tokens()
      if not rows then ctx.err:write("ten token-list: ", err, "\n") return 1 end
      if #rows == 0 then ctx.out:write("no tokens (create one with `ten token-gen`)\n") return 0 end
      local out = {}
      for _, r in ipairs(rows) do
        out[#out + 1] = { printable(r.name), r.prefix .. "...", printable(r.tenant or "admin"), os.date("!%Y-%m-%d %H:%M", math.floor(r.created_at)),
          r.last_used and os.date("!%Y-%m-%d %H:%M", math.floor(r.last_used)) or "-", printable(r.description or "") }
      end
      ctx.out:write(table_text({ "NAME", "STARTS WITH", "SCOPE", "CREATED", "LAST USED", "DESCRIPTION" }, out))
      return 0
    end)
  end,
}

command {
  name = "token-revoke",
  local_only = true,
  summary = "Revoke an API token by name",
  usage = "ten token-revoke NAME",
  max_args = 1,
  run = function(ctx, args)
    if not args[1] then ctx.err:write("ten token-revoke: missing NAME\nUsage: ten token-revoke NAME\n") return 2 end
    return with_store(ctx, function(store)
      local ok, err = store:token_revoke(args[1])
      if not ok then ctx.err:write("ten token-revoke: ", err, "\n") return 1 end
      ctx.out:write("token ", args[1], " revoked\n")
      return 0
    end)
  end,
}

command {
  name = "reload",
  summary = "Apply changes of tenement.toml to the running server (also: SIGHUP)",
  usage = "ten reload",
  description = "New services and [instances] start, removed services stop, changed services\n" ..
    "are rolled out (see `ten rollout`), except for a change of idle_timeout, on_demand,\n" ..
    "max_instances, startup_timeout, health or restart alone, which reaches the running\n" ..
    "instances without replacing them (as does any change to a service none of whose\n" ..
    "instances runs: they take it at their next start). Settings that need a restart of ten serve (listen,\n" ..
    "port, data_dir and the front door's limits) are named in the answer. The server\n" ..
    "re-reads the file it was started with: --config here only finds the server.",
  run = function(ctx)
    return with_server(ctx, function(c)
      local status, v = c:request("POST", "/api/reload", nil, 3600 * 1000)
      if status ~= 200 and status ~= 409 then return report_failure(ctx, "reload", status, v) end
      local function list(t) return #t > 0 and table.concat(t, ", ") or "-" end
      ctx.out:write("added: ", list(v.added), "\nremoved: ", list(v.removed), "\nrolled out: ",
        list(v.rolled_out), "\n")
      local waiting, live = {}, {}
      for _, name in ipairs(v.waiting or {}) do waiting[name] = true end
      for _, name in ipairs(v.updated or {}) do if not waiting[name] then live[#live + 1] = name end end
      if #live > 0 then ctx.out:write("updated without a restart: ", list(live), "\n") end
      if v.waiting and #v.waiting > 0 then
        ctx.out:write("taken at the next start (no instance running): ", list(v.waiting), "\n")
      end
      if v.applied and #v.applied > 0 then ctx.out:write("applied: ", list(v.applied), "\n") end
      local changed = #v.added + #v.removed + #v.rolled_out + #(v.updated or {}) + #(v.applied or {})
        + #v.restart_needed + #v.failed
      if changed == 0 then
        -- the app's own files are not the server's to watch
        ctx.out:write("nothing changed in ", v.config or "the file", " (a new version of an app's own code is "
          .. "started with `ten rollout SERVICE`)\n")
      end
      if #v.restart_needed > 0 then
        ctx.out:write("needs a restart of ten serve: ", list(v.restart_needed), "\n")
      end
      for _, w in ipairs(v.warnings or {}) do ctx.err:write("warning: ", w, "\n") end
      if #v.failed > 0 then
        ctx.err:write("ten reload: ", table.concat(v.failed, "\n"), "\n")
        return 1
      end
      -- --config finds the server (its data_dir); the server reads its own file
      local named = ctx.opts.config and require("tenement.core").fs.realpath(ctx.opts.config)
      if named and v.config and named ~= v.config then
        ctx.err:write("ten reload: the server read its own file, ", v.config, ", not ", ctx.opts.config,
          ": a reload re-reads the file ten serve was started with; to serve ", ctx.opts.config,
          ", restart ten serve with --config ", ctx.opts.config, "\n")
        return 1
      end
      return 0
    end)
  end,
}

command {
  name = "init",
  local_only = true,
  summary = "Write a starter tenement.toml for the app in this directory",
  usage = "ten init [--name NAME] [--command CMD] [--force] [--config FILE]",
  description = "Looks at the current directory (pyproject.toml or requirements.txt: Python;\n" ..
    "package.json: Node; go.mod: Go; Cargo.toml: Rust; else an executable named\n" ..
    "like the directory) and writes a tenement.toml that runs it (or FILE, with\n" ..
    "--config FILE).",
  options = {
    { long = "name", arg = "NAME", help = "service name (default: the directory's name)",
      check = function(v) return require("tenement.config").valid_name(v) end },
    { long = "command", arg = "CMD", help = "the command that starts the app (default: detected)" },
    { long = "force", help = "overwrite an existing tenement.toml" },
  },
  run = function(ctx)
    local starter = require "tenement.starter"
    local core = require "tenement.core"
    local cwd = core.fs.cwd()
    local text, err = starter.generate(cwd, { name = ctx.opts.name, command = ctx.opts.command, env = ctx.env })
    if not text then ctx.err:write("ten init: ", err, "\n") return 1 end
    -- --config names the file the other commands will read: write that one.
    local path = ctx.opts.config and absolute(ctx.opts.config) or (cwd .. "/tenement.toml")
    if core.fs.stat(path) and not ctx.opts.force then
      ctx.err:write("ten init: ", path, " already exists (use --force to overwrite it)\n")
      return 1
    end
    local ok, werr = core.fs.write(path, text)
    if not ok then ctx.err:write("ten init: ", werr, "\n") return 1 end
    ctx.out:write("wrote ", path, "\n", text)
    return 0
  end,
}

command {
  name = "version",
  no_config = true,
  summary = "Print the version",
  usage = "ten version",
  run = function(ctx)
    ctx.out:write("ten ", VERSION, "\n")
    return 0
  end,
}

command {
  name = "help",
  no_config = true,
  summary = "Show help for a command",
  usage = "ten help [COMMAND]",
  max_args = 1,
  run = function(ctx, args)
    local name = args[1]
    if not name then ctx.out:write(main_help()) return 0 end
    local c = by_name[name]
    if not c then
      local names = {}
      for _, x in ipairs(commands) do names[#names + 1] = x.name end
      ctx.err:write(string.format("ten help: unknown command '%s'%s\nRun 'ten --help' for the list of commands.\n",
        name, command_hint(name, names)))
      return 2
    end
    ctx.out:write(command_help(c))
    return 0
  end,
}

---------------------------------------------------------------------------

-- cli.main(args [, io]) -> exit code. io = { out =, err =, env = } for tests.
function cli.main(args, io_override)
  io_override = io_override or {}
  local ctx = {
    out = io_override.out or io.stdout,
    err = io_override.err or io.stderr,
    env = io_override.env or environment(),
  }

  -- the command is the first argument that is not an option (or an option's value)
  local name, rest = nil, {}
  local i = 1
  while i <= #args do
    local a = args[i]
    if not name and a:sub(1, 1) ~= "-" then
      name = a
    else
      rest[#rest + 1] = a
      if not name and (a == "--config" or a == "--data-dir" or a == "--server" or a == "--token") then
        i = i + 1
        rest[#rest + 1] = args[i]
      end
    end
    i = i + 1
  end

  local cmd = name and by_name[name]
  if name and not cmd then
    local names = {}
    for _, c in ipairs(commands) do names[#names + 1] = c.name end
    local hint = command_hint(name, names)
    -- `ten -p 8080 serve`: the option's value was taken for the command (a
    -- command named after it says so better than a guess at "80" -> "ps")
    local later, others = nil, {}
    for _, a in ipairs(args) do
      if not later and by_name[a] then later = a else others[#others + 1] = a end
    end
    if later and #rest > 0 then
      hint = string.format(" (options other than --config, --data-dir, --server and --token go after the "
        .. "command: ten %s %s)", later, table.concat(others, " "))
    end
    ctx.err:write(string.format("ten: unknown command '%s'%s\nRun 'ten --help' for the list of commands.\n",
      name, hint or ""))
    return 2
  end

  local ok, opts, positional = pcall(parse_args, cmd, rest)
  if not ok then
    if getmetatable(opts) == UsageError then
      ctx.err:write("ten", cmd and (" " .. cmd.name) or "", ": ", opts.msg, "\n")
      ctx.err:write("Usage: ", cmd and cmd.usage or "ten [--config FILE] COMMAND [ARGS...]", "\n")
      return 2
    end
    error(opts, 0)
  end
  ctx.opts = opts
  ctx.command = cmd and cmd.name

  if opts.version then ctx.out:write("ten ", VERSION, "\n") return 0 end
  if opts.help or not cmd then
    ctx.out:write(cmd and command_help(cmd) or main_help())
    return cmd and 0 or (opts.help and 0 or 2)
  end
  -- `ten --server URL token-gen` would make a token in the local store that
  -- the remote server has never heard of: refuse rather than ignore.
  for _, o in ipairs { "server", "token" } do
    if cmd.local_only and opts[o] then
      ctx.err:write(string.format("ten %s: --%s does not apply: this command works on this machine's"
        .. " files, not through a server; run it where the server runs\nUsage: %s\n", cmd.name, o, cmd.usage))
      return 2
    end
  end
  if #positional > (cmd.max_args or 0) then
    ctx.err:write(string.format("ten %s: unexpected argument '%s'\nUsage: %s\n", cmd.name,
      positional[(cmd.max_args or 0) + 1], cmd.usage))
    return 2
  end
  return cmd.run(ctx, positional) or 0
end

cli.version = VERSION
cli.commands = commands

return cli
