-- The JSON API: what `ten` commands, the dashboard and scripts call.
-- Served on the local control socket ({data_dir}/ten.sock, trusted by its
-- file mode) and, behind bearer tokens, on the HTTP front door.
local core = require "tenement.core"
local json = require "tenement.json"
local supervisor = require "tenement.supervisor"
local deploy = require "tenement.deploy"
local auth = require "tenement.auth"
local sync = require "tenement.sync"
local log = require "tenement.log"

local api = {}

local STATUS_FOR_CODE = {
  bad_request = 400, unauthorized = 401, forbidden = 403, not_found = 404, conflict = 409, too_large = 413,
  start_failed = 502,
  unavailable = 503, not_running = 409, internal = 500,
}

local JSON_HEADERS = { ["content-type"] = "application/json" }
-- messages in one answer of /api/logs (a page of the event stream) at most:
-- encoding is done on the loop, which reads every instance's pipes too
local LOG_ANSWER_BYTES = 4 * 1024 * 1024
api.LOG_ANSWER_BYTES = LOG_ANSWER_BYTES

-- May this request act on service:id? (No principal: the control socket.)
function api.allows(req, service, id)
  return req.principal == nil or auth.allows(req.principal, service, id)
end

-- Bytes a directory tree takes on disk (links not followed), for instances
-- without a quota image. Bounded: past 100,000 entries it stops counting.
-- In a task it lets the loop run every half millisecond: a tenant's files
-- are the tenant's to multiply, and 100,000 stats in one go held every
-- other request up for half a second.
local DISK_USAGE_SLICE_NS = 500000
function api.disk_usage(path)
  local total, seen = 0, 0
  local in_task, since = core.current() ~= nil, core.hrtime()
  local function walk(p)
    if in_task and core.hrtime() - since > DISK_USAGE_SLICE_NS then
      coroutine.yield()
      since = core.hrtime()
    end
    local st = core.fs.stat(p, false)
    if not st then return end
    total = total + (st.allocated or 0)
    seen = seen + 1
    if st.type == "directory" and seen < 100000 then
      for _, name in ipairs(core.fs.readdir(p) or {}) do walk(p .. "/" .. name) end
    end
  end
  walk(path)
  return total
end

local function reply(status, value)
  return status, JSON_HEADERS, json.encode(value) .. "\n"
end

local function fail(code, message)
  return reply(STATUS_FOR_CODE[code] or 500, { error = { code = code, message = message } })
end
api.fail = fail

function api.unescape(s)
  return (s:gsub("+", " "):gsub("%%(%x%x)", function(h) return string.char(tonumber(h, 16)) end))
end

function api.parse_query(q)
  local out = {}
  for pair in (q or ""):gmatch("[^&]+") do
    local k, v = pair:match("^([^=]*)=?(.*)$")
    out[api.unescape(k)] = api.unescape(v)
  end
  return out
end

-- Reads a JSON object body. -> table | nil, err, code
local function json_body(req)
  local body, err = req:body(1024 * 1024)
  if not body then
    -- a client told 400 would look for a fault in its JSON, not its size
    local code = tostring(err):find("too large", 1, true) and "too_large" or "bad_request"
    return nil, "cannot read the request body: " .. tostring(err), code
  end
  if body == "" then return {} end
  local v, jerr = json.decode(body)
  if type(v) ~= "table" then
    return nil, "the body is not a JSON object" .. (jerr and (": " .. jerr) or "")
  end
  return v
end

local function field(obj, name, alt)
  local v = obj[name]
  if v == nil and alt then v = obj[alt] end
  if v ~= nil and type(v) ~= "string" then
    return nil, string.format("field %q must be a string", name)
  end
  if v == nil or v == "" then return nil, string.format("field %q is required", name) end
  return v
end

local function instance_json(snap)
  -- `id` is "service:id", as the original API had it
  return {
    id = snap.instance, service = snap.service, instance_id = snap.id,
    state = snap.state, health = snap.health, pid = snap.pid,
    uptime_secs = snap.uptime_secs, idle_secs = snap.idle_secs, restarts = snap.restarts,
    socket = snap.socket, port = snap.port, isolation = snap.isolation,
    last_exit = snap.last_exit, reason = snap.reason, weight = snap.weight, unsaved = snap.unsaved,
    memory_bytes = snap.memory_bytes, cpu_seconds = snap.cpu_seconds,
    storage_used_bytes = snap.storage_used_bytes, storage_quota_bytes = snap.storage_quota_bytes,
  }
end

local function spawned_json(inst)
  return { instance = inst.key, socket = inst.socket, port = inst.port, state = inst.state, unsaved = inst.unsaved }
end

-- api.new{ sup =, store =, started = } -> handler(req) -> status, headers, body
function api.new(ctx)
  local sup, store = ctx.sup, ctx.store
  local routes = {}

  -- access: "public"; "scoped" (any valid token; the handler filters by
  -- scope); "instance" (the first capture is SERVICE:ID, which a tenant
  -- token must cover); "admin" (admin tokens only). Requests on the control
  -- socket carry no principal and may do everything.
  local function route(method, pattern, fn, access)
    routes[#routes + 1] = { method = method, pattern = "^" .. pattern .. "$", fn = fn, access = access }
  end

  -- Starts, restarts and deploys of one instance take turns: a restart's
  -- stop, run beside another restart, stopped the instance that one had
  -- just started, which then answered 502 although nothing had failed;
  -- deploys of one version at once all answered 200. A stop
  -- takes no turn (it must be able to cut a hanging start short); a start
  -- it cuts short says so with 409, not as a start that failed.
  local turns, stops = {}, {}
  local function start_in_turn(service, id, fn)
    local key = supervisor.key(service, id)
    while turns[key] do turns[key]:wait() end
    local mine = sync.event()
    turns[key] = mine
    -- a stop that began between two turns may land in this one
    mine.stopped = (stops[key] or 0) > 0
    local res = table.pack(pcall(fn, sup, service, id))
    turns[key] = nil
    mine:set()
    if not res[1] then error(res[2], 0) end
    if not res[2] and res[4] == "start_failed" and mine.stopped then
      return nil, key .. " was stopped by another call while it started", "conflict"
    end
    return table.unpack(res, 2, res.n)
  end

  local function target(key)
    local service, id = supervisor.parse_key(api.unescape(key))
    if not service then return nil, id end
    return service, id
  end

  route("GET", "/health", function()
    return reply(200, {
      status = "ok", version = core.version,
      uptime_secs = (core.now() - ctx.started) // 1000, instances = sup:state_counts(),
    })
  end, "public")

  route("GET", "/api/instances", function(req)
    local out = json.array()
    for _, snap in ipairs(sup:list()) do
      if api.allows(req, snap.service, snap.id) then out[#out + 1] = instance_json(snap) end
    end
    return reply(200, out)
  end, "scoped")

  local function spawn(req, compat)
    local body, err, bcode = json_body(req)
    if not body then return fail(bcode or "bad_request", err) end
    local service, serr = field(body, "service", "process")
    if not service then return fail("bad_request", serr) end
    local id, ierr = field(body, "id")
    if not id then return fail("bad_request", ierr) end
    if not api.allows(req, service, id) then return fail("forbidden", "this token does not cover " .. service .. ":" .. id) end
    local before = sup:get(service, id)
    local svc = ctx.cfg.services[service]
    if not before and svc and req.principal and not req.principal.admin then
      -- a new instance joins its service's shared traffic (weight 100) and
      -- would show its tenant those requests' output: an id a token may
      -- reach is not one it may bring into being
      if not svc.on_demand then
        return fail("forbidden", string.format("%s:%s does not exist, and a tenant token starts only an instance "
          .. "that does (an admin creates it: `ten spawn %s:%s`)", service, id, service, id))
      end
      -- where a request could create it, within the same bound as a request
      if svc.max_instances and sup:count_held(service) >= svc.max_instances then
        return fail("conflict", string.format("%s has reached max_instances = %d", service, svc.max_instances))
      end
    end
    -- 201 says a process was started for this call; one already running is 200
    local created = not (before and before.state == "running")
    local inst, why, code = start_in_turn(service, id, function(_, sv, i)
      return sup:spawn(sv, i, { why = "by the API" })
    end)
    if not inst and code == "not_found" and req.principal and not req.principal.admin then
      -- a tenant learns no more than that: not the file, not the other services
      return fail("not_found", string.format("no service %q", service))
    end
    if not inst then return fail(code or "internal", why) end
    return reply((compat or not created) and 200 or 201, spawned_json(inst))
  end
  route("POST", "/api/instances", function(req) return spawn(req, false) end, "scoped")
  route("POST", "/api/instances/spawn", function(req) return spawn(req, true) end, "scoped")

  route("GET", "/api/instances/([^/]+)", function(_, key)
    local service, id = target(key)
    if not service then return fail("bad_request", id) end
    local inst = sup:get(service, id)
    if not inst then return fail("not_found", "no instance " .. supervisor.key(service, id)) end
    return reply(200, instance_json(inst:snapshot()))
  end, "instance")

  route("DELETE", "/api/instances/([^/]+)", function(_, key)
    local service, id = target(key)
    if not service then return fail("bad_request", id) end
    local ikey = supervisor.key(service, id)
    local turn = turns[ikey]
    if turn then turn.stopped = true end
    stops[ikey] = (stops[ikey] or 0) + 1
    local done, ok, why, code = pcall(sup.stop, sup, service, id, { hold = true })
    stops[ikey] = stops[ikey] > 1 and stops[ikey] - 1 or nil
    if not done then error(ok, 0) end
    if not ok then return fail(code or "internal", why) end
    -- stopped, but a restart of the server would start it again: a bare
    -- 204 would hide that from a client that asks nothing more
    local inst = sup:get(service, id)
    if inst and inst.unsaved then return reply(200, spawned_json(inst)) end
    return 204, {}, ""
  end, "instance")

  route("POST", "/api/instances/([^/]+)/restart", function(_, key)
    local service, id = target(key)
    if not service then return fail("bad_request", id) end
    local inst, why, code = start_in_turn(service, id, sup.restart)
    if not inst then return fail(code or "internal", why) end
    return reply(200, spawned_json(inst))
  end, "instance")

  route("GET", "/api/instances/([^/]+)/health", function(_, key)
    local service, id = target(key)
    if not service then return fail("bad_request", id) end
    local inst = sup:get(service, id)
    if not inst then return fail("not_found", "no instance " .. supervisor.key(service, id)) end
    local ok, why = sup:check(service, id)
    return reply(200, { instance = inst.key, health = inst.health, check = ok and "ok" or "failed",
      error = not ok and why or nil, state = inst.state })
  end, "instance")

  -- the original's storage answer
  route("GET", "/api/instances/([^/]+)/storage", function(_, key)
    local service, id = target(key)
    if not service then return fail("bad_request", id) end
    local inst = sup:get(service, id)
    if not inst then return fail("not_found", "no instance " .. supervisor.key(service, id)) end
    local snap = inst:snapshot()
    local path = (require("tenement.config").instance_vars(ctx.cfg, service, id) or {}).instance_dir
    local used = snap.storage_used_bytes
    if not used and path then used = api.disk_usage(path) end
    local quota = snap.storage_quota_bytes
    return reply(200, { used_bytes = used or 0, quota_bytes = quota, path = path,
      usage_percent = quota and used and (used * 100 / quota) or nil })
  end, "instance")

  route("PUT", "/api/instances/([^/]+)/weight", function(req, key)
    local service, id = target(key)
    if not service then return fail("bad_request", id) end
    local body, err, bcode = json_body(req)
    if not body then return fail(bcode or "bad_request", err) end
    local w = body.weight
    if math.type(w) ~= "integer" then return fail("bad_request", 'field "weight" must be an integer from 0 to 100') end
    -- set_weight makes the instance it names (a deploy weighs its version
    -- before starting it): from here that would leave one nobody spawned,
    -- which its subdomain would then wake
    if ctx.cfg.services[service] and not sup:get(service, id) then
      return fail("not_found", "no instance " .. supervisor.key(service, id))
    end
    local inst, why, code = sup:set_weight(service, id, w)
    if not inst then return fail(code or "internal", why) end
    return reply(200, { instance = inst.key, weight = inst.weight })
  end, "admin") -- a weight shares out the service's traffic, which is no tenant's alone

  route("GET", "/api/routes/([^/]+)", function(_, service)
    if not ctx.cfg.services[service] then return fail("not_found", "no service " .. service) end
    local w = deploy.weights(sup, service)
    w.instances = json.array(w.instances)
    return reply(200, w)
  end, "admin")

  -- PUT /api/routes/SERVICE {"weights": {"ID": n, ...}}: several at once
  route("PUT", "/api/routes/([^/]+)", function(req, service)
    if not ctx.cfg.services[service] then return fail("not_found", "no service " .. service) end
    local body, err, bcode = json_body(req)
    if not body then return fail(bcode or "bad_request", err) end
    if type(body.weights) ~= "table" then return fail("bad_request", 'field "weights" must be an object of id: weight') end
    for id, w in pairs(body.weights) do
      if math.type(w) ~= "integer" or w < 0 or w > 100 then
        return fail("bad_request", string.format("weights.%s must be an integer from 0 to 100", tostring(id)))
      end
      if not sup:get(service, id) then return fail("not_found", "no instance " .. service .. ":" .. tostring(id)) end
    end
    -- raises before cuts: each weight is written to the store, which yields,
    -- before the next is set, and cutting first could leave the service
    -- with no weight at all meanwhile (and its requests a 503)
    local refused = {}
    for pass = 1, 2 do
      for id, w in pairs(body.weights) do
        local inst = sup:get(service, id) -- (a set_weight before yielded: it may be gone)
        local raise = not inst or w >= inst.weight
        if (pass == 1) == raise then
          local ok, werr = sup:set_weight(service, id, w)
          if not ok then refused[#refused + 1] = service .. ":" .. id .. ": " .. werr end
        end
      end
    end
    -- those set stay set (each was recorded); the others are said
    if #refused > 0 then
      table.sort(refused)
      return fail("internal", table.concat(refused, "; "))
    end
    local w = deploy.weights(sup, service)
    w.instances = json.array(w.instances)
    return reply(200, w)
  end, "admin")

  route("POST", "/api/route", function(req)
    local body, err, bcode = json_body(req)
    if not body then return fail(bcode or "bad_request", err) end
    local service, serr = field(body, "service", "process")
    if not service then return fail("bad_request", serr) end
    local from, ferr = field(body, "from")
    if not from then return fail("bad_request", ferr) end
    local to, terr = field(body, "to")
    if not to then return fail("bad_request", terr) end
    local res, why, code = deploy.shift(sup, service, from, to)
    if not res then return fail(code or "internal", why) end
    return reply(200, res)
  end, "admin")

  route("POST", "/api/deploy", function(req)
    local body, err, bcode = json_body(req)
    if not body then return fail(bcode or "bad_request", err) end
    local service, serr = field(body, "service", "process")
    if not service then return fail("bad_request", serr) end
    local version, verr = field(body, "version")
    if not version then return fail("bad_request", verr) end
    local weight = body.weight == nil and 100 or body.weight
    if math.type(weight) ~= "integer" or weight < 0 or weight > 100 then
      return fail("bad_request", 'field "weight" must be an integer from 0 to 100')
    end
    local timeout = body.timeout == nil and 30 or body.timeout
    if math.type(timeout) ~= "integer" or timeout < 1 then
      return fail("bad_request", 'field "timeout" must be a whole number of seconds >= 1')
    end
    if not ctx.cfg.services[service] then return fail("not_found", "no service " .. service) end
    local ok, nerr = require("tenement.config").valid_name(version)
    if not ok then return fail("bad_request", "version " .. nerr) end
    local res, why, code = start_in_turn(service, version, function()
      return deploy.deploy(sup, service, version, weight, timeout)
    end)
    if not res then return fail(code or "internal", why) end
    return reply(200, res)
  end, "admin")

  route("POST", "/api/reload", function()
    local summary, err = ctx.reload()
    if not summary then
      -- the server's log is where an operator looks later, as for SIGHUP
      log.error("reload failed, nothing changed: %s", err)
      return fail("bad_request", err)
    end
    for k, v in pairs(summary) do summary[k] = json.array(v) end
    -- the file read: a client that named another one learns it was not
    summary.config = core.fs.realpath(ctx.cfg.source) or ctx.cfg.source
    return reply(#summary.failed > 0 and 409 or 200, summary)
  end, "admin")

  route("POST", "/api/services/([^/]+)/rollout", function(_, service)
    local n, err, code = ctx.rollout(service)
    if not n then return fail(code or "internal", err) end
    return reply(200, { service = service, replaced = n })
  end, "admin")

  route("GET", "/api/services", function(req)
    local out = json.array()
    -- a tenant sees the services its instances belong to, not how the
    -- others are run (their command lines may carry anything)
    local scope = req.principal and not req.principal.admin and (req.principal.scope or {})
    for _, name in ipairs(ctx.cfg.service_names or {}) do
      local s = ctx.cfg.services[name]
      if not scope or (scope.id and (scope.service == name or (scope.service == nil and sup:get(name, scope.id)))) then
        out[#out + 1] = { name = name, command = s.command, isolation = s.isolation,
          health = s.health, restart = s.restart, idle_timeout = s.idle_timeout }
      end
    end
    return reply(200, out)
  end, "scoped")

  -- GET /api/logs?instance=&q=&stream=&since=&limit=&after=&wait=
  -- `wait` (seconds) turns it into a long poll: with `after`, it returns as
  -- soon as newer lines exist (used by `ten logs -f` over the socket).
  -- The filters of /api/logs and /api/logs/stream, checked against the
  -- token's scope. -> filter, query | nil, status, headers, body
  local function log_filter(req)
    local p = api.parse_query(req.query)
    local instance = p.instance
    local service
    if (not instance or instance == "") and p.process and p.process ~= "" then
      if p.id and p.id ~= "" then
        instance = p.process .. ":" .. p.id
      else
        -- the original's process alone names a service: dropped, it gave
        -- every service's lines
        local ok, why = require("tenement.config").valid_name(p.process)
        if not ok then return nil, fail("bad_request", "process " .. why) end
        service = p.process
      end
    elseif (not instance or instance == "") and p.id and p.id ~= "" then
      return nil, fail("bad_request", "id needs process (the service), or use instance=SERVICE:ID")
    end
    -- a value that is not a number is refused: taken as absent, since=DATE
    -- filtered nothing and limit=ten gave 100 lines, without a word
    for _, name in ipairs { "since", "after", "limit", "wait" } do
      local v = p[name]
      if v and v ~= "" and not tonumber(v) then
        return nil, fail("bad_request", string.format("%s must be a number, not %q", name, v))
      end
    end
    -- seconds, but the answer's own timestamps are in milliseconds: one of
    -- those given back filtered everything out, without a word
    local since = tonumber(p.since)
    if since and since > os.time() + 86400 then
      return nil, fail("bad_request", string.format("since is seconds since the epoch, and %s is more than a day "
        .. "ahead (milliseconds? that is since=%d)", p.since, math.floor(since / 1000)))
    end
    local given = p.limit ~= nil and p.limit ~= ""
    local limit = given and math.tointeger(tonumber(p.limit))
    if given and not (limit and limit >= 1 and limit <= 10000) then
      -- the store would cut it to its range without a word
      return nil, fail("bad_request", string.format("limit must be a whole number from 1 to 10000, not %s", p.limit))
    end
    local filter = {
      instance = instance ~= "" and instance or nil, service = service,
      q = p.q or p.search, stream = p.stream or p.level,
      since = tonumber(p.since), after = tonumber(p.after), limit = limit or nil,
      max_bytes = LOG_ANSWER_BYTES,
    }
    if filter.q then
      -- here and not only in the store: the event stream never reads the
      -- store's errors, it would ask again every 250 ms and send nothing
      local _, qerr = require("tenement.store").fts_query(filter.q)
      if qerr then return nil, fail("bad_request", qerr) end
    end
    if filter.stream and filter.stream ~= "stdout" and filter.stream ~= "stderr" then
      return nil, fail("bad_request", "stream must be stdout or stderr")
    end
    local principal = req.principal
    if principal and not principal.admin and not filter.instance then
      local sc = principal.scope or {}
      if not sc.service then
        return nil, fail("bad_request", string.format("a tenant token must name the instance: ?instance=SERVICE:%s "
          .. "(with the CLI: ten logs SERVICE:%s)", tostring(sc.id), tostring(sc.id)))
      end
      filter.instance = sc.service .. ":" .. sc.id
    end
    if filter.instance then
      local s, id = supervisor.parse_key(filter.instance)
      if not s then return nil, fail("bad_request", id) end
      if not api.allows(req, s, id) then return nil, fail("forbidden", "this token does not cover " .. filter.instance) end
    end
    return filter, p
  end

  local function line_json(r)
    local service, id = r.instance:match("^([^:]+):(.*)$")
    return { seq = r.seq, timestamp = math.floor(r.ts * 1000), time = r.ts,
      instance = r.instance, process = service, instance_id = id, stream = r.stream,
      level = r.stream, pid = r.pid, message = r.message, highlighted = r.highlighted }
  end

  route("GET", "/api/logs", function(req)
    local filter, p, headers, body = log_filter(req)
    if not filter then return p, headers, body end
    local wait = math.min(tonumber(p.wait) or 0, 60)
    local deadline = core.now() + wait * 1000
    local asked_once = false
    while true do
      if ctx.flush_logs then ctx.flush_logs(filter) end
      local rows, err = store:logs(filter)
      if not rows then return fail("bad_request", err) end
      -- an instance no one knows, of which the store holds no line either
      -- (a misspelt id): said, not answered with an empty list
      if #rows == 0 and not asked_once and filter.instance then
        local s, id = supervisor.parse_key(filter.instance)
        local any = not sup:get(s, id) and store:logs { instance = filter.instance, limit = 1 }
        if any and #any == 0 then
          return fail("not_found", "no instance " .. filter.instance .. ", and no lines of it in the store")
        end
      end
      asked_once = true
      -- a stopping server answers what it has: a poller that went away
      -- would otherwise hold the drain for the rest of its wait
      -- a token revoked meanwhile is refused at once, not at the end of the wait
      if req.authorized and not req.authorized() then return fail("unauthorized", "the token was revoked") end
      if #rows > 0 or core.now() >= deadline or (ctx.stopping and ctx.stopping()) or req.client_closed then
        local out = json.array()
        for i = #rows, 1, -1 do out[#out + 1] = line_json(rows[i]) end -- oldest first
        return reply(200, out)
      end
      core.sleep(200)
    end
  end, "scoped")

  -- GET /api/logs/stream: Server-Sent Events, one `data: <json line>` per
  -- line, as they are captured; same filters. The store is the buffer: a
  -- slow reader makes the writes wait (backpressure) and falls behind in the
  -- store, never in the server's memory.
  route("GET", "/api/logs/stream", function(req)
    local filter, status, headers, body = log_filter(req)
    if not filter then return status, headers, body end
    if not req.stream then return fail("internal", "this build cannot stream responses") end
    -- each event carries its seq as its id, which a client reconnecting
    -- sends back: without it, what came while it was away was never shown
    local last_id = req.headers and req.headers["last-event-id"]
    if not filter.after and last_id and last_id ~= "" then
      filter.after = tonumber(last_id)
      if not filter.after then
        return fail("bad_request", string.format("Last-Event-ID must be a number, not %q", last_id))
      end
    end
    if not filter.after then
      if ctx.flush_logs then ctx.flush_logs(filter) end
      local last = store:logs { instance = filter.instance, limit = 1 }
      filter.after = last and last[1] and last[1].seq or 0
    end
    filter.limit = 1000
    local out, err = req:stream(200, { ["content-type"] = "text/event-stream", ["cache-control"] = "no-cache" })
    if not out then return nil, err end
    local quiet_since = core.now()
    while true do
      if ctx.flush_logs then ctx.flush_logs(filter) end
      local rows = store:logs(filter) or {}
      local chunk = {}
      for i = #rows, 1, -1 do
        local r = rows[i]
        chunk[#chunk + 1] = "id: " .. r.seq .. "\ndata: " .. json.encode(line_json(r)) .. "\n\n"
        filter.after = math.max(filter.after, r.seq)
      end
      -- a client that reads slowly holds this loop back, not the memory
      while out:queued() > 256 * 1024 do core.sleep(50) end
      local ok
      if #chunk > 0 then
        ok = out:write(table.concat(chunk))
        quiet_since = core.now()
      elseif core.now() - quiet_since > 15000 then
        ok = out:write(": keep-alive\n\n") -- proxies close silent connections
        quiet_since = core.now()
      else
        ok = true
      end
      -- a token revoked while no line comes: the write ends the stream with
      -- its error event (server.lua's revocable), not 15 s later at a keep-alive
      if ok and req.authorized and not req.authorized() then ok = out:write(": revoked\n\n") end
      if not ok or req.client_closed then return end -- the client went away
      if ctx.stopping and ctx.stopping() then out:finish() return end -- its client reconnects to the next server
      core.sleep((#rows == filter.limit or rows.capped) and 0 or 250)
    end
  end, "scoped")

  return function(req)
    local path = req.path
    local allowed = {}
    for _, r in ipairs(routes) do
      local caps = { path:match(r.pattern) }
      if caps[1] ~= nil then
        if r.method == req.method or (r.method == "GET" and req.method == "HEAD") then
          local p = req.principal
          if p and r.access == "admin" and not p.admin then
            return fail("forbidden", "this needs an admin token (this one is for a tenant)")
          elseif p and r.access == "instance" then
            local service, id = supervisor.parse_key(api.unescape(caps[1]))
            if service and not auth.allows(p, service, id) then
              return fail("forbidden", "this token does not cover " .. service .. ":" .. id)
            end
          end
          local ok, status, headers, body = pcall(r.fn, req, table.unpack(caps))
          if not ok then
            require("tenement.log").error("API %s %s failed: %s", req.method, path, tostring(status))
            return fail("internal", "internal error (see the server log)")
          end
          return status, headers, body
        end
        if not allowed[r.method] then
          allowed[r.method] = true
          allowed[#allowed + 1] = r.method
          -- HEAD is answered wherever GET is: a client told
          -- otherwise by Allow would not try it
          if r.method == "GET" then allowed[#allowed + 1] = "HEAD" end
        end
      end
    end
    if #allowed > 0 then
      local _, _, body = fail("method_not_allowed", req.method .. " is not allowed on " .. path)
      return 405, { ["content-type"] = "application/json", allow = table.concat(allowed, ", ") }, body
    end
    return fail("not_found", "no such endpoint: " .. req.method .. " " .. path)
  end
end

return api
