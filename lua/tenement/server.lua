-- `ten serve`: the store, the supervisor, the log writer and the control
-- socket, on one loop, until SIGTERM or SIGINT.
local core = require "tenement.core"
local supervisor = require "tenement.supervisor"
local sync = require "tenement.sync"
local keeper = require "tenement.keeper"
local store_mod = require "tenement.store"
local api = require "tenement.api"
local frontdoor = require "tenement.frontdoor"
local auth = require "tenement.auth"
local metrics = require "tenement.metrics"
local json = require "tenement.json"
local log = require "tenement.log"

local server = {}

local LOG_BATCH = 5000
-- a batch the store refuses (locked by another writer past the busy
-- timeout, a full disk) is tried this many times, a second apart, before
-- its lines are counted as dropped; meanwhile new lines wait in the sink,
-- which stays bounded
local LOG_WRITE_TRIES = 5
local DOOR_ERRORS_PER_SECOND = 10
local LOG_RETENTION_EVERY_MS = 60 * 1000
-- lines dropped (output faster than the store indexes it) are told in the
-- log at most this often, as one line with their count
local LOG_DROPS_TOLD_EVERY_MS = 10 * 1000
-- at a stop: the writer waits for lines a second at most, and a batch or a
-- chunk of pruning takes tens of milliseconds
local LOG_WRITER_END_MS = 3000
-- the server's own start of its instances: starts in flight at once, and
-- how long each may take to run before the next one starts in its place
local RESTORE_AT_ONCE = 64
local RESTORE_WAIT_MS = 250

-- What a router hook is, for telling a change of it: its path and its text
-- (the file changes more often than the line that names it).
local function hook_source(hooks)
  local path = hooks and hooks.router
  if not path then return nil end
  local f = io.open(path, "rb")
  local text = f and f:read("a") or ""
  if f then f:close() end
  return path .. "\0" .. text
end

local Server = {}
Server.__index = Server

-- server.paths(cfg) -> the files the server owns in data_dir
function server.paths(cfg)
  local dir = cfg.settings.data_dir
  return { dir = dir, db = dir .. "/tenement.db", socket = dir .. "/ten.sock", pid = dir .. "/ten.pid" }
end

-- server.private_store(path) -> true | nil, err: the store holds token
-- hashes and every instance's logs, for its owner only. SQLite makes the
-- -wal and -shm files with the database file's mode, so that mode must be
-- 0600 before the first open: a chmod afterwards left them 0644, readable
-- through the 0711 data_dir by anyone who knows their names.
function server.private_store(path)
  local private = tonumber("600", 8)
  if not core.fs.stat(path) then
    local ok, err = core.fs.write(path, "", private) -- SQLite takes an empty file for a new database
    if not ok then return nil, err end
  end
  for _, p in ipairs { path, path .. "-wal", path .. "-shm" } do
    if core.fs.stat(p) then core.fs.chmod(p, private) end
  end
  return true
end

-- server.new(cfg, opts) -> srv | nil, err
function server.new(cfg, opts)
  opts = opts or {}
  local self = setmetatable({ cfg = cfg, opts = opts, paths = server.paths(cfg),
    started = core.now() }, Server)
  return self
end

-- Is another server already answering on the control socket?
local function socket_alive(path)
  local conn = core.net.connect { path = path, timeout = 1000 }
  if conn then conn:close() return true end
  return false
end

-- data_dir holds the store, the control socket and every instance's files,
-- and the server (root, often) creates, chowns and deletes under it: a user
-- who may write there could swap {data_dir}/{service} for a link to any
-- directory, which the server would then fill and delete as its own.
-- -> nil | why data_dir is not the server's alone
local function data_dir_exposed(dir)
  local st = core.fs.stat(dir)
  local euid = core.proc.geteuid()
  if not st then return nil end
  if st.uid ~= euid then
    return string.format("data_dir %s belongs to uid %d, and ten serve runs as uid %d: that user could replace "
      .. "what the server writes and deletes there. `chown %d %s`, or give ten a data_dir of its own",
      dir, st.uid, euid, euid, dir)
  end
  if st.mode & tonumber("022", 8) ~= 0 then
    -- a shared directory such as /tmp (sticky): taking its write bit away
    -- would break every other user of it
    if st.mode & tonumber("1000", 8) ~= 0 then
      return string.format("data_dir %s is a directory every user may write in (mode %04o): give ten a directory "
        .. "of its own in it, e.g. --data-dir %s/tenement", dir, st.mode, dir:gsub("/+$", ""))
    end
    return string.format("data_dir %s is writable by other users (mode %04o): they could replace what the server "
      .. "writes and deletes there. `chmod go-w %s`", dir, st.mode, dir)
  end
  -- a parent others may write in without the sticky bit (/tmp has it) lets
  -- them rename data_dir away and put their own in its place
  local parent = (core.fs.realpath(dir) or dir):match("^(.*)/[^/]+$")
  local pst = parent and core.fs.stat(parent ~= "" and parent or "/")
  if pst and pst.mode & tonumber("022", 8) ~= 0 and pst.mode & tonumber("1000", 8) == 0 then
    return string.format("data_dir %s is in %s, which other users may write in (mode %04o, not sticky): they could "
      .. "rename data_dir away and put their own in its place. `chmod go-w %s` (or `chmod +t`), or move data_dir",
      dir, parent, pst.mode, parent)
  end
end

function Server:start()
  local cfg, paths = self.cfg, self.paths
  local ok, err = core.fs.mkdir(paths.dir, tonumber("711", 8))
  if not ok then return nil, "data_dir: " .. err end
  local exposed = data_dir_exposed(paths.dir)
  if exposed then return nil, exposed end

  if socket_alive(paths.socket) then
    return nil, string.format("another ten serve is already running with data_dir %s "
      .. "(its control socket %s answers): stop it first", paths.dir, paths.socket)
  end
  -- held until this server and its keeper are gone
  local lock_fd, kerr = keeper.lock(paths.dir, paths.pid)
  if not lock_fd then return nil, kerr end
  self.lock_fd = lock_fd
  -- only now the data_dir's: a server that did not answer (stopped, busy)
  -- still held it, and its socket was not ours to remove
  core.fs.unlink(paths.socket)
  -- for the next server to tell a running one from the cleanup after one
  core.fs.write(paths.pid, core.proc.getpid() .. "\n")

  local private, perr = server.private_store(paths.db)
  if not private then return nil, perr end
  local st, serr = store_mod.open(paths.db)
  if not st then return nil, serr end
  self.store = st

  self.sink = core.logbuf.sink { max_pending = cfg.settings.log_max_pending or 100000 }
  -- unpruned: lines (and bytes of text) written since the last prune, by
  -- the writer or a flush
  self.log_stats = { write_dropped = 0, unpruned = 0, unpruned_bytes = 0 }
  -- each instance's ring -> its drops already told in the log
  self.drops_told = setmetatable({}, { __mode = "k" })
  local layout = self:prepare_limits()
  self.sup = supervisor.new(cfg, { store = st, sink = self.sink, environ = self.opts.environ, cgroups = layout })
  self.log_writer = core.spawn(self.write_logs, self)

  -- 0600 before listen(2): a chmod after it left a moment in which another
  -- user could connect, and a connection made then stays open (and admin)
  local listener, lerr = core.net.listen { path = paths.socket, mode = tonumber("600", 8) }
  if not listener then return nil, "control socket: " .. lerr end
  self.control_listener = listener
  self.handler = api.new { sup = self.sup, store = st, cfg = cfg, started = self.started,
    flush_logs = function(filter) self:flush_logs(false, filter) end,
    reload = function() return self:reload() end,
    rollout = function(service) return self:rollout(service) end,
    stopping = function() return self.draining end }
  -- The control socket asks no token: its mode keeps other users out, and
  -- this keeps out a process in another PID namespace, an instance under
  -- namespace isolation that runs as root and found the path. Fails closed:
  -- a client whose namespace cannot be read is refused too.
  local own_ns = core.proc.pid_namespace()
  self.control = core.http.serve(listener, function(req)
    local ns = req.peer_pid and core.proc.pid_namespace(req.peer_pid)
    if not ns or ns ~= own_ns then
      log.warn("control socket: refused a client in another PID namespace (pid %s): an instance?",
        tostring(req.peer_pid))
      return api.fail("forbidden", "the control socket answers the server's own host only: use the HTTP API "
        .. "with a token")
    end
    return self.handler(req)
  end)
  local door, derr = frontdoor.new { cfg = cfg, sup = self.sup, store = st, own = self:own_pages() }
  if not door then return nil, derr end
  self.door = door
  self.hook_source = hook_source(cfg.hooks)
  local s = cfg.settings
  local max_conns = self:connection_budget(s.max_connections)
  local http_listener, herr, hcode = core.net.listen { host = s.listen, port = s.port }
  if not http_listener then
    -- the fix depends on which half is wrong: the port is taken, or the
    -- address is none of this machine's
    local fix = hcode == "EADDRNOTAVAIL" and "an address of this machine: ten serve --listen ADDR, or listen in "
      .. "[settings]" or "another port: ten serve -p PORT, or port in [settings]"
    return nil, string.format("cannot listen on %s port %d: %s (%s)", s.listen, s.port, herr, fix)
  end
  self.http_listener = http_listener
  -- one per request an upstream failed (the 502): a dead app under load
  -- would otherwise write thousands of lines a second
  local door_errors
  door_errors, self.flush_door_errors = log.limited("warn", DOOR_ERRORS_PER_SECOND, "front door errors")
  -- lazy_body: the proxy streams request bodies instead of reading them first
  self.http = core.http.serve(http_listener, door:handler(), {
    lazy_body = true,
    max_head = s.max_head_kb * 1024, max_headers = s.max_headers, max_body = s.max_body_mb * 1024 * 1024,
    header_timeout = s.header_timeout * 1000, idle_timeout = s.keepalive_timeout * 1000,
    max_connections = max_conns,
    on_error = door_errors,
  })
  door:attach(self.http)
  self.reaper = core.spawn(door.run_reaper, door)
  self.metrics_view = { sup = self.sup, door = door, http = self.http, sink = self.sink,
    log_stats = self.log_stats,
    store_path = paths.db, started = self.started }
  log.info("ten %s serving http://%s:%d/ for %s; data_dir %s, control socket %s", core.version,
    s.listen, http_listener:port(), s.domain, paths.dir, paths.socket)

  self:restore()
  return true
end

-- How many client connections the front door may hold: each proxied one
-- needs a second descriptor upstream, and the supervisor, the store and the
-- instances' pipes need some too, so past the descriptor limit a busy
-- server would answer 502 and the control socket nothing at all. The soft
-- limit is raised to the hard one first, as servers do.
function Server:connection_budget(wanted)
  local soft, hard = core.proc.rlimit("nofile")
  if soft and hard and soft ~= hard then
    local raised = core.proc.rlimit("nofile", hard == "unlimited" and 1048576 or hard)
    if raised then soft = raised end
  end
  if soft == "unlimited" or not soft then return wanted end
  local reserve = 256 + 8 * #(self.cfg.instances or {})
  local budget = math.max(16, (soft - reserve) // 2)
  if budget < wanted then
    log.warn("max_connections = %d would run out of file descriptors (limit %d): using %d",
      wanted, soft, budget)
    return budget
  end
  return wanted
end

-- cgroups and storage quotas, once at start: say what this host can limit,
-- and clean up what a previous ten that died left behind. -> cgroup layout
function Server:prepare_limits()
  local cgroup, storage = require "tenement.cgroup", require "tenement.storage"
  -- one cgroup subtree per data directory: two servers in one cgroup never
  -- take each other's instances for leftovers
  local base = "tenement-" .. core.crypto.hex(core.crypto.sha256(self.cfg.settings.data_dir)):sub(1, 8)
  local layout = cgroup.detect { base = base }
  for _, line in ipairs(cgroup.describe(layout)) do
    -- what can be limited matters to an operator; each hierarchy found, less
    local important = line:find("limits", 1, true) or line:find("tracked", 1, true) or line:find("no ", 1, true)
    if important then log.info("cgroups: %s", line) else log.debug("cgroups: %s", line) end
  end
  local removed, failures = cgroup.cleanup_stale(layout)
  if removed and #removed > 0 then log.info("cgroups: removed %d left by an earlier run", #removed) end
  for _, f in ipairs(failures or {}) do log.warn("cgroups: %s", tostring(f)) end
  if layout.track then
    local proc, kerr = keeper.start(layout, self.lock_fd)
    if proc then
      self.keeper = proc
    else
      log.warn("no keeper (what instances fork may outlive a ten that is killed outright): %s", kerr)
    end
  end
  local quotas = false
  for _, svc in pairs(self.cfg.services) do if svc.storage_quota_mb then quotas = true end end
  if quotas then
    local ok, err = storage.share(self.cfg.settings.data_dir)
    if not ok then log.warn("storage: %s", err) end
    local _, stale_failures = storage.cleanup_stale(self.cfg.settings.data_dir)
    for _, f in ipairs(stale_failures or {}) do log.warn("storage: %s", tostring(f)) end
  end
  return layout
end

-- The server's own pages on the bare domain: /health (public), /metrics
-- (public unless settings.metrics_token), /api/* (bearer token).
function Server:own_pages()
  local limiter = auth.limiter(self.cfg.settings.auth_failures_per_minute)
  local last_used = {}
  local JSON = { ["content-type"] = "application/json" }
  -- sent: a bearer token came with the request. Without one, RFC 6750
  -- asks for no error code: the client may not know it needs a token.
  local function unauthorized(req, code, message, guess, sent)
    -- repeated wrong tokens from one address wait longer and longer, so
    -- guessing is slow for that address only (a missing header is no guess)
    if guess then
      local delay = limiter:failed(auth.client_address(req.peer), core.now())
      if delay > 0 then core.sleep(delay) end
    end
    return 401, { ["content-type"] = "application/json",
      ["www-authenticate"] = 'Bearer realm="tenement"' .. (sent and ', error="invalid_token"' or "") },
      json.encode({ error = { code = code, message = message } }) .. "\n"
  end
  local function authenticate(req)
    local token, why = auth.bearer(req.headers.authorization)
    local sent = token ~= nil or why == "malformed token"
    if self.store:token_count() == 0 then
      return nil, unauthorized(req, "no_tokens", "no API token exists yet: create one on the server with "
        .. "`ten token-gen` (the ten CLI on the server works without one)", false, sent)
    end
    if not token then
      return nil, unauthorized(req, "unauthorized", "send Authorization: Bearer TOKEN (" .. why .. ")", false, sent)
    end
    local principal = auth.verify(self.store, token)
    if not principal then return nil, unauthorized(req, "unauthorized", "invalid or revoked token", true, true) end
    -- "last used" to the minute: one write a minute per token, not one per call
    local now = core.now()
    if now - (last_used[principal.name] or -math.huge) > 60000 then
      last_used[principal.name] = now
      self.store:token_used(principal.name)
    end
    return principal, token
  end
  -- A streamed answer (an event stream runs for hours) outlives the check
  -- made when it began: each write asks again, so a revoked token's stream
  -- ends at its next event instead of going on for good.
  local function revocable(req, token)
    -- a long poll asks between its turns
    req.authorized = function() return auth.verify(self.store, token) ~= nil end
    local stream = req.stream
    req.stream = function(r, ...)
      local out, err = stream(r, ...)
      if not out then return out, err end
      return setmetatable({
        write = function(_, data)
          if not auth.verify(self.store, token) then
            -- said as an event, and the stream ended cleanly: a client
            -- would otherwise take the cut for a network fault and reconnect
            out:write('event: error\ndata: {"error":{"code":"unauthorized","message":"the token was revoked"}}\n\n')
            out:finish()
            return false
          end
          return out:write(data)
        end,
      }, { __index = function(_, k)
        local v = out[k]
        if type(v) ~= "function" then return v end
        return function(_, ...) return v(out, ...) end
      end })
    end
  end
  -- / and /metrics are read-only pages: a POST or a DELETE is a mistake
  -- to report, not a read to answer 200
  local function read_only(req)
    if req.method == "GET" or req.method == "HEAD" then return nil end
    return 405, { ["content-type"] = "application/json", allow = "GET, HEAD" },
      json.encode({ error = { code = "method_not_allowed",
        message = req.method .. " is not allowed on " .. req.path } }) .. "\n"
  end
  return function(req)
    local path = req.path
    if path == "/health" then return self.handler(req) end
    if path == "/" or path == "/metrics" then
      local status, headers, body = read_only(req)
      if status then return status, headers, body end
    end
    if path == "/metrics" then
      if self.cfg.settings.metrics_auth then
        local principal, status, headers, body = authenticate(req)
        if not principal then return status, headers, body end
        if not principal.admin then
          return 403, JSON, '{"error":{"code":"forbidden","message":"metrics need an admin token"}}\n'
        end
      end
      return self:serve_metrics(req)
    end
    if path:sub(1, 5) == "/api/" then
      local principal, status, headers, body = authenticate(req)
      if not principal then return status, headers, body end
      req.principal = principal
      local token = status -- what authenticate gives second when it lets a request in
      revocable(req, token)
      local rstatus, rheaders, rbody = self.handler(req)
      -- a read may have waited (a long poll of the logs waits up to a
      -- minute): what it found goes only to a token still valid now
      if rstatus and (req.method == "GET" or req.method == "HEAD") and not auth.verify(self.store, token) then
        return unauthorized(req, "unauthorized", "invalid or revoked token", false, true)
      end
      return rstatus, rheaders, rbody
    end
    if path == "/" then
      return 200, { ["content-type"] = "text/plain; charset=utf-8" },
        "tenement " .. core.version .. ": this server routes {id}.{service}." .. self.cfg.settings.domain
        .. " to its instances.\n"
    end
    return 404, { ["content-type"] = "text/plain; charset=utf-8" }, "not found\n"
  end
end

-- Instances from [instances] and those the store remembers; one failing or
-- slow to start does not hold up the others.
function Server:restore()
  local wanted, order = {}, {}
  local function want(service, id, from)
    local key = service .. ":" .. id
    if wanted[key] == nil then order[#order + 1] = { service = service, id = id, from = from } end
    wanted[key] = true
  end
  for _, inst in ipairs(self.cfg.instances or {}) do want(inst.service, inst.id, "[instances]") end
  local rows, err = self.store:instances()
  if not rows then log.error("cannot read desired instances: %s", err) rows = {} end
  local from_config = {}
  for _, inst in ipairs(self.cfg.instances or {}) do from_config[inst.service .. ":" .. inst.id] = true end
  for _, r in ipairs(rows) do
    if r.desired then
      local svc = self.cfg.services[r.service]
      if svc and svc.idle_timeout > 0 and not from_config[r.service .. ":" .. r.id] then
        -- it may sleep anyway: let its next request wake it
        local asleep = self.sup:remember_asleep(r.service, r.id)
        if asleep then asleep.stored_desired = true end
      elseif svc then
        want(r.service, r.id, "store")
      else
        log.warn("%s:%s was running before, but service %q is no longer configured", r.service, r.id, r.service)
      end
    end
  end
  if #order == 0 then return end
  -- Their desired rows first, in one transaction. Then at most
  -- RESTORE_AT_ONCE starts at a time, each given up to RESTORE_WAIT_MS to be
  -- running before the next one takes its place (a slow one goes on
  -- starting by itself). A thousand starts at once were no sooner done, and
  -- they held a thousand stacks through the startup's peak, whose memory
  -- glibc kept in pieces: ten stayed 4 MB larger for good.
  core.spawn(function()
    local ok, werr = self.store:set_desired_all(order, true)
    if not ok then log.error("cannot remember the instances to run: %s", werr) end
    local next_one, working = 0, math.min(RESTORE_AT_ONCE, #order)
    local all_started = sync.event()
    for _ = 1, working do
      core.spawn(function()
        while true do
          next_one = next_one + 1
          local w = order[next_one]
          -- a stop of the server ends the starting too: not a failure
          if not w or self.sup.shutting_down then break end
          local inst, why = self.sup:spawn(w.service, w.id, { wait = false, persist = false,
            why = w.from == "store" and "again: it was running when the server stopped" or "from " .. w.from })
          if inst then
            w.inst = inst
            if ok then inst.stored_desired = true end
            inst:wait_state(supervisor.SETTLED, RESTORE_WAIT_MS)
          else
            log.error("%s (from %s)", why, w.from)
          end
        end
        working = working - 1
        if working == 0 then all_started:set() end
      end)
    end
    all_started:wait()
    for _, w in ipairs(order) do
      local state = w.inst and w.inst:wait_state(supervisor.SETTLED)
      if self.sup.shutting_down then return end
      if state and state ~= "running" and state ~= "unhealthy" then
        log.error("%s did not start: %s (from %s)", w.inst.key, w.inst.last_exit or state, w.from)
      end
    end
  end)
end

-- Whose lines the sink dropped since the last call (it drops from the
-- instance with the most lines waiting): " (api:b 1200, web:a 3)", the
-- three with the most, or "" when none.
function Server:log_droppers()
  local told, list = self.drops_told, {}
  for key, inst in pairs(self.sup.instances) do
    local ring = inst.ring
    local now = ring:stats().dropped
    if now > (told[ring] or 0) then list[#list + 1] = { key = key, n = now - (told[ring] or 0) } end
    told[ring] = now
  end
  if #list == 0 then return "" end
  table.sort(list, function(a, b) if a.n ~= b.n then return a.n > b.n end return a.key < b.key end)
  local parts = {}
  for i = 1, math.min(3, #list) do parts[i] = list[i].key .. " " .. list[i].n end
  return " (" .. table.concat(parts, ", ") .. (#list > 3 and (", " .. (#list - 3) .. " more") or "") .. ")"
end

-- Moves captured lines from the sink into the store, in batches: one
-- transaction per batch, so thousands of lines cost one disk sync.
function Server:write_logs()
  local next_prune = core.now() + LOG_RETENTION_EVERY_MS
  local next_told, dropped_told = core.now() + LOG_DROPS_TOLD_EVERY_MS, self:log_lines_dropped()
  local refused_told = self.log_stats.write_dropped
  while not self.stopping do
    local batch = self.sink:take(LOG_BATCH, 1000)
    if batch then
      self:store_logs(batch, LOG_WRITE_TRIES)
      -- a small batch: let lines gather a little (fewer, bigger transactions);
      -- a full one: more are waiting, go on at once
      if #batch < LOG_BATCH then core.sleep(50) end
    end
    local s = self.cfg.settings
    -- by count too, once a tenth of log_max_lines came in: at the rate the
    -- store indexes, a minute between prunes is millions of lines and a
    -- store of gigabytes whatever log_max_lines says
    local st = self.log_stats
    if core.now() >= next_prune or st.unpruned >= math.max(LOG_BATCH, s.log_max_lines // 10)
      or st.unpruned_bytes >= s.log_max_mb * 1024 * 1024 // 10 then
      next_prune, st.unpruned, st.unpruned_bytes = core.now() + LOG_RETENTION_EVERY_MS, 0, 0
      repeat
        local _, more = self.store:prune_logs { max_age = s.log_retention_days * 86400, max_lines = s.log_max_lines,
          max_bytes = s.log_max_mb * 1024 * 1024 }
      until not more or self.stopping
    end
    if core.now() >= next_told then
      local dropped, refused = self:log_lines_dropped(), self.log_stats.write_dropped
      if dropped > dropped_told then
        -- the likelier cause first: a store that refuses batches (a full
        -- disk) makes the sink overflow behind it too
        local why = refused > refused_told and ("the store refused " .. (refused - refused_told)
          .. " of them (the errors above say why)") or "written faster than the store indexes them"
        log.warn("%d lines of instance output dropped in the last %d s%s: %s (tenement_log_lines_dropped_total "
          .. "counts them)", dropped - dropped_told, (core.now() - next_told + LOG_DROPS_TOLD_EVERY_MS) // 1000,
          self:log_droppers(), why)
      end
      next_told, dropped_told, refused_told = core.now() + LOG_DROPS_TOLD_EVERY_MS, dropped, refused
    end
  end
end

function Server:log_lines_dropped()
  return metrics.lines_dropped(self.sink, self.log_stats)
end

-- Appends a batch, tried up to `tries` times; lines the store would not
-- take are counted as dropped, like those the sink drops. -> true | nil
function Server:store_logs(batch, tries)
  for try = 1, tries do
    local ok, err = self.store:append_logs(batch)
    if ok then
      local bytes = 0
      for _, row in ipairs(batch) do bytes = bytes + #row[4] end
      self.log_stats.unpruned = self.log_stats.unpruned + #batch
      self.log_stats.unpruned_bytes = self.log_stats.unpruned_bytes + bytes
      return true
    end
    if try == tries or self.stopping then
      self.log_stats.write_dropped = self.log_stats.write_dropped + #batch
      log.error("writing %d log lines to %s failed, dropped: %s", #batch, self.paths.db, err)
      return nil
    end
    log.warn("writing %d log lines to %s failed, trying again: %s", #batch, self.paths.db, err)
    self.log_retrying = true
    core.sleep(1000)
    self.log_retrying = nil
  end
end

-- The rings of the instances a log reader's filter names (instance,
-- service), or nil for every ring.
function Server:log_rings(filter)
  if not filter or not (filter.instance or filter.service) then return nil end
  local instances = self.sup.instances
  if filter.instance then
    local inst = instances[filter.instance]
    return { inst and inst.ring }
  end
  local rings = {}
  for _, inst in pairs(instances) do
    if inst.service == filter.service then rings[#rings + 1] = inst.ring end
  end
  return rings
end

-- Writes what is pending now (before a query, so a reader sees the latest):
-- the lines of the instances `filter` names ({instance =} or {service =}),
-- or of all. A reader of one instance waited for every line a flood next to
-- it had left waiting (100,000 of them, over a second at the rate the store
-- indexes); its own come first now. While the writer is trying a refused
-- batch again, the store would refuse these too: they wait in the sink for
-- it, except at the end (`final`), when nothing comes after to write or
-- count them.
function Server:flush_logs(final, filter)
  -- the lines pending now, not those that come meanwhile: under a flood of
  -- output the sink never empties, and a reader waiting for it waited for
  -- ever while the store grew without a prune
  local function drain(left, take)
    while left > 0 and (final or not self.log_retrying) do
      local batch = take(math.min(left, LOG_BATCH))
      if not batch or #batch == 0 then return end
      left = left - #batch
      if not self:store_logs(batch, 1) then return end
    end
  end
  local rings = self:log_rings(filter)
  if not rings then
    return drain(self.sink:stats().pending, function(n) return self.sink:take(n, 0) end)
  end
  for _, ring in ipairs(rings) do
    local ok, stats = pcall(ring.stats, ring) -- (closed when its instance was forgotten meanwhile)
    if ok then drain(stats.waiting, function(n) return ring:take_waiting(n) end) end
  end
end

-- Two service definitions (or other parts of a configuration) are the same
-- when every field but the line is.
local function same(a, b, ignored)
  if type(a) ~= "table" or type(b) ~= "table" then return a == b end
  for k, v in pairs(a) do
    if k ~= "line" and not (ignored and ignored[k]) and not same(v, b[k]) then return false end
  end
  for k in pairs(b) do if k ~= "line" and not (ignored and ignored[k]) and a[k] == nil then return false end end
  return true
end

-- A service's keys read afresh at each use (by the reaper, the front door,
-- the health checker, the next start or restart): a change of these alone
-- reaches the instances without replacing a process.
local LIVE_KEYS = { idle_timeout = true, on_demand = true, max_instances = true, startup_timeout = true,
  health = true, restart = true }

-- Server:reload() -> summary | nil, err: reads tenement.toml again and
-- applies the difference: new services and [instances] start, removed
-- services stop, changed services are rolled out instance by instance,
-- settings and routing take effect (listen, port and data_dir need a
-- restart of ten serve, and say so).
function Server:reload()
  local config = require "tenement.config"
  -- (config.load's advice, another file with --config, is no help here)
  if not core.fs.stat(self.cfg.source) then
    return nil, string.format("%s, the file ten serve was started with, is not there: a reload re-reads it; put it "
      .. "back (another file needs a restart of ten serve with --config)", self.cfg.source)
  end
  local new, err = config.load(self.cfg.source, self.opts.environ)
  if not new then return nil, err end
  -- a file cut short (a save under way, a full disk) reads as one with no
  -- service, and applied it stops and forgets every instance
  if next(new.services) == nil and next(self.cfg.services) ~= nil then
    local names = {}
    for name in pairs(self.cfg.services) do names[#names + 1] = name end
    table.sort(names)
    return nil, string.format("%s defines no service: this reload would stop and forget every instance of %s. "
      .. "Nothing changed. A file cut short reads like this: check it; to remove every service, restart ten serve "
      .. "with the file", self.cfg.source, table.concat(names, ", "))
  end
  local hook, herr = frontdoor.load_hook(new)
  if hook == nil then return nil, herr end
  for _, w in ipairs(new.warnings) do log.warn("reload: %s", w) end
  local warnings = new.warnings
  local old = self.cfg
  config.reapply(new, old)
  local summary = { added = {}, removed = {}, rolled_out = {}, updated = {}, waiting = {}, failed = {},
    restart_needed = {}, applied = {} }
  -- the HTTP server takes its limits once, when it starts listening
  for _, key in ipairs { "listen", "port", "data_dir", "max_head_kb", "max_headers", "max_body_mb",
    "header_timeout", "keepalive_timeout", "max_connections" } do
    if new.settings[key] ~= old.settings[key] then summary.restart_needed[#summary.restart_needed + 1] = key end
  end
  for _, key in ipairs(summary.restart_needed) do new.settings[key] = old.settings[key] end
  for name in pairs(old.services) do
    if not new.services[name] then
      summary.removed[#summary.removed + 1] = name
      -- first out of the routing: a request arriving while an instance
      -- stops would otherwise start it again, with the service gone
      self.door:withdraw(name)
      -- their data stays: a section renamed by mistake (one letter) took
      -- every instance's directory with it, and a reload that brings the
      -- name back finds it again
      local kept = {}
      for _, inst in ipairs(self.sup:of_service(name)) do
        self.sup:stop(name, inst.id, { reason = "service removed from the configuration", keep_data = true })
        self.sup:forget(name, inst.id)
        if inst.dir and core.fs.stat(inst.dir) then kept[#kept + 1] = inst.dir end
      end
      if #kept > 0 then
        local w = string.format("service %s was removed: its instances stopped, and their data stays (%s): a reload "
          .. "that brings the service back finds it; delete it by hand if it is gone for good", name,
          table.concat(kept, ", "))
        log.warn("reload: %s", w)
        warnings[#warnings + 1] = w
      end
    end
  end
  local not_rolled_out = {}
  for name, svc in pairs(new.services) do
    if not old.services[name] then
      summary.added[#summary.added + 1] = name
      old.services[name] = svc
    elseif not same(svc, old.services[name], LIVE_KEYS) then
      local n, rerr = self.sup:rollout(name, svc)
      -- with no process to replace (none running, or a failed one), the
      -- new definition waits for the next start: said as such, not as a rollout
      if n and n > 0 then summary.rolled_out[#summary.rolled_out + 1] = name
      elseif n then
        -- (in updated too, where the API had it before waiting was said apart)
        summary.updated[#summary.updated + 1] = name
        summary.waiting[#summary.waiting + 1] = name
      else
        summary.failed[#summary.failed + 1] = rerr
        not_rolled_out[name] = true
      end
    elseif not same(svc, old.services[name]) then
      old.services[name] = svc
      for _, inst in ipairs(self.sup:of_service(name)) do inst.svc = svc end
      summary.updated[#summary.updated + 1] = name
    end
  end
  for name in pairs(old.services) do if not new.services[name] then old.services[name] = nil end end
  -- [instances] says what ten serve starts; it does not stop what it no
  -- longer names (a spawned instance and a listed one are the same thing
  -- once running), so a removed id is said, with the way to stop it
  local listed = {}
  for _, i in ipairs(new.instances or {}) do listed[supervisor.key(i.service, i.id)] = true end
  for _, i in ipairs(old.instances or {}) do
    local key = supervisor.key(i.service, i.id)
    local inst = not listed[key] and new.services[i.service] and self.sup:get(i.service, i.id)
    if inst and inst.state ~= "stopped" then
      local w = string.format("[instances] no longer names %s: it stays %s, and comes back after a restart of ten "
        .. "serve, until `ten stop %s`", key, inst.state, key)
      log.warn("reload: %s", w)
      warnings[#warnings + 1] = w
    end
  end
  -- the rest of the file: settings, routing, hooks, [instances]; said when
  -- changed, since nothing else in the summary would show it
  for _, part in ipairs { { "settings", old.settings, new.settings }, { "routing", old.routing, new.routing },
    { "[instances]", old.instances, new.instances } } do
    if not same(part[2], part[3]) then summary.applied[#summary.applied + 1] = part[1] end
  end
  local new_hook = hook_source(new.hooks)
  local hook_changed = new_hook ~= self.hook_source
  -- a new table rather than the old one changed: an instance's upstream
  -- takes proxy_timeout and upstream_keepalive again only when its
  -- settings table is another one (inst:upstream())
  local settings = {}
  for k, v in pairs(old.settings) do settings[k] = v end
  for k, v in pairs(new.settings) do settings[k] = v end
  old.settings = settings
  old.routing, old.hooks, old.instances, old.service_names = new.routing, new.hooks, new.instances, new.service_names
  self.door:configure(old, hook)
  if hook_changed then
    summary.applied[#summary.applied + 1] = "hooks"
    self.hook_source = new_hook
  end
  for _, inst in ipairs(old.instances) do
    if not self.sup:get(inst.service, inst.id) then
      if not_rolled_out[inst.service] then
        -- it would run the definition the file no longer holds
        local w = string.format("%s, new in [instances], was not started: the new definition of %s failed to roll "
          .. "out (above); a reload that succeeds starts it", supervisor.key(inst.service, inst.id), inst.service)
        log.warn("reload: %s", w)
        warnings[#warnings + 1] = w
      else
        core.spawn(function() self.sup:spawn(inst.service, inst.id, { why = "from [instances], by a reload" }) end)
      end
    end
  end
  for _, list in pairs(summary) do table.sort(list) end
  -- a reload that failed in part says so at the level of a failure
  local failed = #summary.failed > 0
  local emit = failed and log.error or log.info
  emit("reloaded %s%s: added [%s], removed [%s], rolled out [%s], updated without a restart [%s], applied [%s]%s",
    old.source, failed and (" with failures (" .. table.concat(summary.failed, "; ") .. ")") or "",
    table.concat(summary.added, " "), table.concat(summary.removed, " "),
    table.concat(summary.rolled_out, " "), table.concat(summary.updated, " "), table.concat(summary.applied, " "),
    #summary.restart_needed > 0 and ("; " .. table.concat(summary.restart_needed, ", ") ..
      " changed and need a restart of ten serve") or "")
  -- in the file's order, for the operator who ran the reload too
  summary.warnings = warnings
  return summary
end

-- Server:rollout(service) -> count | nil, err, code: the service's
-- definition read again from the file, then every running instance replaced.
function Server:rollout(service)
  local config = require "tenement.config"
  local new, err = config.load(self.cfg.source, self.opts.environ)
  if not new then return nil, err, "bad_request" end
  local svc = new.services[service]
  if not svc then return nil, "no service " .. service .. " in " .. self.cfg.source, "not_found" end
  return self.sup:rollout(service, svc)
end

-- /metrics, streamed as it is rendered: a thousand instances make 4 MB of
-- text, which would otherwise sit in memory whole, twice (the text and the
-- response), at every scrape. A scraper that reads slowly holds the
-- rendering back, not the memory.
local METRICS_QUEUE = 256 * 1024
local METRICS_TYPE = { ["content-type"] = "text/plain; version=0.0.4; charset=utf-8" }
local GONE = {}
function Server:serve_metrics(req)
  local out, err = req:stream(200, METRICS_TYPE)
  if not out then return nil, err end
  if req.method == "HEAD" then return end -- the head was all of it
  local ok, why = pcall(metrics.render, self.metrics_view, function(chunk)
    if not out:write(chunk) then error(GONE) end -- nobody left to render for
    while out:queued() > METRICS_QUEUE do core.sleep(10) end
  end)
  if ok then
    out:finish()
  elseif why ~= GONE then
    -- unfinished, the stream ends with its connection: the scraper sees the
    -- text cut, where finishing it would pass it as whole
    log.error("/metrics: %s", tostring(why))
  end
end

-- Waits for SIGTERM or SIGINT, then stops everything; a second one while
-- that takes its time stops everything now (Server:hurry). -> exit code
function Server:serve_until_signal()
  local term = core.signal("SIGTERM")
  local int = core.signal("SIGINT")
  local signals = require("tenement.sync").mailbox()
  local function watch(sig)
    while true do
      local n = sig:wait()
      if not n then return end -- closed
      signals:put(n)
    end
  end
  core.spawn(watch, term)
  core.spawn(watch, int)
  -- SIGHUP: read tenement.toml again and apply the difference
  local hup = core.signal("SIGHUP")
  core.spawn(function()
    while hup:wait() do
      local ok, err = self:reload()
      if not ok then log.error("reload failed, nothing changed: %s", err) end
    end
  end)
  local signum = signals:take()
  -- what the wait is for, so an operator at the terminal knows it is bounded
  log.info("signal %d: stopping every instance: requests in flight get up to %d s to finish (drain_timeout), then "
    .. "each instance SIGTERM, and SIGKILL after %d s (stop_timeout); a second SIGINT or SIGTERM stops them now",
    signum, self.cfg.settings.drain_timeout, self.cfg.settings.stop_timeout)
  core.spawn(function()
    local again = signals:take()
    if again then self:hurry(again) end
  end)
  self:shutdown()
  signals:put(false) -- the task waiting for a second signal ends
  term:close()
  int:close()
  hup:close()
  return 0
end

-- The operator asked twice: the connections still open are closed, their
-- requests cut, and every instance still stopping gets SIGKILL instead of
-- the rest of its stop_timeout.
function Server:hurry(signum)
  log.warn("signal %d again: stopping now: open connections closed, SIGKILL to every instance still running", signum)
  if self.http then self.http:cut() end
  self.sup:hurry()
end

function Server:shutdown()
  self.draining = true -- long polls and event streams answer now (api.lua)
  if self.door then self.door.stopped = true end
  if self.http then
    -- stop accepting, let requests in flight finish (bounded), then stop instances
    self.http:drain(self.cfg.settings.drain_timeout * 1000)
  end
  if self.http_listener then self.http_listener:close() end
  if self.control then self.control:close() end
  if self.control_listener then self.control_listener:close() end
  core.fs.unlink(self.paths.socket)
  if self.lock_fd then core.fs.unlink(self.paths.pid) end
  self.sup:shutdown()
  require("tenement.storage").unshare(self.cfg.settings.data_dir) -- storage.share's bind mount, if it made one
  -- the writer ends its turn first: a store closed under it raised, and the
  -- task died with its batch
  self.stopping = true
  if self.log_writer then self.log_writer:join(LOG_WRITER_END_MS) end
  self:flush_logs(true)
  self.store:close()
  -- the count of this second's failures would go with the process
  if self.flush_door_errors then self.flush_door_errors() end
  if self.door then self.door.flush_hook_errors() end
  log.info("stopped")
end

return server
