-- Routing policy: where a request goes. Pure functions of plain tables (no
-- I/O, randomness passed in), so a hook can wrap or replace them and a spec
-- can drive them.
--
--   {id}.{service}.{domain}  -> that instance
--   {service}.{domain}       -> a weighted choice among the service's instances
--   {domain}                 -> [routing.path] prefixes first; then the server's
--                               own paths (/api/, /health, /metrics); then
--                               [routing] default; else the dashboard
--   [routing.subdomain]      -> label.{domain} to a service
local router = {}

-- The paths of the bare domain that always belong to the server itself.
router.own_prefixes = { "/api/", "/health", "/metrics" }

-- A host as routing sees it: lower case, no port, or nil when it is not a
-- valid DNS name (or IP literal). Hosts repeat from request to request, so
-- the answers are kept (a bounded table, emptied when full).
local host_cache, host_cache_size = {}, 0
local HOST_CACHE_MAX = 4096
local INVALID = {}

local normalize

function router.normalize_host(host)
  local hit = host_cache[host]
  if hit ~= nil then
    if hit == INVALID then return nil end
    return hit
  end
  if type(host) ~= "string" then return nil end
  local norm = normalize(host)
  if host_cache_size >= HOST_CACHE_MAX then host_cache, host_cache_size = {}, 0 end
  host_cache[host] = norm or INVALID
  host_cache_size = host_cache_size + 1
  return norm
end

function normalize(host)
  if type(host) ~= "string" or host == "" or #host > 255 then return nil end
  host = host:lower()
  if host:sub(1, 1) == "[" then
    -- the literal, then nothing but an optional port
    local v6, rest = host:match("^(%[[%x:.]+%])(.*)$")
    if not v6 then return nil end
    if rest == "" then return v6 end
    local port = rest:match("^:(%d+)$")
    if port and tonumber(port) <= 65535 then return v6 end
    return nil
  end
  local name, port = host:match("^([^:]+):(%d+)$")
  if name then
    if tonumber(port) > 65535 then return nil end
    host = name
  elseif host:find(":", 1, true) then
    return nil
  end
  host = host:gsub("%.$", "")
  for label in (host .. "."):gmatch("([^.]*)%.") do
    if label == "" or #label > 63 or not label:match("^[a-z0-9-]+$")
      or label:sub(1, 1) == "-" or label:sub(-1) == "-" then
      return nil
    end
  end
  return host
end

local function unreserved(hex)
  local c = string.char(tonumber(hex, 16))
  if c:match("^[%w%-._~]$") then return c end
  return "%" .. hex:upper()
end

-- The path as the instance will read it, for matching prefixes (the request
-- goes on as sent): escaped unreserved characters decoded ("/%73hop" is
-- "/shop", RFC 3986 6.2.2.2) and dot segments removed (5.2.4), so that
-- "/shop/../api" goes where its instance would look, to /api's service. An
-- escaped "/" stays data.
function router.normalize_path(path)
  if path:sub(1, 1) ~= "/" or (not path:find("%", 1, true) and not path:find("/.", 1, true)) then
    return path
  end
  path = path:gsub("%%(%x%x)", unreserved)
  local list, out = {}, {}
  for seg in (path:sub(2) .. "/"):gmatch("([^/]*)/") do list[#list + 1] = seg end
  for i, seg in ipairs(list) do
    if seg == "." or seg == ".." then
      if seg == ".." then out[#out] = nil end
      if i == #list then out[#out + 1] = "" end
    else
      out[#out + 1] = seg
    end
  end
  return "/" .. table.concat(out, "/")
end

local function prefix_match(path, prefix)
  if path:sub(1, #prefix) ~= prefix then return false end
  if prefix:sub(-1) == "/" then return true end
  local next_char = path:sub(#prefix + 1, #prefix + 1)
  return next_char == "" or next_char == "/" or next_char == "?"
end

-- The server's own paths a [routing.path] prefix takes from it (path routes
-- go first), which the configuration warns of.
function router.own_paths_taken(prefix)
  local taken = {}
  for _, p in ipairs(router.own_prefixes) do
    if prefix_match(p, prefix) then taken[#taken + 1] = p end
  end
  return taken
end

local function is_own_path(path)
  for _, p in ipairs(router.own_prefixes) do
    if prefix_match(path, p) then return true end
  end
  return false
end

local function not_found(why)
  return { kind = "status", status = 404, reason = why }
end

-- router.route(request, view) -> target
--   request: { method, host, path, headers }
--   view: { domain, routing = cfg.routing, services = { [name] = true } }
--   target: { kind = "instance", service, id } | { kind = "service", service }
--         | { kind = "self" } | { kind = "status", status, reason }
--   by_host = true on a target decided by the host alone (not the path):
--   the front door may then hand that host to C for good (a direct route)
function router.route(request, view)
  local host = router.normalize_host(request.host)
  if not host then
    return { kind = "status", status = 400, reason = "the Host header is missing or not a valid name" }
  end
  local domain = view.domain
  local routing = view.routing or { subdomain = {}, path = {} }
  local raw = request.path or "/"

  -- an address instead of a name reaches the server itself: no instance
  -- has an address of its own, and remote CLIs often know only the IP (or
  -- reach it through a tunnel to localhost)
  local is_address = host:match("^%d+%.%d+%.%d+%.%d+$") or host:sub(1, 1) == "[" or host == "localhost"
  if host == domain or is_address then
    local path = router.normalize_path(raw)
    for _, p in ipairs(routing.path or {}) do
      -- a prefix written with escapes reads as the path does
      local prefix = p.prefix
      if prefix:find("%", 1, true) then prefix = router.normalize_path(prefix) end
      if prefix_match(path, prefix) then return { kind = "service", service = p.service } end
    end
    -- the server's own pages match the path as sent, as they read it
    if is_own_path(raw) then return { kind = "self" } end
    if routing.default then return { kind = "service", service = routing.default } end
    return { kind = "self" }
  end

  local suffix = "." .. domain
  if #host <= #suffix or host:sub(-#suffix) ~= suffix then
    return not_found("no site " .. host .. " here (this server answers for " .. domain .. ")")
  end
  local labels = {}
  for label in host:sub(1, #host - #suffix):gmatch("[^.]+") do labels[#labels + 1] = label end

  if #labels == 1 then
    local label = labels[1]
    local mapped = routing.subdomain and routing.subdomain[label]
    if mapped then return { kind = "service", service = mapped, by_host = true } end
    if view.services[label] then return { kind = "service", service = label, by_host = true } end
    return not_found("no service " .. label .. " here")
  elseif #labels == 2 then
    local id, service = labels[1], labels[2]
    service = (routing.subdomain and routing.subdomain[service]) or service
    if not view.services[service] then return not_found("no service " .. labels[2] .. " here") end
    if #id > 63 or not id:match("^[a-z0-9][a-z0-9-]*$") then return not_found("not a valid instance id") end
    return { kind = "instance", service = service, id = id, by_host = true }
  end
  return not_found("no site " .. host .. " here")
end

-- router.pick(candidates, rand) -> candidate | nil
-- candidates: { { key, state, weight, held, ... } }. A weighted choice among
-- the instances that take requests now or once woken (running, starting,
-- sleeping); weight 0 takes no new traffic. Weights hold while some sleep:
-- a canary at 10 beside a production at 100 gets a eleventh of the requests
-- whichever of them happens to be awake, and is woken when drawn. With none
-- of those, one on its way back: going to sleep (woken once it is down) or
-- restarting after a crash, the request waiting for it as it would through
-- the instance's own host (the service's host answered 503 at once, for as
-- long as a slow app took to stop). Then the stopped one with the highest
-- weight, to be started. Never one an operator stopped (held).
-- rand(n) returns an integer in 1..n.
local TAKES = { running = true, starting = true, sleeping = true }
local COMING_BACK = { stopping = true, backoff = true }

local function draw(candidates, states, rand)
  local total = 0
  local pool = {}
  for _, c in ipairs(candidates) do
    if states[c.state] and (c.weight or 0) > 0 and not c.held then
      pool[#pool + 1] = c
      total = total + c.weight
    end
  end
  if total == 0 then return nil end
  local r = rand(total)
  for _, c in ipairs(pool) do
    r = r - c.weight
    if r <= 0 then return c end
  end
end

function router.pick(candidates, rand)
  local drawn = draw(candidates, TAKES, rand) or draw(candidates, COMING_BACK, rand)
  if drawn then return drawn end
  local best
  for _, c in ipairs(candidates) do
    if c.state == "stopped" and not c.held and (c.weight or 0) > 0 and (not best or c.weight > best.weight) then
      best = c
    end
  end
  return best
end

return router
