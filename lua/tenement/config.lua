-- tenement.config: turns tenement.toml into a plain, fully defaulted, validated table.
--
-- The schema below is declarative: one table of field rows per section, so a new setting
-- is one new row (name, type, default, limits, doc). Validation never stops at the first
-- problem: every problem found is reported, one per line, as
--   file:line:col: key = value: what is wrong, and what is allowed
-- so a user fixes a config in one round trip instead of one error at a time.
--
-- Templates. `socket`, `command`, `args`, `workdir` and `env` values of a service (and
-- `data_dir`, `settings.tls.cache_dir`) may contain the placeholders
--   {name} {id} {data_dir} {socket} {port} {instance_dir}   and   ${VAR} (host environment)
-- There is no escaping: `{{` and `}}` are not special. A brace that does not form one of
-- the placeholders above is an error at load time, so a typo such as `{nmae}` can never
-- reach a spawned process as literal text. `$` not followed by `{` is plain text.
-- Service templates stay unexpanded in the cfg (they are per instance); `instance_vars`
-- builds the values for one instance and `expand` substitutes them in one pass, so text
-- that comes from a variable is never expanded again.
--
-- API
--   find(cli_path, env)            -> path, origin ("--config" | "TENEMENT_CONFIG" | "default")
--   load(path, env)                -> cfg | nil, err       (reads the file, then parse)
--   parse(text, source, env)       -> cfg | nil, err, list (env: host variables for ${VAR})
--   check(doc, source, env, text)  -> the same, for an already parsed document
--   defaults()                     -> cfg of an empty file
--   valid_name(s)                  -> true | nil, reason   (service names and instance ids)
--   expand(template, vars)         -> string | nil, err
--   instance_vars(cfg, service, id, port) -> vars | nil, err   (at spawn time)
--   resolve(cfg, service, id, port)       -> every template of one instance expanded
--   schema                         -> the field rows, for `ten config` and the docs
-- cfg = { source, settings = { ..., tls = {...} }, services = { [name] = { name, section,
--   line, command, args, workdir, socket, health, startup_timeout, idle_timeout, restart,
--   isolation, memory_limit_mb, cpu_shares, storage_quota_mb, storage_persist, env } },
--   service_names = { sorted }, instances = { { service, id }, ... in file order },
--   routing = { default, subdomain = { label = service }, path = { { prefix, service },
--   ... longest first } }, hooks = { router }, host_env = { VAR = value } }
--
-- Pure Lua: the only I/O is reading the file in `load`.

local toml = require("tenement.toml")
local command = require("tenement.command")
local router = require("tenement.router")
local hook_box = require("tenement.hooks")

local config = {}

local DEFAULT_PATH = "./tenement.toml"
local SOCKET_PATH_MAX = 107 -- sun_path is 108 bytes including the terminating NUL

---------------------------------------------------------------------------------------
-- Small helpers
---------------------------------------------------------------------------------------

-- The TOML kind of a value: string, integer, float, boolean, table, array, datetime.
-- Plain Lua tables (hand-built docs, `defaults`) are classified by shape; an empty one
-- is "empty" and accepted both as a table and as an array.
local function kind(v)
  local t = type(v)
  if t == "number" then return math.type(v) end
  if t ~= "table" then return t end
  local mt = getmetatable(v)
  if mt ~= nil then
    if mt == toml.array_mt then return "array" end
    if mt == toml.datetime_mt then return "datetime" end
    return "table"
  end
  if next(v) == nil then return "empty" end
  if v[1] ~= nil then return "array" end
  return "table"
end

local function is_kind(v, want)
  local k = kind(v)
  return k == want or (k == "empty" and (want == "table" or want == "array"))
end

local ARTICLE = {
  string = "a string", integer = "an integer", float = "a float", boolean = "a boolean",
  table = "a table", array = "an array", datetime = "a date-time", empty = "an empty table",
  ["nil"] = "nothing",
}
local function a(k) return ARTICLE[k] or ("a " .. k) end

local function sorted_keys(t)
  local keys = {}
  for k in pairs(t) do keys[#keys + 1] = k end
  table.sort(keys, function(x, y) return tostring(x) < tostring(y) end)
  return keys
end

local function copy(v)
  if type(v) ~= "table" then return v end
  local out = {}
  for k, x in pairs(v) do out[k] = copy(x) end
  return out
end

-- A key as TOML would print it: bare when it can be, quoted otherwise.
local function quote(s)
  s = s:gsub('[%c"\\]', function(c)
    if c == '"' then return '\\"' end
    if c == "\\" then return "\\\\" end
    if c == "\n" then return "\\n" end
    if c == "\t" then return "\\t" end
    return ("\\u%04X"):format(c:byte())
  end)
  return '"' .. s .. '"'
end

local function key_text(k)
  k = tostring(k)
  if k:match("^[A-Za-z0-9_%-]+$") then return k end
  return quote(k)
end

local function join(path, key)
  if path == nil or path == "" then return key_text(key) end
  return path .. "." .. key_text(key)
end

local SHOW_MAX = 60

-- A value as TOML text, shortened: what the user wrote, so they can find it.
local function show(v)
  local k = kind(v)
  local s
  if k == "string" then
    s = quote(v)
    if #s > SHOW_MAX then s = s:sub(1, SHOW_MAX - 4) .. '..."' end
    return s
  elseif k == "integer" or k == "boolean" then
    return tostring(v)
  elseif k == "float" then
    if v ~= v then return "nan" end
    if v == math.huge then return "inf" end
    if v == -math.huge then return "-inf" end
    return tostring(v)
  elseif k == "array" or k == "empty" then
    local items = {}
    for i = 1, #v do
      items[i] = show(v[i])
      -- an array of tables (`[[x]]`) has no short text; "[]" would say it is empty
      if items[i] == nil then return nil end
    end
    s = "[" .. table.concat(items, ", ") .. "]"
    if #s > SHOW_MAX then s = s:sub(1, SHOW_MAX - 4) .. "...]" end
    return s
  elseif k == "datetime" then
    local mt = getmetatable(v)
    if mt and mt.__tostring then return tostring(v) end
    return "<date-time>"
  end
  return nil -- tables are shown by their key only
end

-- Restricted Damerau-Levenshtein distance (a swap of two letters costs 1), case-blind.
local function distance(s, t)
  s, t = s:lower(), t:lower()
  local n, m = #s, #t
  if n == 0 then return m end
  if m == 0 then return n end
  local d = {}
  for i = 0, n do d[i] = { [0] = i } end
  for j = 0, m do d[0][j] = j end
  for i = 1, n do
    local si = s:byte(i)
    for j = 1, m do
      local tj = t:byte(j)
      local cost = (si == tj) and 0 or 1
      local v = math.min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + cost)
      if i > 1 and j > 1 and si == t:byte(j - 1) and s:byte(i - 1) == tj then
        v = math.min(v, d[i - 2][j - 2] + 1)
      end
      d[i][j] = v
    end
  end
  return d[n][m]
end

-- The nearest candidate close enough to be a likely typo, or nil.
local function nearest(word, candidates)
  word = tostring(word)
  local limit = math.max(1, math.min(3, #word // 3))
  local best, best_d
  for _, c in ipairs(candidates) do
    local d = distance(word, c)
    if d <= limit and (best_d == nil or d < best_d) then best, best_d = c, d end
  end
  return best
end

local function did_you_mean(word, candidates, fmt)
  local s = nearest(word, candidates)
  if s then return (fmt or '; did you mean "%s"?'):format(s) end
  return ""
end

local function dirname(path)
  local dir = path:match("^(.*)/[^/]*$")
  if dir == nil then return "." end
  if dir == "" then return "/" end
  return dir
end

-- Lexical normalization: drops "." segments and empty segments, folds "x/..".
local function normalize_path(p)
  local absolute = p:sub(1, 1) == "/"
  local segs = {}
  for seg in p:gmatch("[^/]+") do
    if seg == ".." then
      if #segs > 0 and segs[#segs] ~= ".." then
        segs[#segs] = nil
      elseif not absolute then
        segs[#segs + 1] = ".."
      end
    elseif seg ~= "." then
      segs[#segs + 1] = seg
    end
  end
  local r = table.concat(segs, "/")
  if absolute then return "/" .. r end
  if r == "" then return "." end
  return r
end

local function resolve_path(p, base)
  if p:sub(1, 1) == "/" or base == nil then return normalize_path(p) end
  return normalize_path(base .. "/" .. p)
end

---------------------------------------------------------------------------------------
-- Names, labels, addresses
---------------------------------------------------------------------------------------

local NAME_RULE = 'names use 1-63 characters from a-z, 0-9 and "-", starting with a letter'
  .. " or digit, because they become socket paths, directories and DNS labels"

-- The character at byte i of s, quoted and whole ("ü", not "\195");
-- bytes that are no UTF-8 character as bytes \xNN, not sent to a terminal.
local function character_at(s, i)
  local ch = s:match(utf8.charpattern, i) or s:sub(i, i)
  if utf8.len(ch) then return quote(ch) end
  return "bytes " .. ch:gsub(".", function(b) return string.format("\\x%02x", b:byte()) end)
end

-- true, or nil and why not. Used for service names and instance ids alike (and by the
-- CLI and the API), so an id can never carry "/" or ".." into a path.
function config.valid_name(s)
  if type(s) ~= "string" then
    return nil, ("expected a string, got %s"):format(a(kind(s)))
  end
  local why
  if s == "" then
    why = "it is empty"
  elseif #s > 63 then
    why = ("it is %d characters long"):format(#s)
  elseif s:sub(1, 1):match("[A-Z]") then
    why = ("uppercase %s is not allowed"):format(quote(s:sub(1, 1)))
  elseif not s:sub(1, 1):match("[a-z0-9]") then
    why = ("it starts with %s"):format(character_at(s, 1))
  else
    local at = s:find("[^a-z0-9%-]")
    local bad = at and character_at(s, at)
    if bad then
      if bad:match("[A-Z]") then
        why = ("uppercase %s is not allowed"):format(bad)
      else
        why = ("%s is not allowed"):format(bad)
      end
    end
  end
  if why == nil then return true end
  return nil, ("not a valid name: %s; %s"):format(why, NAME_RULE)
end

local function valid_dns_label(l)
  return #l >= 1 and #l <= 63
    and (l:match("^[A-Za-z0-9]$") or l:match("^[A-Za-z0-9][A-Za-z0-9%-]*[A-Za-z0-9]$")) ~= nil
end

local LABEL_RULE = 'a DNS label is 1-63 letters, digits and "-", not starting or ending with "-"'

local function check_dns_label(s)
  if valid_dns_label(s) then return true, s:lower() end
  return nil, ("not a valid DNS label: %s"):format(LABEL_RULE)
end

local function check_dns_name(s)
  if s == "" then return nil, 'expected a DNS name like "example.com", got an empty string' end
  if #s > 253 then
    return nil, ("a DNS name is at most 253 characters, this one is %d"):format(#s)
  end
  for label in (s .. "."):gmatch("([^.]*)%.") do
    if not valid_dns_label(label) then
      return nil, ('expected a DNS name like "example.com": label %s is not valid (%s)')
        :format(quote(label), LABEL_RULE)
    end
  end
  return true, s:lower() -- host names compare case-blind; the router sees lowercase only
end

local function is_ipv4(s)
  local parts = { s:match("^(%d+)%.(%d+)%.(%d+)%.(%d+)$") }
  if #parts ~= 4 then return false end
  for _, p in ipairs(parts) do
    if #p > 3 or tonumber(p) > 255 or (#p > 1 and p:sub(1, 1) == "0") then return false end
  end
  return true
end

local function is_ipv6(s)
  if not s:find(":", 1, true) or s:find("[^%x:%.]") or s:find(":::", 1, true) then
    return false
  end
  local head, v4 = s:match("^(.*:)(%d+%.[%d%.]+)$")
  if v4 then
    if not is_ipv4(v4) then return false end
    s = head .. "0:0"
  end
  local function groups(part)
    if part == "" then return 0 end
    local n = 0
    for g in (part .. ":"):gmatch("([^:]*):") do
      if #g < 1 or #g > 4 then return nil end
      n = n + 1
    end
    return n
  end
  local left, right = s:match("^(.-)::(.*)$")
  if left then
    if right:find("::", 1, true) then return false end
    local l, r = groups(left), groups(right)
    return l ~= nil and r ~= nil and l + r <= 7
  end
  return groups(s) == 8
end

local function check_address(s)
  if is_ipv4(s) or is_ipv6(s) then return true end
  -- the form nginx and most servers take: the port has a key of its own here
  local host, port = s:match("^%[(.*)%]:(%d+)$")
  if not (host and is_ipv6(host)) then host, port = s:match("^([^:]*):(%d+)$") end
  if host and (is_ipv4(host) or is_ipv6(host) or host == "localhost" or host == "") then
    return nil, string.format('the port goes in a key of its own: listen = "%s" and port = %s',
      host == "" and "0.0.0.0" or host == "localhost" and "127.0.0.1" or host, port)
  end
  return nil, "expected an IP address to listen on, like 127.0.0.1, 0.0.0.0, ::1 or ::"
end

local function check_email(s)
  if s:match("^[^@%s]+@[^@%s]+%.[^@%s]+$") then return true end
  return nil, 'expected an email address like "admin@example.com"'
end

local function check_http_path(s)
  if s:sub(1, 1) ~= "/" then return nil, 'expected an HTTP path starting with "/", like "/health"' end
  local bad = s:find("[%s%c\128-\255]")
  if not bad then return true end
  -- it starts with "/": what is wrong is elsewhere
  return nil, ("an HTTP path holds only visible ASCII (%s at byte %d is not): escape the rest as %%XX, like %%20 "
    .. "for a space"):format(character_at(s, bad), bad)
end

local function check_env_name(s)
  if s:match("^[A-Za-z_][A-Za-z0-9_]*$") then return true end
  return nil, 'not a valid environment variable name: use letters, digits and "_",'
    .. " not starting with a digit"
end

local function check_path_prefix(s)
  if s:sub(1, 1) ~= "/" then
    return nil, 'a path prefix must start with "/", like "/api"'
  end
  if s:find("[%s%c?#]") then
    return nil, "a path prefix must not contain spaces, control characters, \"?\" or \"#\""
  end
  return true
end

-- References to services are checked once every service is known (ctx.services).
local function check_service_ref(s, ctx)
  if ctx.services[s] then return true end
  local names = ctx.service_names
  if #names == 0 then
    return nil, ("no service %s is defined (there are no [service.NAME] sections)")
      :format(quote(s))
  end
  local hint = did_you_mean(s, names)
  if hint == "" then
    -- only the names that load: a bad one has its own error already
    local valid = {}
    for _, n in ipairs(names) do if config.valid_name(n) then valid[#valid + 1] = n end end
    hint = #valid > 0 and ("; defined services: " .. table.concat(valid, ", ")) or ""
  end
  return nil, ("no service %s is defined%s"):format(quote(s), hint)
end

---------------------------------------------------------------------------------------
-- Templates
---------------------------------------------------------------------------------------

local PLACEHOLDERS = { "name", "id", "data_dir", "socket", "port", "instance_dir" }
local IS_PLACEHOLDER = {}
for _, p in ipairs(PLACEHOLDERS) do IS_PLACEHOLDER[p] = true end

local KNOWN_TEXT = "{name}, {id}, {data_dir}, {socket}, {port}, {instance_dir}"
  .. " and ${VAR} for a host environment variable"

-- Splits a template into parts: { text = "..." }, { ph = "name" }, { var = "NAME" }.
-- Returns nil, message when a brace does not form a placeholder.
local function parse_template(s)
  local parts = {}
  local i, n = 1, #s
  while i <= n do
    local c = s:sub(i, i)
    if c == "$" and s:sub(i + 1, i + 1) == "{" then
      local j = s:find("}", i + 2, true)
      if not j then
        return nil, ('unterminated "${" at character %d; write ${VAR}'):format(i)
      end
      local name = s:sub(i + 2, j - 1)
      if not name:match("^[A-Za-z_][A-Za-z0-9_]*$") then
        return nil, ('"${%s}" is not a valid environment variable reference; write ${VAR}'
          .. ' with letters, digits and "_"'):format(name)
      end
      parts[#parts + 1] = { var = name }
      i = j + 1
    elseif c == "{" then
      local name = s:match("^{([%w_]+)}", i)
      if not name then
        return nil, ('"{" at character %d does not start a placeholder; braces are only'
          .. " allowed in %s"):format(i, KNOWN_TEXT)
      end
      parts[#parts + 1] = { ph = name }
      i = i + #name + 2
    elseif c == "}" then
      return nil, ('"}" at character %d does not close a placeholder; braces are only'
        .. " allowed in %s"):format(i, KNOWN_TEXT)
    else
      local j = s:find("[{}$]", i + 1) or (n + 1)
      parts[#parts + 1] = { text = s:sub(i, j - 1) }
      i = j
    end
  end
  return parts
end

-- Substitutes placeholders and ${VAR} in one pass. vars = { name=, id=, data_dir=,
-- socket=, port=, instance_dir=, env = { VAR = value } }. Returns string | nil, err.
function config.expand(template, vars)
  if type(template) ~= "string" then
    return nil, ("template: expected a string, got %s"):format(a(kind(template)))
  end
  vars = vars or {}
  local parts, err = parse_template(template)
  if not parts then return nil, err end
  local out = {}
  for _, p in ipairs(parts) do
    if p.text then
      out[#out + 1] = p.text
    elseif p.ph then
      if not IS_PLACEHOLDER[p.ph] then
        return nil, ("unknown placeholder {%s}; known placeholders are %s%s")
          :format(p.ph, KNOWN_TEXT, did_you_mean(p.ph, PLACEHOLDERS, "; did you mean {%s}?"))
      end
      local v = vars[p.ph]
      if v == nil then
        return nil, ("{%s} has no value here"):format(p.ph)
      end
      out[#out + 1] = tostring(v)
    else
      local v = (vars.env or {})[p.var]
      if v == nil then
        return nil, ("%s is not set in the environment of ten serve"):format(p.var)
      end
      out[#out + 1] = tostring(v)
    end
  end
  return table.concat(out)
end

-- The socket is only known per instance, but a template that cannot give an
-- absolute path, or whose fixed part is already too long, fails every spawn:
-- say so at load time, with the line. Runs after the template check passed.
local function check_socket_template(s, ctx)
  local parts = parse_template(s)
  local first, start = parts[1], ""
  if first.text then
    start = first.text
  elseif first.var then
    start = tostring(ctx.env[first.var] or "")
  elseif first.ph == "data_dir" or first.ph == "instance_dir" then
    start = "/"
  end
  if start:sub(1, 1) ~= "/" then
    return nil, 'must be an absolute path: start it with "/", {data_dir}, {instance_dir} or'
      .. " a ${VAR} that holds one"
  end
  local len = 0
  for _, p in ipairs(parts) do
    if p.text then
      len = len + #p.text
    elseif p.var then
      len = len + #tostring(ctx.env[p.var] or "")
    else
      len = len + 1 -- every placeholder's value has at least one character
    end
  end
  if len > SOCKET_PATH_MAX then
    return nil, ("expanded, it is at least %d bytes long, and Unix sockets allow at most %d:"
      .. " use a shorter directory"):format(len, SOCKET_PATH_MAX)
  end
  return true
end

local ALL = {}
for _, p in ipairs(PLACEHOLDERS) do ALL[p] = true end

local PER_INSTANCE = {
  allowed = ALL,
}
local SOCKET_TEMPLATE = {
  allowed = { name = true, id = true, data_dir = true, port = true, instance_dir = true },
  why = { socket = "the socket template cannot refer to itself" },
}
local GLOBAL_ONLY = {
  allowed = {},
  because = "data_dir is global, not per instance",
  resolve = true, -- expanded at load time (only ${VAR} can appear)
}
local CACHE_TEMPLATE = {
  allowed = { data_dir = true },
  because = "the certificate cache is global, not per instance",
}

---------------------------------------------------------------------------------------
-- Schema. Row keys:
--   name      key in the section
--   type      string | integer | boolean | array (of `items`) | map (string -> `values`)
--             | section (a sub-table checked with `schema`)
--   default   value when absent (copied); absent and no default = not set (nil)
--   required  an error when absent
--   nonempty  strings: an error when empty or only spaces
--   min, max  integers: inclusive range
--   limit     integers: { max, unit } the largest value the server can convert to unit
--   one_of    strings: the allowed values
--   check     function(value, ctx) -> true[, normalized] | nil, message
--   key_check, value_check   maps: the same, for each key / each value
--   template  which placeholders the string (or each item/value) may use
--   path      a file path: relative ones are resolved against the config file's directory
--   fs        a file system path: a leading "~" is an error (nothing expands it)
--   alias_of  a legacy name for another row; setting both is an error
--   doc       one line for `ten config` and the docs
-- A schema is { fields = { rows }, check = function(ctx, values, bad, tbl, path) } where
-- `check` does the cross-field rules once every field of the section is known.
---------------------------------------------------------------------------------------

-- Upper limits of values the server converts (seconds to milliseconds, days
-- to milliseconds, MiB to bytes): past them the product wraps around in 64
-- bits. Far beyond any real setting.
local SECONDS = { max = 1000000000000, unit = "milliseconds" }
local DAYS = { max = 1000000000, unit = "milliseconds" }
local MEGABYTES = { max = 1000000000000, unit = "bytes" }

local TLS = {
  fields = {
    { name = "enabled", type = "boolean", default = false, doc = "Enable HTTPS with ACME certificates" },
    { name = "acme_email", type = "string", check = check_email,
      doc = "Email for Let's Encrypt registration (required when enabled)" },
    { name = "domain", type = "string", check = check_dns_name,
      doc = "Domain for the TLS certificate (required when enabled)" },
    { name = "cache_dir", type = "string", default = "{data_dir}/acme", nonempty = true,
      template = CACHE_TEMPLATE, fs = true, doc = "Directory for the certificate cache" },
    { name = "staging", type = "boolean", default = false,
      doc = "Use the Let's Encrypt staging environment (avoids rate limits)" },
    { name = "https_port", type = "integer", default = 443, min = 1, max = 65535,
      doc = "HTTPS listening port" },
    { name = "http_port", type = "integer", default = 80, min = 1, max = 65535,
      doc = "HTTP port (redirects and ACME challenges)" },
    { name = "dns_provider", type = "string", nonempty = true,
      doc = "DNS provider for wildcard certificates" },
  },
}

local SETTINGS = {
  fields = {
    { name = "data_dir", type = "string", default = "/var/lib/tenement", nonempty = true,
      template = GLOBAL_ONLY, path = true, fs = true,
      doc = "Base directory for instance data (relative: to the config file's directory)" },
    { name = "health_check_interval", type = "integer", limit = SECONDS, default = 10, min = 1,
      doc = "Seconds between health checks" },
    { name = "max_restarts", type = "integer", default = 3, min = 0,
      doc = "Max restarts within restart_window before giving up" },
    { name = "restart_window", type = "integer", limit = SECONDS, default = 300, min = 1,
      doc = "Window for counting restarts (seconds)" },
    { name = "backoff_base_ms", type = "integer", default = 1000, min = 1,
      doc = "Initial restart backoff delay (ms)" },
    { name = "backoff_max_ms", type = "integer", default = 60000, min = 1,
      doc = "Maximum restart backoff delay (ms), at least backoff_base_ms" },
    { name = "stop_timeout", type = "integer", limit = SECONDS, default = 10, min = 0,
      doc = "Seconds between SIGTERM and SIGKILL when stopping an instance" },
    { name = "listen", type = "string", default = "127.0.0.1", check = check_address,
      doc = "Address the HTTP server listens on" },
    { name = "port", type = "integer", default = 8080, min = 1, max = 65535,
      doc = "Port the HTTP server listens on" },
    { name = "domain", type = "string", default = "localhost", check = check_dns_name,
      doc = "Domain for routing: {id}.{service}.{domain}" },
    { name = "max_head_kb", type = "integer", default = 16, min = 1, max = 1024,
      doc = "Largest request head in KiB (431 past it)" },
    { name = "max_headers", type = "integer", default = 100, min = 1, max = 10000,
      doc = "Most header fields in a request (431 past it)" },
    { name = "max_body_mb", type = "integer", limit = MEGABYTES, default = 10, min = 0,
      doc = "Largest request body in MiB (413 past it)" },
    { name = "header_timeout", type = "integer", limit = SECONDS, default = 10, min = 1,
      doc = "Seconds a client has to send a request head (408 past it)" },
    { name = "keepalive_timeout", type = "integer", limit = SECONDS, default = 60, min = 1,
      doc = "Seconds an idle keep-alive connection stays open" },
    { name = "max_connections", type = "integer", default = 4096, min = 1,
      doc = "Open connections at most; past it, the one idle longest is closed for the new one, else accepting waits" },
    { name = "upstream_keepalive", type = "integer", default = 64, min = 0, max = 4096,
      doc = "Idle keep-alive connections kept open to each instance" },
    { name = "drain_timeout", type = "integer", limit = SECONDS, default = 10, min = 0,
      doc = "On SIGTERM, seconds requests in flight have to finish" },
    { name = "auth_failures_per_minute", type = "integer", default = 20, min = 1,
      doc = "Wrong tokens one client address may send a minute before each next one is slowed down" },
    { name = "metrics_auth", type = "boolean", default = false,
      doc = "Put /metrics behind an admin bearer token" },
    { name = "max_cold_starts", type = "integer", default = 32, min = 1,
      doc = "Instances that requests may be starting at once (woken or on demand)" },
    { name = "proxy_timeout", type = "integer", limit = SECONDS, default = 60, min = 1,
      doc = "Seconds an instance has to start answering a proxied request (then 504)" },
    { name = "log_ring_lines", type = "integer", default = 1000, min = 10, max = 1000000,
      doc = "Lines of output kept in memory per instance (the newest)" },
    { name = "log_retention_days", type = "integer", limit = DAYS, default = 7, min = 1,
      doc = "Days of instance output kept in the store" },
    { name = "log_max_lines", type = "integer", default = 1000000, min = 1000,
      doc = "Lines of instance output kept in the store at most (the oldest go first)" },
    { name = "log_max_mb", type = "integer", default = 1024, min = 1, max = 1048576,
      doc = "Megabytes of instance output text kept in the store at most (the oldest go first)" },
    { name = "tls", type = "section", schema = TLS, doc = "[settings.tls]" },
  },
}

local RESTART = { "always", "on-failure", "never" }
local NETWORK = { "host", "isolated" }
local FILESYSTEM = { "host", "private" }

-- The path of an item of mounts, without its :ro or :rw.
local function mount_path(m) return m:match("^(.-):r[ow]$") or m end

-- an item of mounts: an absolute path in its plain form, with an optional
-- :ro or :rw ("/srv/app/../../root" was /root, "/srv/app/" a second entry
-- for /srv/app)
local function check_mount(m)
  local path = mount_path(m)
  if path:sub(1, 1) ~= "/" then
    return nil, 'must be an absolute path, with ":rw" after it to make it writable ("/srv/app", "/srv/cache:rw")'
  end
  if path:find(":", 1, true) then
    return nil, 'after the path only ":ro" or ":rw" may come'
  end
  if path == "/" then return nil, "the whole host file system is what a private one keeps out" end
  if path:find("//", 1, true) or path:sub(-1) == "/" or path:find("/%.%.?/") or path:find("/%.%.?$") then
    return nil, "write the path plainly: no //, no trailing /, no . or .. parts"
  end
  return true
end
local ISOLATION = { "process", "namespace", "sandbox", "firecracker", "qemu", "wasm" }

local SERVICE = {
  fields = {
    { name = "command", type = "string", required = true, nonempty = true,
      template = PER_INSTANCE, doc = "Command that starts the service" },
    { name = "args", type = "array", items = "string", default = {}, template = PER_INSTANCE,
      doc = "Command arguments" },
    { name = "workdir", type = "string", nonempty = true, template = PER_INSTANCE, fs = true,
      doc = "Working directory for the process" },
    { name = "socket", type = "string", default = "/tmp/tenement/{name}-{id}.sock",
      nonempty = true, template = SOCKET_TEMPLATE, check = check_socket_template,
      doc = "Unix socket path template" },
    { name = "health", type = "string", check = check_http_path,
      doc = "HTTP path for health checks" },
    { name = "startup_timeout", type = "integer", limit = SECONDS, default = 10, min = 1,
      doc = "Max seconds to wait for the socket" },
    { name = "idle_timeout", type = "integer", limit = SECONDS, default = 0, min = 0,
      doc = "Stop after N seconds idle (0 = never)" },
    { name = "restart", type = "string", default = "on-failure", one_of = RESTART,
      doc = "Restart policy" },
    { name = "isolation", type = "string", default = "namespace", one_of = ISOLATION,
      doc = "Isolation level" },
    { name = "runtime", alias_of = "isolation", doc = "Legacy name of isolation" },
    { name = "network", type = "string", default = "host", one_of = NETWORK,
      doc = "host, or isolated: a network namespace with only loopback (namespace isolation)" },
    { name = "filesystem", type = "string", default = "host", one_of = FILESYSTEM,
      doc = "host, or private: only the system's programs and libraries (read-only), the instance's own "
        .. "directories and `mounts` (namespace isolation)" },
    { name = "mounts", type = "array", items = "string", default = {}, check = check_mount,
      doc = 'Host paths a private filesystem adds: "PATH" read-only, "PATH:rw" writable' },
    { name = "user", type = "string", nonempty = true,
      doc = "Run as this user (name or uid): its uid and gid, no supplementary groups, no new privileges" },
    { name = "nofile", type = "integer", min = 16, doc = "Limit on open files (RLIMIT_NOFILE)" },
    { name = "nproc", type = "integer", min = 1, doc = "Limit on processes of the user (RLIMIT_NPROC)" },
    { name = "memory_limit_mb", type = "integer", limit = MEGABYTES, min = 1, doc = "Memory limit in MB" },
    -- Any integer is kept: the spawn path clamps it to 1-10000 and logs that it did.
    { name = "cpu_shares", type = "integer", doc = "CPU weight 1-10000" },
    { name = "pids_limit", type = "integer", min = 1, doc = "Most processes the instance may have (cgroup pids)" },
    { name = "storage_quota_mb", type = "integer", limit = MEGABYTES, min = 1,
      doc = "Max disk usage per instance (MB)" },
    { name = "on_demand", type = "boolean", default = false,
      doc = "Let a request for an unknown id start a new instance (within max_instances)" },
    { name = "max_instances", type = "integer", min = 1,
      doc = "Most instances of this service that on_demand may create" },
    { name = "storage_persist", type = "boolean", default = false,
      doc = "Keep the instance's data directory when it stops" },
    { name = "env", type = "map", values = "string", key_check = check_env_name, default = {},
      template = PER_INSTANCE, doc = "[service.NAME.env]: environment variables" },
  },
}

local ROUTING = {
  fields = {
    { name = "default", type = "string", check = check_service_ref,
      doc = "Service for requests to the bare domain" },
    { name = "subdomain", type = "map", values = "string", key_check = check_dns_label,
      value_check = check_service_ref, default = {}, doc = "Subdomain label -> service" },
    { name = "path", type = "map", values = "string", key_check = check_path_prefix,
      value_check = check_service_ref, default = {}, doc = "Path prefix -> service" },
  },
}

local HOOKS = {
  fields = {
    { name = "router", type = "string", nonempty = true, path = true, fs = true,
      doc = "Lua file whose route() wraps or replaces the router" },
  },
}

-- Instance data lives in {data_dir}/{service}/{id}; a service may not take
-- the name of a directory the server keeps there itself.
config.reserved_names = {
  acme = "the server keeps its certificate cache in {data_dir}/acme",
}

local TOP_KEYS = { "settings", "service", "process", "instances", "routing", "hooks" }

config.schema = {
  settings = SETTINGS, tls = TLS, service = SERVICE, routing = ROUTING, hooks = HOOKS,
  restart = RESTART, isolation = ISOLATION, placeholders = PLACEHOLDERS,
}

---------------------------------------------------------------------------------------
-- Checking
---------------------------------------------------------------------------------------

local NO_VALUE = {}

local function where(tbl, key)
  if type(tbl) ~= "table" or type(toml.where) ~= "function" then return nil end
  local ok, line, col
  if key == nil then
    ok, line, col = pcall(toml.where, tbl)
  else
    ok, line, col = pcall(toml.where, tbl, key)
  end
  if ok and math.type(line) == "integer" then return line, col end
  return nil
end

-- The column where the value of `key = value` starts on a source line, given the column
-- of the key (toml.where reports keys; a wrong value is better pointed at itself).
-- Columns count UTF-8 characters, as toml.where's do. nil when the line does not look
-- like `key = value` from there (a table header, say).
local function value_col(text, col)
  local ok, i = pcall(utf8.offset, text, col)
  if not ok or not i then return nil end
  while true do
    local c = text:sub(i, i)
    if c == '"' then
      local j = i + 1
      while j <= #text do
        local cj = text:sub(j, j)
        if cj == "\\" then j = j + 2 elseif cj == '"' then break else j = j + 1 end
      end
      if j > #text then return nil end
      i = j + 1
    elseif c == "'" then
      local j = text:find("'", i + 1, true)
      if not j then return nil end
      i = j + 1
    else
      local j = text:match("^[A-Za-z0-9_%-]+()", i)
      if not j then return nil end
      i = j
    end
    i = text:match("^[ \t]*()", i)
    local sep = text:sub(i, i)
    if sep == "=" then
      i = text:match("^[ \t]*()", i + 1)
      local n = utf8.len(text, 1, i - 1)
      return n and n + 1 or nil
    elseif sep == "." then
      i = text:match("^[ \t]*()", i + 1)
    else
      return nil
    end
  end
end

-- Position of the value of tbl[key]: its key's line, and the value's column when the
-- source text is at hand.
local function where_value(ctx, tbl, key)
  local line, col = where(tbl, key)
  if line and ctx.text then
    if not ctx.lines then
      ctx.lines = {}
      -- toml counts columns after a byte order mark, so the lines must too.
      local text = ctx.text:gsub("^\239\187\191", "")
      for l in (text .. "\n"):gmatch("([^\n]*)\n") do ctx.lines[#ctx.lines + 1] = l end
    end
    local text = ctx.lines[line]
    local vcol = text and value_col(text, col)
    if vcol then return line, vcol end
  end
  return line, col
end

-- Position of an array item, falling back to the key that holds the array.
local function where_item(ctx, arr, i, parent, key)
  local line, col = where(arr, i)
  if line then return line, col end
  return where_value(ctx, parent, key)
end

local function report(ctx, line, col, path, value, msg)
  local head = path
  if value ~= NO_VALUE then
    local s = show(value)
    if s then head = path .. " = " .. s end
  end
  ctx.errors[#ctx.errors + 1] = { line = line, col = col, text = head .. ": " .. msg }
end

-- What tenement sets in each app's environment, by the placeholder that
-- gives the same value: ${PORT} in a template is the server's variable, read
-- at load time, which is rarely what was meant.
local APP_VARS = {
  PORT = "port", SOCKET_PATH = "socket", INSTANCE_DIR = "instance_dir", INSTANCE_ID = "id",
  SERVICE_NAME = "name",
}

local function check_template(ctx, s, tpl, line, col, path, field)
  local parts, err = parse_template(s)
  if not parts then
    report(ctx, line, col, path, s, err)
    return false
  end
  local ok = true
  for _, p in ipairs(parts) do
    if p.ph then
      if not IS_PLACEHOLDER[p.ph] then
        ok = false
        report(ctx, line, col, path, s, ("unknown placeholder {%s}; known placeholders are %s%s")
          :format(p.ph, KNOWN_TEXT, did_you_mean(p.ph, PLACEHOLDERS, "; did you mean {%s}?")))
      elseif not tpl.allowed[p.ph] then
        ok = false
        local allowed = {}
        for _, q in ipairs(PLACEHOLDERS) do
          if tpl.allowed[q] then allowed[#allowed + 1] = "{" .. q .. "}" end
        end
        allowed[#allowed + 1] = "${VAR}"
        local because = (tpl.why and tpl.why[p.ph]) or tpl.because
        report(ctx, line, col, path, s, ("{%s} cannot be used in %s%s; allowed here: %s")
          :format(p.ph, field, because and (" (" .. because .. ")") or "",
            table.concat(allowed, ", ")))
      end
    elseif p.var then
      local v = ctx.env[p.var]
      if v == nil then
        ok = false
        local own = APP_VARS[p.var]
        report(ctx, line, col, path, s,
          ("%s is not set in the environment of ten serve%s"):format(p.var, own
            and (" (${VAR} is read when the file loads); for the instance's own %s write {%s}")
              :format(p.var, own) or ""))
      else
        ctx.host_env[p.var] = tostring(v)
      end
    end
  end
  return ok
end

-- A string value: emptiness, NUL, allowed values, template, custom check.
-- Returns true, value | false.
local function check_string(ctx, row, s, line, col, path, check)
  if s:find("\0", 1, true) then
    report(ctx, line, col, path, s, "must not contain a NUL character")
    return false
  end
  if row.nonempty and not s:find("%S") then
    report(ctx, line, col, path, s, "must not be empty")
    return false
  end
  -- "~/x" would be a directory named "~" (next to the config, for data_dir).
  if row.fs and s:sub(1, 1) == "~" then
    report(ctx, line, col, path, s,
      '"~" is not expanded here (no shell reads this file): write ${HOME} instead')
    return false
  end
  if row.one_of then
    local found = false
    for _, x in ipairs(row.one_of) do
      if x == s then found = true end
    end
    if not found then
      report(ctx, line, col, path, s, ("expected one of %s%s")
        :format(table.concat(row.one_of, ", "), did_you_mean(s, row.one_of)))
      return false
    end
  end
  if row.template and not check_template(ctx, s, row.template, line, col, path, path) then
    return false
  end
  if check then
    local ok, r = check(s, ctx)
    if not ok then
      report(ctx, line, col, path, s, r)
      return false
    end
    if r ~= nil then s = r end
  end
  return true, s
end

local function type_error(ctx, line, col, path, v, want)
  local hint = ""
  if want == "string" and (math.type(v) or type(v) == "boolean") then
    hint = (" (quote it: %s)"):format(quote(tostring(v)))
  elseif want == "integer" and type(v) == "string" and v:match("^%s*%d+%s*%a*%s*$") then
    -- "10s", "64MB": the unit is in the key's name or its documentation
    hint = (" (write %s, without quotes%s)"):format(v:match("%d+"), v:find("%a") and ", in the key's own unit" or "")
  elseif want == "table" and kind(v) == "array" and kind(v[1]) == "table" then
    local header = (path == "service" or path == "process") and (path .. ".NAME] sections")
      or (path .. "]")
    report(ctx, line, col, path, v, ("expected a table, got an array of tables: write [%s, not [[%s]]")
      :format(header, path))
    return
  end
  report(ctx, line, col, path, v, ("expected %s, got %s%s"):format(a(want), a(kind(v)), hint))
end

local check_section -- forward

-- Checks one present value against its row. Returns true, normalized | false.
local function check_field(ctx, row, v, tbl, key, path)
  local line, col = where_value(ctx, tbl, key)
  local t = row.type

  if t == "section" then
    if not is_kind(v, "table") then
      type_error(ctx, line, col, path, v, "table")
      return false
    end
    local out, bad = check_section(ctx, v, row.schema, path)
    return next(bad) == nil, out
  end

  if t == "string" then
    if kind(v) ~= "string" then
      type_error(ctx, line, col, path, v, "string")
      return false
    end
    return check_string(ctx, row, v, line, col, path, row.check)
  end

  if t == "integer" then
    if kind(v) ~= "integer" then
      type_error(ctx, line, col, path, v, "integer")
      return false
    end
    if (row.min and v < row.min) or (row.max and v > row.max) then
      local range
      if row.min and row.max then
        range = ("expected an integer from %d to %d"):format(row.min, row.max)
      elseif row.min then
        range = ("expected an integer >= %d"):format(row.min)
      else
        range = ("expected an integer <= %d"):format(row.max)
      end
      report(ctx, line, col, path, v, "out of range: " .. range)
      return false
    end
    if row.limit and v > row.limit.max then
      report(ctx, line, col, path, v, ("out of range: expected an integer <= %d (it is converted"
        .. " to %s, which must fit in 64 bits)"):format(row.limit.max, row.limit.unit))
      return false
    end
    return true, v
  end

  if t == "boolean" then
    if kind(v) ~= "boolean" then
      type_error(ctx, line, col, path, v, "boolean")
      return false
    end
    return true, v
  end

  if t == "array" then
    if not is_kind(v, "array") then
      report(ctx, line, col, path, v, ("expected an array of %ss, got %s")
        :format(row.items, a(kind(v))))
      return false
    end
    local out, ok = {}, true
    for i = 1, #v do
      local item = v[i]
      local ipath = ("%s[%d]"):format(path, i)
      local il, ic = where_item(ctx, v, i, tbl, key)
      if kind(item) ~= row.items then
        type_error(ctx, il, ic, ipath, item, row.items)
        ok = false
      else
        local iok, iv = check_string(ctx, row, item, il, ic, ipath, row.check)
        if iok then out[i] = iv else ok = false end
      end
    end
    return ok, out
  end

  if t == "map" then
    if not is_kind(v, "table") then
      type_error(ctx, line, col, path, v, "table")
      return false
    end
    local out, ok, first = {}, true, {}
    for _, k in ipairs(sorted_keys(v)) do
      local item = v[k]
      local kpath = join(path, k)
      local kl, kc = where(v, k)
      local vl, vc = where_value(ctx, v, k)
      local kok, kv = true, k
      if row.key_check then
        local r
        kok, r = row.key_check(k, ctx)
        if not kok then
          report(ctx, kl, kc, kpath, NO_VALUE, r)
          ok = false
        elseif r ~= nil then
          kv = r
        end
      end
      if kind(item) ~= row.values then
        type_error(ctx, vl, vc, kpath, item, row.values)
        ok = false
      elseif kok then
        local iok, iv = check_string(ctx, row, item, vl, vc, kpath, row.value_check)
        if not iok then
          ok = false
        elseif first[kv] ~= nil then
          -- two keys that normalize to the same one ("Admin" and "admin")
          report(ctx, kl, kc, kpath, NO_VALUE, ("the same key as %s: case does not matter here")
            :format(quote(first[kv])))
          ok = false
        else
          out[kv], first[kv] = iv, k
        end
      end
    end
    return ok, out
  end

  error("config schema: unknown row type " .. tostring(t) .. " for " .. path)
end

local function unknown_key(ctx, tbl, key, path, names, section)
  local line, col = where(tbl, key)
  local hint = did_you_mean(key, names)
  local service = path:match("^service%.([^.]+)$")
  local only_tables = true -- [service.my.app] alone makes a service of nothing but a table
  for _, v in pairs(tbl) do if type(v) ~= "table" then only_tables = false end end
  if hint == "" and service and type(tbl[key]) == "table" and only_tables then
    -- [service.my.app] is a table "app" inside service "my", not a service "my.app"
    hint = ('; a service name cannot hold ".": [service.%s.%s] is read as service "%s" with a table "%s" in it '
      .. '(a name like "%s-%s" works)'):format(service, key, service, key, service, key)
  elseif hint == "" and path ~= "" then
    -- [hooks] inside [settings]: a section of the file's own
    for _, top in ipairs(TOP_KEYS) do
      if top == key then hint = ("; [%s] is a section of its own, at the top of the file, not in [%s]"):format(key, path) end
    end
  end
  if hint == "" then
    hint = ("; known keys in %s: %s"):format(section, table.concat(names, ", "))
  end
  report(ctx, line, col, join(path, key), tbl[key], "unknown key" .. hint)
end

-- Returns the section's values (defaults applied) and the set of fields that failed.
function check_section(ctx, tbl, schema, path)
  local out, bad = {}, {}
  local rows, names, aliases = {}, {}, {}
  for _, row in ipairs(schema.fields) do
    rows[row.name] = row
    if row.alias_of then
      aliases[row.alias_of] = row.name
    else
      names[#names + 1] = row.name
    end
  end

  for _, key in ipairs(sorted_keys(tbl)) do
    if not rows[key] then
      unknown_key(ctx, tbl, key, path, names, path == "" and "the file" or ("[" .. path .. "]"))
    end
  end

  for _, row in ipairs(schema.fields) do
    if not row.alias_of then
      local key, v = row.name, tbl[row.name]
      local alias = aliases[row.name]
      if alias and tbl[alias] ~= nil then
        if v ~= nil then
          local line, col = where(tbl, alias)
          local l2 = where(tbl, row.name)
          report(ctx, line, col, join(path, alias), tbl[alias],
            ("%s is a legacy name for %s, and %s is also set%s; keep only %s")
              :format(alias, row.name, row.name, l2 and (" (line " .. l2 .. ")") or "", row.name))
          bad[row.name] = true
          v = nil
        else
          key, v = alias, tbl[alias]
        end
      end
      if bad[row.name] then -- luacheck: ignore 542 (reported above)
      elseif v == nil then
        if row.required then
          local line, col = where(tbl)
          report(ctx, line, col, join(path, row.name), NO_VALUE,
            ("missing: %s is required%s"):format(row.name,
              row.doc and (" (" .. row.doc:lower() .. ")") or ""))
          bad[row.name] = true
        elseif row.type == "section" then
          local sub, sbad = check_section(ctx, {}, row.schema, join(path, row.name))
          out[row.name] = sub
          if next(sbad) then bad[row.name] = true end
        else
          out[row.name] = copy(row.default)
        end
      else
        local ok, nv = check_field(ctx, row, v, tbl, key, join(path, key))
        if ok then
          if row.template and row.template.resolve then
            nv = config.expand(nv, { env = ctx.host_env })
          end
          if row.path then nv = resolve_path(nv, ctx.base_dir) end
          out[row.name] = nv
        else
          bad[row.name] = true
          if row.type == "section" and type(nv) == "table" then out[row.name] = nv end
        end
      end
    end
  end

  if schema.check then schema.check(ctx, out, bad, tbl, path) end
  return out, bad
end

-- Cross-field rules, attached after the helpers they use exist.

TLS.check = function(ctx, out, bad, tbl, path)
  if out.enabled then
    local line, col = where(tbl, "enabled")
    local why = {
      acme_email = "Let's Encrypt needs a contact address",
      domain = "the certificate is issued for it",
    }
    for _, f in ipairs({ "acme_email", "domain" }) do
      if out[f] == nil and not bad[f] then
        report(ctx, line, col, join(path, f), NO_VALUE,
          ("missing: required when %s.enabled = true (%s)"):format(path, why[f]))
        bad[f] = true
      end
    end
    if not bad.http_port and not bad.https_port and out.http_port == out.https_port then
      local l, c = where_value(ctx, tbl, "http_port")
      if not l then l, c = where_value(ctx, tbl, "https_port") end
      report(ctx, l, c, join(path, "http_port"), out.http_port,
        "must differ from https_port: HTTP and HTTPS cannot share a port")
      bad.http_port = true
    end
  end
end

SETTINGS.check = function(ctx, out, bad, tbl, path)
  if not bad.backoff_base_ms and not bad.backoff_max_ms
    and out.backoff_max_ms < out.backoff_base_ms then
    if tbl.backoff_max_ms ~= nil then
      local line, col = where_value(ctx, tbl, "backoff_max_ms")
      report(ctx, line, col, join(path, "backoff_max_ms"), out.backoff_max_ms,
        ("out of range: expected an integer >= backoff_base_ms (%d)"):format(out.backoff_base_ms))
      bad.backoff_max_ms = true
    else
      local line, col = where_value(ctx, tbl, "backoff_base_ms")
      report(ctx, line, col, join(path, "backoff_base_ms"), out.backoff_base_ms,
        ("out of range: expected an integer <= backoff_max_ms (%d, its default);"
          .. " raise backoff_max_ms too"):format(out.backoff_max_ms))
      bad.backoff_base_ms = true
    end
  end
  -- cache_dir may use {data_dir}: resolve it now that data_dir is known.
  local tls = out.tls
  if tls and tls.cache_dir and not bad.data_dir then
    local dir, err = config.expand(tls.cache_dir, { data_dir = out.data_dir, env = ctx.host_env })
    if dir then
      tls.cache_dir = resolve_path(dir, ctx.base_dir)
    else -- only reachable if the template check above was skipped
      local ttbl = is_kind(tbl.tls, "table") and tbl.tls or tbl
      local line, col = where_value(ctx, ttbl, "cache_dir")
      report(ctx, line, col, join(path, "tls.cache_dir"), tls.cache_dir, err)
      bad.tls = true
    end
  end
end

SERVICE.check = function(ctx, out, bad, tbl, path)
  -- only the namespace level builds a file system of the app's own; the
  -- sandbox has one of its own already
  if not bad.filesystem and not bad.isolation and out.filesystem == "private" and out.isolation ~= "namespace" then
    local line, col = where_value(ctx, tbl, "filesystem")
    report(ctx, line, col, join(path, "filesystem"), out.filesystem, string.format(
      'a private file system is built for isolation = "namespace" only (this service has %q): set it, or '
      .. 'leave filesystem out', out.isolation))
    bad.filesystem = true
  end
  if not bad.mounts and not bad.filesystem and #(out.mounts or {}) > 0 and out.filesystem ~= "private" then
    local line, col = where_value(ctx, tbl, "mounts")
    report(ctx, line, col, join(path, "mounts"), out.mounts[1], 'mounts adds paths to a private file system: '
      .. 'set filesystem = "private" (the host file system has them all already)')
    bad.mounts = true
  end
  -- one path twice (its :rw and its :ro): which one holds?
  local seen = {}
  for i, m in ipairs(not bad.mounts and out.mounts or {}) do
    local p = mount_path(m)
    if seen[p] then
      local line, col = where_item(ctx, tbl.mounts, i, tbl, "mounts")
      report(ctx, line, col, ("%s[%d]"):format(join(path, "mounts"), i), m, ("%s is in mounts already (as %q): "
        .. "name each path once"):format(p, seen[p]))
      bad.mounts = true
      break
    end
    seen[p] = m
  end
  -- The process level never reads `network`: the app would keep the host's
  -- network while the file says it is isolated.
  if not bad.network and not bad.isolation and out.network == "isolated"
    and out.isolation == "process" then
    local line, col = where_value(ctx, tbl, "network")
    report(ctx, line, col, join(path, "network"), out.network, "process isolation shares the"
      .. ' host\'s network, so the app would not be isolated: use isolation = "namespace"'
      .. ' (or "sandbox", which has no network at all)')
    bad.network = true
  end
end

ROUTING.check = function(_, out)
  -- Longest prefix first, so "/api/v2" is tried before "/api"; ties in name order.
  local list = {}
  for prefix, svc in pairs(out.path or {}) do
    list[#list + 1] = { prefix = prefix, service = svc }
  end
  table.sort(list, function(x, y)
    if #x.prefix ~= #y.prefix then return #x.prefix > #y.prefix end
    return x.prefix < y.prefix
  end)
  out.path = list
  out.subdomain = out.subdomain or {}
end

local function check_services(ctx, doc)
  local services, names, seen = {}, {}, {}
  for _, section in ipairs({ "service", "process" }) do
    local sec = doc[section]
    if sec ~= nil then
      if not is_kind(sec, "table") then
        local line, col = where_value(ctx, doc, section)
        type_error(ctx, line, col, section, sec, "table")
      else
        for _, name in ipairs(sorted_keys(sec)) do
          local v = sec[name]
          local path = join(section, name)
          local line, col = where(sec, name)
          if not line then line, col = where(v) end
          local ok, why = config.valid_name(name)
          if not ok then report(ctx, line, col, path, NO_VALUE, why) end
          if config.reserved_names[name] then
            report(ctx, line, col, path, NO_VALUE, ("the name %s is reserved: %s; choose another name")
              :format(quote(name), config.reserved_names[name]))
          end
          if not is_kind(v, "table") then
            local vl, vc = where_value(ctx, sec, name)
            report(ctx, vl, vc, path, v, ("expected a table ([%s.%s]), got %s")
              :format(section, key_text(name), a(kind(v))))
          elseif seen[name] then
            local first = seen[name]
            report(ctx, line, col, path, NO_VALUE,
              ('service %s is defined twice, as [%s.%s]%s and [%s.%s]%s;'
                .. " [process.NAME] is the legacy name of [service.NAME]: keep one")
                :format(quote(name), first.section, key_text(name),
                  first.line and (" (line " .. first.line .. ")") or "",
                  section, key_text(name), line and (" (line " .. line .. ")") or ""))
          else
            local rec = check_section(ctx, v, SERVICE, path)
            rec.name = name
            rec.line = line
            rec.section = section
            services[name] = rec
            seen[name] = { section = section, line = line }
            names[#names + 1] = name
          end
        end
      end
    end
  end
  table.sort(names)
  return services, names
end

local function check_instances(ctx, doc)
  local list = {}
  local sec = doc.instances
  if sec == nil then return list end
  if not is_kind(sec, "table") then
    local line, col = where_value(ctx, doc, "instances")
    type_error(ctx, line, col, "instances", sec, "table")
    return list
  end
  -- Lua tables forget order: sort by where each key was written, so spawn order
  -- follows the file.
  local keys = sorted_keys(sec)
  local pos = {}
  for i, k in ipairs(keys) do
    local line, col = where(sec, k)
    pos[k] = { line or math.maxinteger, col or 0, i }
  end
  table.sort(keys, function(x, y)
    local px, py = pos[x], pos[y]
    for j = 1, 3 do
      if px[j] ~= py[j] then return px[j] < py[j] end
    end
    return false
  end)
  for _, svc in ipairs(keys) do
    local ids = sec[svc]
    local path = join("instances", svc)
    local line, col = where(sec, svc)
    if not ctx.services[svc] then
      local ok, why = check_service_ref(svc, ctx)
      if not ok then report(ctx, line, col, path, NO_VALUE, why) end
    end
    if not is_kind(ids, "array") then
      local vl, vc = where_value(ctx, sec, svc)
      report(ctx, vl, vc, path, ids,
        ('expected an array of instance ids like ["prod", "staging"], got %s'):format(a(kind(ids))))
    else
      local seen = {}
      for i = 1, #ids do
        local id = ids[i]
        local ipath = ("%s[%d]"):format(path, i)
        local il, ic = where_item(ctx, ids, i, sec, svc)
        if kind(id) ~= "string" then
          type_error(ctx, il, ic, ipath, id, "string")
        else
          local ok, why = config.valid_name(id)
          if not ok then
            report(ctx, il, ic, ipath, id, why:gsub("^not a valid name", "not a valid instance id"))
          elseif seen[id] then
            report(ctx, il, ic, ipath, id, ("duplicate instance id: %s is already listed as %s[%d]")
              :format(quote(id), path, seen[id]))
          else
            seen[id] = i
            list[#list + 1] = { service = svc, id = id }
          end
        end
      end
    end
  end
  return list
end

local function check_top_level(ctx, doc)
  local section = "the file"
  for _, key in ipairs(sorted_keys(doc)) do
    local known = false
    for _, k in ipairs(TOP_KEYS) do
      if k == key then known = true end
    end
    if not known then
      local line, col = where(doc, key)
      local hint = did_you_mean(key, TOP_KEYS, '; did you mean [%s]?')
      if hint == "" then
        for _, row in ipairs(SETTINGS.fields) do
          if row.name == key then
            hint = ('; %s belongs under [settings]'):format(key)
          end
        end
      end
      if hint == "" then
        hint = ("; known sections in %s: %s"):format(section,
          "[" .. table.concat(TOP_KEYS, "], [") .. "]")
      end
      report(ctx, line, col, key_text(key), doc[key], "unknown key" .. hint)
    end
  end
end

local function sort_errors(errors)
  for i, e in ipairs(errors) do e.index = i end
  table.sort(errors, function(x, y)
    local lx, ly = x.line or math.maxinteger, y.line or math.maxinteger
    if lx ~= ly then return lx < ly end
    local cx, cy = x.col or 0, y.col or 0
    if cx ~= cy then return cx < cy end
    return x.index < y.index
  end)
end

local function format_errors(source, errors)
  local lines = {}
  for i, e in ipairs(errors) do
    local at
    if e.line then
      at = ("%s:%d:%d: "):format(source or "tenement.toml", e.line, e.col or 1)
    else
      at = source and (source .. ": ") or ""
    end
    lines[i] = at .. e.text
  end
  return table.concat(lines, "\n")
end

-- Validates a parsed document (a toml.parse result, or a plain table).
-- Returns cfg | nil, message (all problems, one per line), list of { line, col, text }.
function config.check(doc, source, env, text)
  local ctx = {
    source = source,
    text = text, -- the TOML source, to point errors at values rather than keys
    env = env or {},
    errors = {},
    host_env = {},
    base_dir = source and dirname(source) or nil,
    services = {},
    service_names = {},
  }
  doc = doc or {}

  check_top_level(ctx, doc)

  local settings_tbl = doc.settings
  local settings
  if settings_tbl == nil then
    settings = check_section(ctx, {}, SETTINGS, "settings")
  elseif not is_kind(settings_tbl, "table") then
    local line, col = where_value(ctx, doc, "settings")
    type_error(ctx, line, col, "settings", settings_tbl, "table")
    settings = check_section(ctx, {}, SETTINGS, "settings")
  else
    settings = check_section(ctx, settings_tbl, SETTINGS, "settings")
  end

  local services, names = check_services(ctx, doc)
  ctx.services, ctx.service_names = services, names

  local instances = check_instances(ctx, doc)

  local function section(key, schema)
    local t = doc[key]
    if t ~= nil and not is_kind(t, "table") then
      local line, col = where_value(ctx, doc, key)
      type_error(ctx, line, col, key, t, "table")
      t = nil
    end
    return (check_section(ctx, t or {}, schema, key))
  end
  local routing = section("routing", ROUTING)
  local hooks = section("hooks", HOOKS)
  -- a hook that does not load would stop ten serve at start (and fail a
  -- reload): loaded here as the server loads it (its top level run, its
  -- answer checked), so `ten config` catches it at the line that names it
  if hooks and type(hooks.router) == "string" then
    local loaded, herr = hook_box.load(hooks.router, "route")
    if not loaded then
      local line, col = where_value(ctx, doc.hooks, "router")
      report(ctx, line, col, "hooks.router", NO_VALUE, (herr:gsub("^%[hooks%] route: ", "")))
    end
  end

  if #ctx.errors > 0 then
    sort_errors(ctx.errors)
    local list = {}
    for i, e in ipairs(ctx.errors) do
      list[i] = { line = e.line, col = e.col, text = e.text }
    end
    return nil, format_errors(source, ctx.errors), list
  end

  -- What loads but is rarely meant: said by ten config, logged by ten serve.
  local warnings = {}
  local function warn(line, msg)
    warnings[#warnings + 1] = { line = line or 0,
      text = (line and ("%s:%d: "):format(source or "tenement.toml", line) or "") .. msg }
  end
  local raw_paths = type(doc.routing) == "table" and type(doc.routing.path) == "table" and doc.routing.path or {}
  for prefix in pairs(raw_paths) do
    local taken = type(prefix) == "string" and router.own_paths_taken(prefix) or {}
    if #taken > 0 then
      warn(where(raw_paths, prefix), ("[routing.path] %s takes %s from the server on the bare domain (path routes go "
        .. "first): HTTP API clients and ten --server get the service instead; the CLI on this machine still works, "
        .. "through the control socket"):format(quote(prefix), table.concat(taken, ", ")))
    end
  end
  -- A program named by a path that is not there: ten serve would fail each
  -- start of it. A relative one is looked for where ten runs now, which is
  -- where ten serve looks when started from here (workdir, when set).
  local raw_services = type(doc.service) == "table" and doc.service or {}
  local nofile_max, nofile_why = require("tenement.runtime").nofile_max()
  local unnamed = {} -- socket template without {name} -> the services that have it
  for _, name in ipairs(names) do
    -- a socket every instance of the service (or of two services) shares:
    -- the first to listen keeps it, and every other start fails
    local sock = services[name].socket
    -- {port}: no two running instances have the same
    local by_instance = sock:find("{instance_dir}", 1, true) or sock:find("{port}", 1, true)
    if not (by_instance or sock:find("{id}", 1, true)) then
      warn(where(raw_services[name], "socket"), ("service.%s.socket = %s has no {id}: its instances would share one "
        .. "socket, and only one could listen; put {id} in it"):format(name, quote(sock)))
    end
    if not (by_instance or sock:find("{name}", 1, true)) then
      unnamed[sock] = unnamed[sock] or {}
      table.insert(unnamed[sock], name)
      if #unnamed[sock] == 2 then
        warn(where(raw_services[name], "socket"), ("service.%s.socket = %s is also service.%s's, with no {name}: "
          .. "instances of the two with one id would share a socket; put {name} in it")
          :format(name, quote(sock), unnamed[sock][1]))
      end
    end
    -- values the supervisor sets for every app over the file's
    local env = services[name].env or {}
    local raw_env = type(raw_services[name]) == "table" and type(raw_services[name].env) == "table"
      and raw_services[name].env or {}
    for var, ph in pairs(APP_VARS) do
      if env[var] ~= nil then
        warn(where(raw_env, var) or where(raw_services[name], "env"), ("service.%s.env.%s: tenement sets %s for "
          .. "every app (to its {%s}), over this value; use {%s} where the value is needed, or another name")
          :format(name, var, var, ph, ph))
      end
    end
    if services[name].max_instances and not services[name].on_demand then
      warn(where(raw_services[name], "max_instances"), ("service.%s.max_instances limits the instances requests "
        .. "create, and without on_demand = true requests create none: it has no effect"):format(name))
    end
    local nofile = services[name].nofile
    if nofile and nofile_max and nofile > nofile_max then
      warn(where(raw_services[name], "nofile"), ("service.%s.nofile = %d is more than this server can give (%s, "
        .. "%d): every start would fail; set at most %d"):format(name, nofile, nofile_why, nofile_max, nofile_max))
    end
    -- a user this host does not have fails every start the same way
    local user = services[name].user
    local found, why
    if user then
      found, why = require("tenement.users").lookup(user)
      if not found then
        warn(where(raw_services[name], "user"), ("service.%s.user: %s: every start would fail"):format(name, why))
      end
    end
    -- a path a private file system binds that is not there fails every start
    for _, m in ipairs(services[name].filesystem == "private" and services[name].mounts or {}) do
      local mpath = mount_path(m)
      if not require("tenement.core").fs.stat(mpath) then
        warn(where(raw_services[name], "mounts"), ("service.%s.mounts: %s is not there: every start would fail")
          :format(name, mpath))
      end
    end
    -- fork never checks RLIMIT_NPROC for root: the spawn refuses it
    local nproc = services[name].nproc
    local uid = found and found.uid or (not user and require("tenement.core").proc.geteuid())
    if nproc and uid == 0 then
      warn(where(raw_services[name], "nproc"), ("service.%s.nproc = %d cannot limit an app that runs as root (the "
        .. "kernel exempts root from it): every start would fail; set pids_limit, or a user for the service")
        :format(name, nproc))
    end
    -- the sandbox and a private file system bind the socket's directory
    -- into the app, read-write
    local sock_dir = sock:match("^(.*)/[^/]*$") or ""
    local walled = services[name].isolation == "sandbox" and "the sandbox"
      or services[name].filesystem == "private" and "a private file system"
    if walled and not (sock_dir:find("{id}", 1, true)
      or sock_dir:find("{instance_dir}", 1, true) or sock_dir:find("{port}", 1, true)) then
      warn(where(raw_services[name], "socket") or where(raw_services, name), ("service.%s.socket = %s: its directory "
        .. "is shared with other instances, and %s binds it read-write: each app could reach, or remove, the "
        .. "others' sockets; give each instance a directory of its own (socket = %s)")
        :format(name, quote(sock), walled, quote(sock_dir .. "/{name}-{id}/app.sock")))
    end
    local planned = require("tenement.runtime").planned(services[name].isolation)
    if planned then
      warn(where(raw_services[name], "isolation") or where(raw_services[name], "runtime") or where(raw_services, name),
        ("service.%s.isolation = %s: %s, so every start of it will fail; use \"namespace\" or \"sandbox\"")
          :format(name, quote(services[name].isolation), planned))
    end
    local cmd, workdir = services[name].command, services[name].workdir
    local no_workdir = false
    if type(workdir) == "string" and not workdir:find("{", 1, true) then
      local d = io.open(workdir, "rb")
      if d then
        d:close()
      else
        no_workdir = true
        warn(where(raw_services[name], "workdir"), ("service.%s.workdir: %s does not exist: each start would fail")
          :format(name, quote(workdir)))
      end
    end
    local prog = type(cmd) == "string" and not command.needs_shell(cmd) and cmd:match("^%s*(%S+)")
    -- (a relative program in a workdir that is not there was just warned of)
    if no_workdir and prog and prog:sub(1, 1) ~= "/" then prog = nil end
    if prog and prog:find("/", 1, true) and not (workdir and workdir:find("{", 1, true)) then
      local path = (prog:sub(1, 1) ~= "/" and workdir) and (workdir .. "/" .. prog) or prog
      local f = io.open(path, "rb")
      if f then
        f:close()
      else
        warn(where(raw_services[name], "command"), ("service.%s.command: the program %s is not there%s: each start "
          .. "would fail"):format(name, quote(prog), prog:sub(1, 1) == "/" and "" or (workdir and (" (in workdir "
          .. quote(workdir) .. ")") or " (a relative program is looked for in the directory ten serve runs in, here "
          .. "the current one)")))
      end
    elseif prog and not prog:find("/", 1, true) then
      -- a bare name: looked for on the PATH the app gets (its own env's, else
      -- the host's, which ten serve passes on); with no PATH known, no verdict
      local own = services[name].env and services[name].env.PATH
      local search = (type(own) == "string" and not own:find("[{$]") and own) or ctx.env.PATH
      local found = not search
      for dir in (search or ""):gmatch("[^:]+") do
        local f = io.open(dir .. "/" .. prog, "rb")
        if f then f:close() found = true break end
      end
      if not found then
        warn(where(raw_services[name], "command"), ("service.%s.command: no program %s on the PATH (%s): each "
          .. "start would fail; name it by its path, or install it"):format(name, quote(prog), search))
      end
    end
  end
  table.sort(warnings, function(x, y) return x.line < y.line end)
  for i, w in ipairs(warnings) do warnings[i] = w.text end

  return {
    source = source,
    warnings = warnings,
    settings = settings,
    services = services,
    service_names = names,
    instances = instances,
    routing = routing,
    hooks = hooks,
    -- Only the host variables that templates reference (${VAR}), captured at load time;
    -- `instance_vars` hands them to `expand`. May hold secrets: never print it.
    host_env = ctx.host_env,
  }
end

-- config.override(cfg, name, value, origin) -> true | nil, err: sets one
-- [settings] value from the command line, checked by the same rules. It is
-- also kept in cfg.overrides: the command line outranks the file, so a
-- reload of the file must put it back (config.reapply).
function config.override(cfg, name, value, origin)
  local _, err = config.check({ settings = { [name] = value } }, nil, {})
  if err then
    return nil, (origin or name) .. ": " .. (err:gsub("^[^:]*: ", ""):gsub("^settings%." .. name .. " = ", ""))
  end
  cfg.settings[name] = value
  cfg.overrides = cfg.overrides or {}
  cfg.overrides[name] = value
  return true
end

-- config.reapply(new, old): gives a freshly loaded cfg the command-line
-- overrides the running one was started with.
function config.reapply(new, old)
  for name, value in pairs(old.overrides or {}) do new.settings[name] = value end
  new.overrides = old.overrides
  return new
end

-- Parses TOML text and validates it. env: host environment used for ${VAR}.
function config.parse(text, source, env)
  if type(text) ~= "string" then
    return nil, ("config text: expected a string, got %s"):format(a(kind(text)))
  end
  source = source or "tenement.toml"
  local doc, err = toml.parse(text, source)
  if not doc then return nil, err end
  return config.check(doc, source, env, text)
end

local HOW_TO_CREATE = 'create one with "ten init", or name another with --config FILE'
  .. " or TENEMENT_CONFIG"

function config.load(path, env)
  if type(path) ~= "string" or path == "" then
    return nil, "no config file named; " .. HOW_TO_CREATE
  end
  local f, oerr = io.open(path, "rb")
  if not f then
    -- io.open's message is "PATH: reason"; keep only the reason, the path is ours.
    local reason = tostring(oerr)
    if reason:sub(1, #path + 2) == path .. ": " then reason = reason:sub(#path + 3) end
    return nil, ("cannot read config file %s: %s; %s"):format(path, reason, HOW_TO_CREATE)
  end
  local text, rerr = f:read("a")
  f:close()
  if not text then
    return nil, ("cannot read config file %s: %s; %s"):format(path, tostring(rerr), HOW_TO_CREATE)
  end
  return config.parse(text, path, env)
end

-- The config file to use: --config FILE, else $TENEMENT_CONFIG, else ./tenement.toml.
-- Returns the path and where it came from ("--config", "TENEMENT_CONFIG", "default").
function config.find(cli_path, env)
  if type(cli_path) == "string" and cli_path ~= "" then return cli_path, "--config" end
  local e = env and env.TENEMENT_CONFIG
  if type(e) == "string" and e ~= "" then return e, "TENEMENT_CONFIG" end
  return DEFAULT_PATH, "default"
end

-- The configuration of an empty file: every default, no services.
function config.defaults()
  local cfg = config.check({}, nil, {})
  return cfg
end

-- The template values for one instance; the supervisor calls this at spawn time.
-- Returns { name, id, data_dir, socket, port, instance_dir, env } | nil, err.
function config.instance_vars(cfg, service_name, id, port)
  local svc = cfg.services[service_name]
  if not svc then
    local hint = did_you_mean(tostring(service_name), cfg.service_names or {})
    return nil, ("no service %s is defined%s"):format(quote(tostring(service_name)), hint)
  end
  local ok, why = config.valid_name(id)
  if not ok then
    return nil, ("instance id %s: %s"):format(type(id) == "string" and quote(id) or tostring(id),
      why:gsub("^not a valid name", "not a valid instance id"))
  end
  if port ~= nil and (math.type(port) ~= "integer" or port < 1 or port > 65535) then
    return nil, ("port %s: expected an integer from 1 to 65535"):format(tostring(port))
  end
  local data_dir = cfg.settings.data_dir
  local vars = {
    name = service_name,
    id = id,
    data_dir = data_dir,
    port = port,
    instance_dir = normalize_path(data_dir .. "/" .. service_name .. "/" .. id),
    env = cfg.host_env or {},
  }
  local socket, err = config.expand(svc.socket, vars)
  if not socket then
    return nil, ("%s:%s: socket %s: %s"):format(service_name, id, quote(svc.socket), err)
  end
  if socket:sub(1, 1) ~= "/" then
    return nil, ("%s:%s: socket %s must be an absolute path"):format(service_name, id, quote(socket))
  end
  if #socket > SOCKET_PATH_MAX then
    return nil, ("%s:%s: socket path %s is %d bytes, Unix sockets allow at most %d")
      :format(service_name, id, quote(socket), #socket, SOCKET_PATH_MAX)
  end
  vars.socket = socket
  return vars
end

-- Everything of one instance with its templates expanded: { service, id, port, socket,
-- instance_dir, command, args, workdir, env }. The variables tenement sets itself (PORT,
-- SOCKET_PATH, INSTANCE_DIR) are the supervisor's to add. Returns table | nil, err.
function config.resolve(cfg, service_name, id, port)
  local vars, err = config.instance_vars(cfg, service_name, id, port)
  if not vars then return nil, err end
  local svc = cfg.services[service_name]
  local where_ = ("%s:%s"):format(service_name, id)
  local function x(field, s)
    local r, e = config.expand(s, vars)
    if not r then error({ msg = ("%s: %s: %s"):format(where_, field, e) }) end
    return r
  end
  local ok, res = pcall(function()
    local out = {
      service = service_name, id = id, port = port, socket = vars.socket,
      instance_dir = vars.instance_dir,
      command = x("command", svc.command),
      args = {}, env = {},
    }
    for i, s in ipairs(svc.args) do out.args[i] = x(("args[%d]"):format(i), s) end
    if svc.workdir then out.workdir = x("workdir", svc.workdir) end
    for k, s in pairs(svc.env) do out.env[k] = x("env." .. k, s) end
    return out
  end)
  if ok then return res end
  if type(res) == "table" and res.msg then return nil, res.msg end
  error(res, 0)
end

---------------------------------------------------------------------------------------
-- Printing (`ten config`)
---------------------------------------------------------------------------------------

local function toml_value(v)
  if type(v) == "string" then return quote(v) end
  if type(v) == "table" then
    local items = {}
    for i, x in ipairs(v) do items[i] = toml_value(x) end
    return "[" .. table.concat(items, ", ") .. "]"
  end
  return tostring(v)
end

-- Lines for one section's scalar fields, each with its doc as a comment.
local function describe_fields(out, values, schema)
  local rows = {}
  for _, row in ipairs(schema.fields) do
    if not row.alias_of and row.type ~= "section" and row.type ~= "map" then rows[#rows + 1] = row end
  end
  -- comments line up, past the longest line up to 60 columns: a longer
  -- value (a command line) pushes only its own comment along
  local texts, width = {}, 0
  for i, row in ipairs(rows) do
    local v = values[row.name]
    texts[i] = v == nil and ("# " .. row.name .. " (not set)") or (row.name .. " = " .. toml_value(v))
    if #texts[i] <= 60 then width = math.max(width, #texts[i]) end
  end
  for i, row in ipairs(rows) do
    out[#out + 1] = texts[i] .. string.rep(" ", width - #texts[i]) .. "  # " .. (row.doc or "")
  end
end

-- config.describe(cfg) -> the resolved configuration as commented TOML.
-- Templates are shown as written: they are expanded per instance at spawn.
function config.describe(cfg)
  local out = {
    "# " .. (cfg.source and ("resolved from " .. cfg.source) or "defaults (no file)")
      .. ": every default filled in.",
    "# Templates ({name} {id} {data_dir} {socket} {port} {instance_dir}) are expanded",
    "# for each instance when it starts.",
    "",
    "[settings]",
  }
  describe_fields(out, cfg.settings, SETTINGS)
  out[#out + 1] = ""
  out[#out + 1] = "[settings.tls]"
  describe_fields(out, cfg.settings.tls, TLS)
  for _, name in ipairs(cfg.service_names) do
    local svc = cfg.services[name]
    out[#out + 1] = ""
    out[#out + 1] = "[service." .. name .. "]"
    describe_fields(out, svc, SERVICE)
    local keys = sorted_keys(svc.env or {})
    if #keys > 0 then
      out[#out + 1] = ""
      out[#out + 1] = "[service." .. name .. ".env]"
      for _, k in ipairs(keys) do out[#out + 1] = key_text(k) .. " = " .. toml_value(svc.env[k]) end
    end
  end
  if #cfg.instances > 0 then
    out[#out + 1] = ""
    out[#out + 1] = "[instances]"
    local ids, order = {}, {}
    for _, inst in ipairs(cfg.instances) do
      if not ids[inst.service] then ids[inst.service] = {}; order[#order + 1] = inst.service end
      table.insert(ids[inst.service], inst.id)
    end
    for _, svc in ipairs(order) do out[#out + 1] = svc .. " = " .. toml_value(ids[svc]) end
  end
  local r = cfg.routing
  if r.default or next(r.subdomain) or #r.path > 0 then
    out[#out + 1] = ""
    out[#out + 1] = "[routing]"
    if r.default then out[#out + 1] = "default = " .. toml_value(r.default) end
    for _, label in ipairs(sorted_keys(r.subdomain)) do
      out[#out + 1] = "subdomain." .. key_text(label) .. " = " .. toml_value(r.subdomain[label])
    end
    for _, p in ipairs(r.path) do
      out[#out + 1] = "path." .. toml_value(p.prefix) .. " = " .. toml_value(p.service)
    end
  end
  if cfg.hooks.router then
    out[#out + 1] = ""
    out[#out + 1] = "[hooks]"
    out[#out + 1] = "router = " .. toml_value(cfg.hooks.router)
  end
  return table.concat(out, "\n") .. "\n"
end

-- A copy of cfg that is safe to print: no host environment values, arrays
-- marked so they stay arrays in JSON.
function config.public(cfg, mark_array)
  mark_array = mark_array or function(t) return t end
  local function walk(v, key)
    if type(v) ~= "table" then return v end
    local out = {}
    for k, x in pairs(v) do
      if k ~= "host_env" then out[k] = walk(x, k) end
    end
    if #v > 0 or key == "args" or key == "instances" or key == "path" or key == "service_names" or key == "warnings" then
      return mark_array(out)
    end
    return out
  end
  return walk(cfg)
end

return config
