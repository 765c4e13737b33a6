-- The front door: HTTP requests to `ten serve` come through here to decide
-- where they go; the bytes then flow in C (req:proxy).
--
-- Route (policy, hookable) -> wake the instance if it sleeps (one start shared
-- by every waiting request, bounded by startup_timeout) -> proxy to its Unix
-- socket. The bare domain is the server's own: /health, /api/, /metrics.
--
-- Once a Host has been routed to a running instance (and no router hook
-- could decide otherwise per request), the decision is handed to the C
-- server as a direct route: its next requests are proxied without entering
-- Lua at all. Any change to that instance (its state, its socket, the
-- configuration) invalidates the direct route, and the next request comes
-- back here to be decided again.
local core = require "tenement.core"
local router = require "tenement.router"
local hooks = require "tenement.hooks"
local log = require "tenement.log"
local metrics = require "tenement.metrics"
local sync = require "tenement.sync"
local supervisor = require "tenement.supervisor"

local frontdoor = {}

local Door = {}
Door.__index = Door

local TEXT = { ["content-type"] = "text/plain; charset=utf-8" }

local function text_reply(_, status, body, extra)
  local headers = { ["content-type"] = TEXT["content-type"] }
  for k, v in pairs(extra or {}) do headers[k] = v end
  return status, headers, body .. "\n"
end

-- frontdoor.new{ cfg, sup, own = handler for the server's own pages, store }
function frontdoor.new(ctx)
  local self = setmetatable({
    cfg = ctx.cfg, sup = ctx.sup, own = ctx.own, store = ctx.store,
    cold_starts = 0,
    waking = {},       -- "service:id" -> event set when its start is over
    creating = {},     -- "service:id" -> service, for starts of ids the supervisor did not know
    guards = {},       -- service -> upstream invalidated when its set of instances changes
    -- requests decided here (not the direct ones); router hook calls that failed
    stats = { requests = 0, by_route = {}, hook_failures = 0 },
  }, Door)
  -- a broken hook fails on every request: the first ones say why, the rest
  -- are counted (log.limited), so a flood of requests is no flood of lines
  local told
  told, self.flush_hook_errors = log.limited("error", 10, "router hook failures")
  self.hook_error = function(...)
    self.stats.hook_failures = self.stats.hook_failures + 1
    told(...)
  end
  local hook, err = frontdoor.load_hook(ctx.cfg)
  if hook == nil then return nil, err end
  self:configure(ctx.cfg, hook)
  -- whatever happens to an instance (state, weight) may change where its
  -- host, and its service's host, should go
  self.unsubscribe = self.sup:on(function(ev)
    local inst = ev.instance and self.sup.instances[ev.instance]
    if inst then inst:reroute() end
    local guard = ev.service and self.guards[ev.service]
    if guard then guard:invalidate() end
  end)
  return self
end

-- door:attach(http_server): where direct routes go (the server the
-- handler serves).
function Door:attach(http)
  self.http = http
end

-- frontdoor.load_hook(cfg) -> the router hook cfg names (false for none)
-- | nil, err. Loaded before anything else changes: a reload whose hook
-- does not load changes nothing.
function frontdoor.load_hook(cfg)
  if not (cfg.hooks and cfg.hooks.router) then return false end
  local loaded, err = hooks.load(cfg.hooks.router, "route")
  if not loaded then return nil, err end
  return loaded.route
end

-- (Re)reads what routing depends on from cfg: the domain, [routing], the
-- services; and hook, from frontdoor.load_hook(cfg).
function Door:configure(cfg, hook)
  local services = {}
  for name in pairs(cfg.services) do services[name] = true end
  self.cfg = cfg
  self.view = { domain = cfg.settings.domain, routing = cfg.routing, services = services }
  self.hook_view = hook and hooks.plain(self.view)
  self.route_hook = hook
  self.generation = (self.generation or 0) + 1
  if self.http then self.http:clear_routes() end
  -- a reload may add or drop instances of any service
  for _, guard in pairs(self.guards) do guard:invalidate() end
end

-- door:withdraw(service): the service is on its way out of the
-- configuration (a reload is stopping its instances): from now on no
-- request routes to it, so none wakes an instance the reload just stopped.
function Door:withdraw(service)
  self.view.services[service] = nil
  if self.hook_view then self.hook_view.services[service] = nil end
  self.generation = self.generation + 1
  if self.http then self.http:clear_routes() end
end

-- The hook's answer as a target of plain values, or nil and why it is not
-- one. Its fields are read raw and never turned into text: a metatable's
-- __index or __tostring would run here, outside the hook's budget, and one
-- that loops would hold the whole loop.
local function valid_name(v)
  return type(v) == "string" and #v <= 63 and v:match("^[a-z0-9][a-z0-9-]*$") ~= nil
end

local function hook_target(t)
  if type(t) == "string" then
    local service, id = t:match("^([^:]*):(.*)$")
    if not service then service = t end
    if not valid_name(service) or (id and not valid_name(id)) then
      return nil, string.format("%q: a string target must be SERVICE or SERVICE:ID (lower-case names)", t:sub(1, 100))
    end
    return { kind = id and "instance" or "service", service = service, id = id }
  end
  if type(t) ~= "table" then return nil, "a " .. type(t) .. ", not a target" end
  local kind = rawget(t, "kind")
  if kind == "self" then return { kind = "self" } end
  if kind == "service" or kind == "instance" then
    local service, id = rawget(t, "service"), rawget(t, "id")
    if not valid_name(service) or (kind == "instance" and not valid_name(id)) then
      return nil, "a target of kind " .. kind .. " needs a valid service" .. (kind == "instance" and " and id" or "")
    end
    return { kind = kind, service = service, id = kind == "instance" and id or nil }
  end
  if kind == "status" then
    local status, reason = rawget(t, "status"), rawget(t, "reason")
    if math.type(status) ~= "integer" or status < 200 or status > 599 then
      return nil, "a status target needs status = an integer from 200 to 599, not " .. (status == nil and "none"
        or type(status) == "string" and string.format("the string %q", status:sub(1, 40))
        or tostring(status):sub(1, 40))
    end
    if reason ~= nil and type(reason) ~= "string" then return nil, "a status target's reason must be a string" end
    local retry = rawget(t, "retry_after")
    if retry ~= nil and (math.type(retry) ~= "integer" or retry < 0 or retry > 86400) then
      return nil, "a status target's retry_after must be an integer number of seconds from 0 to 86400"
    end
    -- no reason: an empty body, never the door's own "not found" under another status
    return { kind = "status", status = status, reason = reason or "", retry_after = retry }
  end
  return nil, "a table without a valid kind (self, service, instance or status)"
end

function Door:route(req)
  if not self.route_hook then
    return router.route({ method = req.method, host = req.host, path = req.path }, self.view)
  end
  -- headers of the hook's own: the server reads the request's afterwards
  -- (the API its Authorization), and a metatable the hook set on them
  -- would run there, outside the hook's budget
  local headers = {}
  for k, v in pairs(req.headers) do headers[k] = v end
  -- host and path as sent, and as the default router compares them: a rule
  -- on request.host alone missed "Staging.example.com:8080" and "/%73hop"
  local request = { method = req.method, host = req.host, path = req.path, query = req.query, headers = headers,
    hostname = router.normalize_host(req.host), normal_path = router.normalize_path(req.path or "/") }
  local view = self.view
  local function default(r) return router.route(r or request, view) end
  -- the hook gets a view of its own: what it changes there (by design or by
  -- mistake) must not become the routing of every later request
  local ok, result = hooks.call(self.route_hook, request, self.hook_view, default)
  if not ok then
    -- an error value that is not a string may carry a __tostring of the hook's
    local why = type(result) == "string" and result or ("an error value of type " .. type(result))
    -- a Lua error names the file and line; the budget's and the memory cap's do not
    local file = self.cfg.hooks.router
    if not why:find(file, 1, true) then why = file .. ": " .. why end
    self.hook_error(string.format("router hook failed (the default routing applies): %s", why))
  elseif result ~= nil then
    local target, why = hook_target(result)
    if target then
      if (target.kind == "instance" or target.kind == "service") and not self.view.services[target.service] then
        self.hook_error(string.format("router hook %s chose unknown service %q (the default routing applies)",
          self.cfg.hooks.router, target.service))
      else
        return target
      end
    else
      self.hook_error(string.format("router hook %s returned an unusable target (the default routing applies): %s",
        self.cfg.hooks.router, why))
    end
  end
  -- the request as it came, not as the hook may have left it
  return router.route({ method = req.method, host = req.host, path = req.path }, view)
end

-- Is service:id an instance this server knows (so a request may wake it)?
function Door:known(service, id)
  if self.sup:get(service, id) then return true end
  for _, inst in ipairs(self.cfg.instances) do
    if inst.service == service and inst.id == id then return true end
  end
  return false
end

-- The first line only: a start that failed quotes the app's last output
-- under it, which is for `ten ps` and the log, not for whoever asked.
-- retry_after: seconds, for a 503 that clears by itself (a start under way,
-- too many starting); none for one that waits on an operator (a failed
-- instance, a stop, a full max_instances), where a client retrying on the
-- header would only knock again
local function unavailable(req, why, retry_after)
  return text_reply(req, 503, why:match("^[^\n]*"), retry_after and { ["retry-after"] = tostring(retry_after) })
end

-- Retry-After for a start that did not come: 5 s, unless the supervisor
-- gave up on the instance (failed), which only an operator clears: a client
-- told to come back would come back to the same answer.
function Door:retry_after(service, id)
  local inst = self.sup:get(service, id)
  if inst and (inst.state == "failed" or inst.held) then return nil end
  return 5
end

-- Makes sure service:id runs; wakes or starts it if needed. Every request
-- that arrives during a start waits for that one start (100 requests, one
-- spawn), and every wait is bounded by startup_timeout.
-- -> inst | nil, status, why, retry_after (seconds, when it clears by itself)
function Door:ensure_running(service, id, on_demand)
  local sup = self.sup
  local key = service .. ":" .. id
  local inst = sup:get(service, id)
  if inst and inst.state == "running" then return inst end
  -- an operator's stop holds until an operator starts it again
  if inst and inst.held then
    return nil, 503, string.format("%s was stopped by an operator (`ten spawn %s` starts it)", key, key)
  end
  local svc = self.cfg.services[service]
  local limit_ms = svc.startup_timeout * 1000 + 1000

  local waking = self.waking[key]
  if waking then
    local started, err = waking:wait(limit_ms)
    if started then return started end
    return nil, 503, err or (key .. " did not start in time"), self:retry_after(service, id)
  end

  if inst and inst.state == "failed" then
    -- anyone may read this: the exit, never the output quoted under it (an
    -- app's last lines may hold a secret); `ten ps` and the log have all
    return nil, 503, string.format("%s has failed (%s); `ten restart %s` clears it",
      key, (inst.last_exit or "?"):match("^[^\n]*"), key)
  end
  if inst and inst.state == "unhealthy" then return nil, 503, key .. " is unhealthy", 5 end
  -- the supervisor is restarting it (after a crash): that start is the one
  -- to wait for. sup:spawn would not wait: its ready event is the earlier
  -- life's, still set, and the request went to a socket nobody listened on
  if inst and (inst.state == "backoff" or inst.state == "starting") then
    local state = inst:wait_state(supervisor.SETTLED, limit_ms)
    if state == "running" then return inst end
    return nil, 503, string.format("%s is %s", key, state or ("still " .. (inst.state == "backoff" and "restarting"
      or "starting"))), 5
  end
  if on_demand and not inst and svc.max_instances then
    -- what exists counts: processes, and sleeping or failed ids (a wake or
    -- `ten restart` away); a stopped one holds nothing. The ids this door is
    -- creating count too: the supervisor knows one only once its start task
    -- runs, and strangers arriving together would each find room for one more
    local count = sup:count_held(service)
    for k, s in pairs(self.creating) do
      if s == service and not sup.instances[k] then count = count + 1 end
    end
    if count >= svc.max_instances then
      return nil, 503, string.format("%s has reached max_instances = %d", service, svc.max_instances)
    end
  end
  if self.cold_starts >= self.cfg.settings.max_cold_starts then
    return nil, 503, "too many instances are starting right now", 1
  end

  waking = sync.event()
  self.waking[key] = waking
  if not inst then self.creating[key] = service end
  self.cold_starts = self.cold_starts + 1
  local t0 = core.now()
  local task = core.spawn(sup.spawn, sup, service, id, { why = "for a request" })
  local ok, started, err = task:join(limit_ms)
  self.cold_starts = self.cold_starts - 1
  self.waking[key] = nil
  self.creating[key] = nil
  -- join says nil, "timeout" (or nil and the task's error): what comes
  -- second is then no instance
  if not ok then
    err = started == "timeout" and (key .. " did not start within startup_timeout")
      or string.format("starting %s failed: %s", key, tostring(started))
    started = nil
  end
  if not started then
    waking:set(nil, err)
    return nil, 503, err, self:retry_after(service, id)
  end
  started.stats.wakes = started.stats.wakes + 1
  metrics.observe(started.stats.wake, (core.now() - t0) / 1000)
  waking:set(started)
  return started
end

-- The weighted set a service host may be handed to C as: every running
-- instance with a weight, or nil while any of them is mid-rollout, or while
-- one with a weight sleeps or starts (router.pick draws it too, and C only
-- knows running ones: the draw stays in Lua until all are up).
function Door:service_set(candidates)
  local set = {}
  for _, c in ipairs(candidates) do
    if (c.weight or 0) > 0 then
      if c.state == "sleeping" or c.state == "starting" then return nil end
      if c.state == "running" then
        if c.route_socket then return nil end
        set[#set + 1] = c:upstream()
        set[#set + 1] = c.weight
      end
    end
  end
  if #set == 0 then return nil end
  local guard = self.guards[candidates[1].service]
  if not guard then
    guard = core.http.upstream { name = candidates[1].service }
    self.guards[candidates[1].service] = guard
  end
  return set, guard
end

-- Proxies req to inst through its upstream, which counts the request (in
-- flight, so the reaper never puts an instance to sleep under one; done,
-- with its status, bytes and time) and answers 502 itself when the
-- instance does not. direct: hand this Host to the C server from now on
-- (true: to inst; a function: to the set it returns).
function Door:proxy(req, inst, direct)
  local upstream = inst:upstream()
  -- req:proxy returns when the exchange is over: a reload meanwhile (a hook
  -- added, the domain changed) cleared the direct routes, and this one,
  -- decided under the configuration before it, must not come back
  local generation = self.generation
  req:proxy(upstream)
  if not (direct and self.http and inst.state == "running" and not inst.route_socket) then return end
  if self.generation ~= generation then return end
  if direct == true then
    self.http:route(req.host, upstream)
  else
    local set, guard = direct()
    if set then self.http:route(req.host, set, guard) end
  end
end

function Door:handle(req)
  self.stats.requests = self.stats.requests + 1
  local target = self:route(req)
  self.stats.by_route[target.kind] = (self.stats.by_route[target.kind] or 0) + 1
  if target.kind == "self" then
    return self.own(req)
  elseif target.kind == "status" then
    -- a 503 says when to come back, as the door's own 503s do: clients
    -- and load balancers that honour it retry later instead of at once
    local retry = target.retry_after or (target.status == 503 and 5 or nil)
    return text_reply(req, target.status or 404, target.reason or "not found",
      retry and { ["retry-after"] = tostring(retry) })
  end

  local service, id = target.service, target.id
  -- a [routing] name or a hook may still point at a service being withdrawn
  if not self.view.services[service] then
    return text_reply(req, 404, "no service " .. service .. " here")
  end
  local svc = self.cfg.services[service]
  -- only a decision made from the host alone can be handed to C, and none
  -- a hook makes: it may look at the path or the headers of every request
  local by_host = target.by_host and not self.route_hook
  local direct = target.kind == "instance" and by_host or nil
  if target.kind == "service" then
    local candidates = self.sup:of_service(service)
    local pick = router.pick(candidates, math.random)
    if not pick then
      if #candidates == 0 then
        return text_reply(req, 404, "no instances of " .. service .. " (start one with `ten spawn " .. service .. ":ID`)")
      end
      -- an unhealthy one may recover; weights of 0, an operator's stop or a
      -- failure wait for an operator, and a Retry-After would only bring
      -- the client back to the same answer
      local weighed, recovering = false, false
      for _, c in ipairs(candidates) do
        if (c.weight or 0) > 0 then
          weighed = true
          if c.state == "unhealthy" and not c.held then recovering = true end
        end
      end
      if not weighed then
        return unavailable(req, string.format("every instance of %s has weight 0 (`ten weight %s:ID N` gives one "
          .. "traffic)", service, service))
      end
      return unavailable(req, "no instance of " .. service .. " can take requests now", recovering and 5 or nil)
    end
    id = pick.id
    -- the set is made after the proxy call, from the instances the service
    -- has then: a woken one runs by then, and one spawned (or deployed)
    -- meanwhile belongs in it, its events having gone to the guard before
    -- the route existed
    if by_host then direct = function() return self:service_set(self.sup:of_service(service)) end end
  else
    if not self:known(service, id) and not svc.on_demand then
      return text_reply(req, 404, string.format("no instance %s:%s", service, id))
    end
  end

  local inst, status, why, retry_after = self:ensure_running(service, id, svc.on_demand)
  if not inst then
    if status == 503 then return unavailable(req, why, retry_after) end
    return text_reply(req, status, why)
  end
  self:proxy(req, inst, direct)
end

-- frontdoor:handler() -> function(req) for core.http.serve
function Door:handler()
  return function(req) return self:handle(req) end
end

-- The reaper: instances idle longer than their idle_timeout go to sleep.
-- Only proxied requests count as activity; one in flight keeps it awake.
function Door:reap_idle(now)
  for _, inst in pairs(self.sup.instances) do
    local timeout = inst.svc.idle_timeout
    local active = timeout > 0 and inst.state == "running" and inst:last_active()
    if active and inst:inflight() == 0 and now - active >= timeout * 1000 then
      log.info("%s idle for %d s: going to sleep", inst.key, (now - active) // 1000)
      core.spawn(self.sup.sleep, self.sup, inst.service, inst.id, "idle for " .. timeout .. " s", active)
    end
  end
end

function Door:run_reaper()
  while not self.stopped do
    core.sleep(1000)
    self:reap_idle(core.now())
  end
end

return frontdoor
