-- Prometheus metrics, text exposition format 0.0.4.
--
-- Names: tenement_ prefix, base units (seconds, bytes), _total on counters.
-- Instances are labelled service="api",id="prod" everywhere; an instance
-- that is forgotten drops out, so the series stay bounded.
local core = require "tenement.core"

local metrics = {}

metrics.BUCKETS = { 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10 }
metrics.WAKE_BUCKETS = { 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30 }

-- The counts come with the first observation: every instance has two
-- histograms, and most of a thousand instances never serve a request.
function metrics.histogram(buckets)
  return { buckets = buckets, counts = nil, sum = 0, count = 0 }
end

function metrics.observe(h, v)
  h.sum = h.sum + v
  h.count = h.count + 1
  local b, counts = h.buckets, h.counts
  if not counts then
    counts = {}
    for i = 1, #b do counts[i] = 0 end
    h.counts = counts
  end
  for i = 1, #b do
    if v <= b[i] then counts[i] = counts[i] + 1 return end
  end
end

local SPECIAL = { ["\\"] = "\\\\", ["\n"] = "\\n", ['"'] = '\\"' }
local function escape(v)
  v = tostring(v)
  if not v:find('[\\\n"]') then return v end
  return (v:gsub('[\\\n"]', SPECIAL))
end

-- { "k", "v", ... } -> 'k="v",...', the text between the braces
local function label_text(t)
  if not t or #t == 0 then return "" end
  local parts = {}
  for i = 1, #t, 2 do parts[#parts + 1] = t[i] .. '="' .. escape(t[i + 1]) .. '"' end
  return table.concat(parts, ",")
end

-- The shortest text that reads back as the same number.
local function num(v)
  if math.type(v) == "integer" then return string.format("%d", v) end
  if v ~= v then return "NaN" end
  if v == math.huge then return "+Inf" end
  if v == -math.huge then return "-Inf" end
  local s = string.format("%.15g", v)
  if tonumber(s) == v then return s end
  s = string.format("%.16g", v)
  if tonumber(s) == v then return s end
  return string.format("%.17g", v)
end

-- The le="..." label texts of a bucket list, made once per distinct list (a
-- histogram from C brings a fresh copy of its bounds every time).
local le_made = {}
local function le_texts(buckets)
  for _, made in ipairs(le_made) do
    local b = made.buckets
    if #b == #buckets then
      local same = true
      for i = 1, #b do if b[i] ~= buckets[i] then same = false break end end
      if same then return made.texts end
    end
  end
  local texts = {}
  for i, bound in ipairs(buckets) do texts[i] = 'le="' .. num(bound + 0.0) .. '"} ' end
  texts[#buckets + 1] = 'le="+Inf"} '
  le_made[#le_made + 1] = { buckets = { table.unpack(buckets) }, texts = texts }
  return texts
end

-- A writer collecting families in order, one HELP/TYPE per family. Label
-- sets are given as tables, or as the text label_text made of them (made
-- once per instance: a thousand instances are 57,000 samples). Rendering
-- that many (and reading a thousand cgroups' usage) takes a hundred
-- milliseconds and more, which requests waiting on the same loop would
-- feel: a writer inside a task gives the others a turn every SLICE_NS.
local SLICE_NS = 5e5
local Out = {}
Out.__index = Out

-- Lines are joined into a chunk every CHUNK_LINES and the chunk handed to
-- emit (the response, as it is made) or kept: either way the lines die
-- young, where the generational collector frees them cheaply, instead of
-- living through the whole rendering into the old generation.
local CHUNK_LINES = 512

local function new_out(emit)
  return setmetatable({ lines = {}, n = 0, chunks = {}, emit = emit, seen = {},
    in_task = core.current() ~= nil, since = core.hrtime() }, Out)
end

function Out:flush()
  if self.n == 0 then return end
  local chunk = table.concat(self.lines, "\n", 1, self.n) .. "\n"
  self.n = 0
  if self.emit then self.emit(chunk) else self.chunks[#self.chunks + 1] = chunk end
end

function Out:add(line)
  local n = self.n + 1
  self.lines[n] = line
  self.n = n
  if n % 16 ~= 0 then return end
  if n >= CHUNK_LINES then self:flush() end
  self:pause()
end

-- The others' turn, once this writer had its slice.
function Out:pause()
  if self.in_task and core.hrtime() - self.since > SLICE_NS then
    coroutine.yield()
    self.since = core.hrtime()
  end
end

function Out:text()
  self:flush()
  return table.concat(self.chunks)
end

function Out:family(name, kind, help)
  if self.seen[name] then return end
  self.seen[name] = true
  self:add("# HELP " .. name .. " " .. help)
  self:add("# TYPE " .. name .. " " .. kind)
end

function Out:sample(name, l, v)
  if type(l) == "table" then l = label_text(l) end
  if l and l ~= "" then self:add(name .. "{" .. l .. "} " .. num(v))
  else self:add(name .. " " .. num(v)) end
end

function Out:histogram(name, l, h)
  if type(l) == "table" then l = label_text(l) end
  l = l or ""
  local texts = le_texts(h.buckets)
  local prefix = name .. "_bucket{" .. l .. (l ~= "" and "," or "")
  local cum, counts = 0, h.counts
  for i = 1, #h.buckets do
    cum = cum + (counts and counts[i] or 0)
    self:add(prefix .. texts[i] .. num(cum))
  end
  self:add(prefix .. texts[#texts] .. num(h.count))
  self:sample(name .. "_sum", l, h.sum + 0.0)
  self:sample(name .. "_count", l, h.count)
end

-- Memory and CPU of a process from /proc (used where no cgroup says more).
local CLK_TCK = 100
local PAGE = 4096
function metrics.proc_usage(pid)
  if not pid then return nil end
  local f = io.open("/proc/" .. pid .. "/stat")
  if not f then return nil end
  local stat = f:read("a")
  f:close()
  local rest = stat:match("%) (.*)$")
  if not rest then return nil end
  local fields = {}
  for w in rest:gmatch("%S+") do fields[#fields + 1] = w end
  -- after the comm: state(1) ... utime(12) stime(13) ... rss(22)
  local cpu = (tonumber(fields[12]) + tonumber(fields[13])) / CLK_TCK
  local rss = tonumber(fields[22]) * PAGE
  return { cpu_seconds = cpu, memory_bytes = rss }
end

local STATES = { "stopped", "starting", "running", "unhealthy", "backoff", "stopping", "sleeping", "failed" }

-- Lines of output lost so far: those the sink had no room for, and those
-- the store refused (log_stats.write_dropped, counted by the server).
function metrics.lines_dropped(sink, log_stats)
  return sink:stats().dropped + (log_stats and log_stats.write_dropped or 0)
end

-- metrics.render(server [, emit]) -> text, or with emit(chunk) the text
-- piece by piece (4 MB for a thousand instances need not be held whole)
-- server: { sup, door, http (core.http server), sink, log_stats, store_path, started }
function metrics.render(srv, emit)
  local out = new_out(emit)
  out:family("tenement_build_info", "gauge", "Version of the running ten.")
  out:sample("tenement_build_info", { "version", core.version }, 1)
  out:family("tenement_uptime_seconds", "gauge", "Seconds since ten serve started.")
  out:sample("tenement_uptime_seconds", nil, (core.now() - srv.started) / 1000)
  -- the server's own use, under the names every Prometheus client library
  -- gives them, so the usual dashboards and alerts find them
  local own = metrics.proc_usage(core.proc.getpid())
  if own then
    out:family("process_cpu_seconds_total", "counter", "CPU time ten serve used, user and system.")
    out:sample("process_cpu_seconds_total", nil, own.cpu_seconds + 0.0)
    out:family("process_resident_memory_bytes", "gauge", "Resident memory of ten serve.")
    out:sample("process_resident_memory_bytes", nil, own.memory_bytes)
  end
  local fds = core.fs.readdir("/proc/self/fd")
  if fds then
    out:family("process_open_fds", "gauge", "File descriptors ten serve holds open.")
    out:sample("process_open_fds", nil, #fds - 1) -- less the one that listed them
  end
  out:family("tenement_lua_memory_bytes", "gauge", "Bytes the Lua heap holds (within the resident memory).")
  out:sample("tenement_lua_memory_bytes", nil, math.floor(collectgarbage("count") * 1024))

  if srv.http then
    local st = srv.http:stats()
    out:family("tenement_connections_open", "gauge", "HTTP connections open now.")
    out:sample("tenement_connections_open", nil, st.connections_open)
    out:family("tenement_connections_accepted_total", "counter", "HTTP connections accepted.")
    out:sample("tenement_connections_accepted_total", nil, st.connections_accepted)
    out:family("tenement_proxy_errors_total", "counter", "Proxied requests that failed upstream.")
    out:sample("tenement_proxy_errors_total", nil, st.proxy_errors)
  end
  if srv.door then
    -- requests on a direct route were routed once, in Lua, and then by the
    -- C server itself: to an instance, or drawn from a service's set
    local st = srv.http and srv.http:stats() or {}
    local direct = { service = st.direct_service_requests or 0 }
    direct.instance = (st.direct_requests or 0) - direct.service
    out:family("tenement_http_requests_total", "counter", "HTTP requests by where routing sent them.")
    for _, kind in ipairs { "instance", "service", "self", "status" } do
      local n = (srv.door.stats.by_route[kind] or 0) + (direct[kind] or 0)
      out:sample("tenement_http_requests_total", { "route", kind }, n)
    end
    out:family("tenement_router_hook_failures_total", "counter",
      "Requests whose router hook failed or chose no usable target, routed by default instead.")
    out:sample("tenement_router_hook_failures_total", nil, srv.door.stats.hook_failures)
  end
  if srv.sink then
    local st = srv.sink:stats()
    out:family("tenement_log_lines_pending", "gauge", "Captured lines waiting to be written to the store.")
    out:sample("tenement_log_lines_pending", nil, st.pending)
    out:family("tenement_log_lines_dropped_total", "counter",
      "Captured lines dropped because the store could not keep up or refused them.")
    out:sample("tenement_log_lines_dropped_total", nil, metrics.lines_dropped(srv.sink, srv.log_stats))
  end
  if srv.store_path then
    local size = 0
    for _, suffix in ipairs { "", "-wal" } do
      local st = core.fs.stat(srv.store_path .. suffix)
      if st then size = size + st.size end
    end
    out:family("tenement_store_size_bytes", "gauge", "Size of tenement.db and its WAL.")
    out:sample("tenement_store_size_bytes", nil, size)
  end

  -- What each instance counts is read here, in one go with no sample
  -- written (so no yield) in between: an instance forgotten while the text
  -- is made (its ring closed, its cgroup gone) still appears as it was. Only
  -- its cgroup and storage are read later, and only while it is still known.
  local list = {}
  for _, inst in pairs(srv.sup.instances) do list[#list + 1] = inst end
  table.sort(list, function(a, b) return a.key < b.key end)
  local now = core.now()
  local rec = {}
  for i, inst in ipairs(list) do
    local running = inst.state == "running" or inst.state == "unhealthy"
    rec[i] = {
      inst = inst, labels = label_text { "service", inst.service, "id", inst.id }, state = inst.state,
      traffic = inst:traffic(), log = inst.ring:stats(),
      uptime = running and inst.started_at and (now - inst.started_at) / 1000 or 0,
      restarts = inst.restarts, weight = inst.weight, wakes = inst.stats.wakes, wake = inst.stats.wake,
      health_failures = inst.health_failures or 0, storage = inst.storage and inst.dir,
    }
  end
  local function known(r) return srv.sup.instances[r.inst.key] == r.inst end

  local counts = srv.sup:state_counts()
  out:family("tenement_instances", "gauge", "Known instances by state.")
  for _, state in ipairs(STATES) do out:sample("tenement_instances", { "state", state }, counts[state] or 0) end

  local per = {
    { "tenement_instance_up", "gauge", "1 if the instance is running and ready for traffic.",
      function(r) return r.state == "running" and 1 or 0 end },
    { "tenement_instance_restarts_total", "counter", "Restarts of the instance.", function(r) return r.restarts end },
    { "tenement_instance_uptime_seconds", "gauge", "Seconds since the instance's process started.",
      function(r) return r.uptime end },
    { "tenement_instance_weight", "gauge", "Weight in its service (0-100): its share is its weight over the sum of the weights.", function(r) return r.weight end },
    { "tenement_instance_upstream_errors_total", "counter", "Proxied requests the instance failed to answer.",
      function(r) return r.traffic.errors end },
    { "tenement_instance_wakes_total", "counter", "Starts caused by a request (scale from zero).",
      function(r) return r.wakes end },
    { "tenement_instance_health_check_failures_total", "counter",
      "Failed health checks of the running instance (a start that never answers counts in restarts).",
      function(r) return r.health_failures end },
    { "tenement_instance_log_lines_total", "counter", "Lines of output captured.",
      function(r) return r.log.lines end },
    { "tenement_instance_log_lines_dropped_total", "counter",
      "Lines of output dropped before the store took them: the store fell behind, and this instance had the most "
        .. "lines waiting.", function(r) return r.log.dropped end },
    { "tenement_instance_request_bytes_total", "counter", "Request body bytes proxied to the instance.",
      function(r) return r.traffic.bytes_in end },
    { "tenement_instance_response_bytes_total", "counter", "Response bytes proxied from the instance.",
      function(r) return r.traffic.bytes_out end },
  }
  -- { name, kind, help, value(r) } each: a family, one sample an instance
  -- (none where the value is nil)
  local function families(list)
    for _, m in ipairs(list) do
      out:family(m[1], m[2], m[3])
      for _, r in ipairs(rec) do
        local v = m[4](r)
        if v ~= nil then out:sample(m[1], r.labels, v) end
      end
    end
  end
  families(per)

  out:family("tenement_instance_state", "gauge", "1 for the state the instance is in.")
  for _, r in ipairs(rec) do
    for _, state in ipairs(STATES) do
      out:sample("tenement_instance_state", r.labels .. ',state="' .. state .. '"', r.state == state and 1 or 0)
    end
  end

  out:family("tenement_instance_requests_total", "counter", "Proxied requests by status class.")
  for _, r in ipairs(rec) do
    for _, class in ipairs { "1xx", "2xx", "3xx", "4xx", "5xx" } do
      out:sample("tenement_instance_requests_total", r.labels .. ',code="' .. class .. '"',
        r.traffic.by_class[class] or 0)
    end
  end

  -- each instance's usage read once, then each family as one group: the
  -- exposition format wants a family's samples together, not interleaved
  -- with another's
  for _, r in ipairs(rec) do
    out:pause()
    local inst = r.inst
    if known(r) then
      r.usage = inst.usage and inst:usage() or metrics.proc_usage(inst.pid)
      if r.storage then
        r.storage_used, r.storage_size = require("tenement.storage").usage(r.storage)
        -- the quota configured, as the API gives it: the file system's own
        -- size runs a little over it (its metadata)
        local mb = inst.svc and inst.svc.storage_quota_mb
        r.storage_quota = mb and mb * 1024 * 1024 or r.storage_size
      end
    end
  end
  local usage = {
    { "tenement_instance_memory_bytes", "gauge", "Memory used by the instance (cgroup, else its main process RSS).",
      function(r) return r.usage and r.usage.memory_bytes end },
    { "tenement_instance_cpu_seconds_total", "counter", "CPU time used by the instance.",
      function(r) return r.usage and r.usage.cpu_seconds and r.usage.cpu_seconds + 0.0 end },
    { "tenement_instance_storage_bytes", "gauge", "Bytes used in the instance's quota file system.",
      function(r) return r.storage_used end },
    { "tenement_instance_storage_quota_bytes", "gauge", "The instance's storage quota.",
      function(r) return r.storage_quota end },
  }
  families(usage)

  out:family("tenement_instance_request_duration_seconds", "histogram", "Time to answer proxied requests.")
  for _, r in ipairs(rec) do
    out:histogram("tenement_instance_request_duration_seconds", r.labels, r.traffic.latency)
  end
  out:family("tenement_instance_wake_duration_seconds", "histogram",
    "Time from a request for a sleeping instance until it was ready.")
  for _, r in ipairs(rec) do
    out:histogram("tenement_instance_wake_duration_seconds", r.labels, r.wake)
  end
  return out:text()
end

return metrics
