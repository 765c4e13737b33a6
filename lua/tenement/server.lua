-- `ten serve`: the store, the supervisor, the log writer and the control
-- socket, on one loop, until SIGTERM or SIGINT.
local core = require "tenement.core"
local supervisor = require "tenement.supervisor"
local store_mod = require "tenement.store"
local api = require "tenement.api"
local log = require "tenement.log"

local server = {}

local LOG_BATCH = 5000
local LOG_RETENTION_EVERY_MS = 60 * 1000

local Server = {}
Server.__index = Server

-- server.paths(cfg) -> the files the server owns in data_dir
function server.paths(cfg)
  local dir = cfg.settings.data_dir
  return { dir = dir, db = dir .. "/tenement.db", socket = dir .. "/ten.sock" }
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

function Server:start()
  local cfg, paths = self.cfg, self.paths
  local ok, err = core.fs.mkdir(paths.dir, 0711)
  if not ok then return nil, "data_dir: " .. err end

  if socket_alive(paths.socket) then
    return nil, string.format("another ten serve is already running with data_dir %s "
      .. "(its control socket %s answers): stop it first", paths.dir, paths.socket)
  end
  core.fs.unlink(paths.socket)

  local st, serr = store_mod.open(paths.db)
  if not st then return nil, serr end
  self.store = st
  core.fs.chmod(paths.db, 0600)

  self.sink = core.logbuf.sink { max_pending = cfg.settings.log_max_pending or 100000 }
  self.sup = supervisor.new(cfg, { store = st, sink = self.sink, environ = self.opts.environ })
  self.log_writer = core.spawn(self.write_logs, self)

  local listener, lerr = core.net.listen { path = paths.socket }
  if not listener then return nil, "control socket: " .. lerr end
  core.fs.chmod(paths.socket, 0600)
  self.control_listener = listener
  self.handler = api.new { sup = self.sup, store = st, cfg = cfg, started = self.started,
    flush_logs = function() self:flush_logs() end }
  self.control = core.http.serve(listener, self.handler)
  log.info("ten %s serving; data_dir %s, control socket %s", core.version, paths.dir, paths.socket)

  self:restore()
  return true
end

-- Instances from [instances] and those the store remembers, all at once;
-- one failing does not hold up the others.
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
  for _, r in ipairs(rows) do
    if r.desired then
      if self.cfg.services[r.service] then
        want(r.service, r.id, "store")
      else
        log.warn("%s:%s was running before, but service %q is no longer configured", r.service, r.id, r.service)
      end
    end
  end
  for _, w in ipairs(order) do
    core.spawn(function()
      local inst, why = self.sup:spawn(w.service, w.id)
      if not inst then log.error("%s (from %s)", why, w.from) end
    end)
  end
end

-- Moves captured lines from the sink into the store, in batches: one
-- transaction per batch, so thousands of lines cost one disk sync.
function Server:write_logs()
  local next_prune = core.now() + LOG_RETENTION_EVERY_MS
  while not self.stopping do
    local batch = self.sink:take(LOG_BATCH, 1000)
    if batch then
      local ok, err = self.store:append_logs(batch)
      if not ok then log.error("writing %d log lines failed: %s", #batch, err) end
      -- let the lines gather a little: fewer, bigger transactions
      core.sleep(50)
    end
    if core.now() >= next_prune then
      next_prune = core.now() + LOG_RETENTION_EVERY_MS
      local s = self.cfg.settings
      self.store:prune_logs(s.log_retention_days * 86400, s.log_max_lines)
    end
  end
end

-- Writes what is pending now (before a query, so a reader sees the latest).
function Server:flush_logs()
  while true do
    local stats = self.sink:stats()
    if stats.pending == 0 then return end
    local batch = self.sink:take(LOG_BATCH, 0)
    if not batch then return end
    self.store:append_logs(batch)
  end
end

-- Waits for SIGTERM or SIGINT, then stops everything. -> exit code
function Server:serve_until_signal()
  local term = core.signal("SIGTERM")
  local int = core.signal("SIGINT")
  local done = require("tenement.sync").event()
  local function watch(sig)
    local n = sig:wait()
    if n then done:set(n) end
  end
  core.spawn(watch, term)
  core.spawn(watch, int)
  local signum = done:wait()
  log.info("signal %d: stopping every instance", signum)
  self:shutdown()
  term:close()
  int:close()
  return 0
end

function Server:shutdown()
  if self.control then self.control:close() end
  if self.control_listener then self.control_listener:close() end
  core.fs.unlink(self.paths.socket)
  self.sup:shutdown()
  self:flush_logs()
  self.stopping = true
  self.store:close()
  log.info("stopped")
end

return server
