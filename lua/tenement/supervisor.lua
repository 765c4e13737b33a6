-- The supervisor: owns the instances and their life.
--
-- Each instance has one runner task that goes through its life in a loop
-- (start, run, exit, back off, start again) and reads everything that happens
-- to it from its mailbox: the process exiting, a stop request, failed health
-- checks. Its one helper, the watcher of the process (exit, readiness,
-- health), only puts messages; the runner alone changes state, through the
-- one transition table below, and every transition is published as an event.
local core = require "tenement.core"
local sync = require "tenement.sync"
local config = require "tenement.config"
local command = require "tenement.command"
local runtime = require "tenement.runtime"
local restart = require "tenement.restart"
local log = require "tenement.log"
local metrics = require "tenement.metrics"
local cgroup = require "tenement.cgroup"
local storage = require "tenement.storage"
local users = require "tenement.users"

local supervisor = {}

-- state x event -> next state. Anything else is a bug, and raises.
supervisor.transitions = {
  stopped   = { spawn = "starting" },
  sleeping  = { spawn = "starting", stop = "stopping" },
  starting  = { ready = "running", restart = "backoff", fail = "failed", down = "stopped", stop = "stopping",
                sleep = "stopping" },
  running   = { health_bad = "unhealthy", restart = "backoff", fail = "failed", down = "stopped",
                stop = "stopping", sleep = "stopping" },
  unhealthy = { health_ok = "running", restart = "backoff", fail = "failed", down = "stopped",
                stop = "stopping", sleep = "stopping" },
  backoff   = { retry = "starting", stop = "stopping", sleep = "stopping" },
  stopping  = { stopped = "stopped", slept = "sleeping" },
  failed    = { spawn = "starting", stop = "stopping" },
}

-- Variables an instance inherits from the server's environment. Nothing else
-- leaks: no token or secret of the server reaches a tenant.
supervisor.env_allow = { "PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ" }

local DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
local PORT_MIN, PORT_MAX = 30000, 40000
local FAILURES_UNHEALTHY = 3
local OUTPUT_LINES_IN_ERRORS = 10

local Supervisor = {}
Supervisor.__index = Supervisor

local Instance = {}
Instance.__index = Instance

-- supervisor.new(cfg, opts) -> sup
--   opts.environ: the server's environment (table), for the allow-list and ${VAR}
--   opts.store:   the durable store (optional: without it nothing is remembered)
--   opts.sink:    a core.logbuf sink that feeds the store (optional)
--   opts.restart_policy: a replacement for restart.decide (hook)
function supervisor.new(cfg, opts)
  opts = opts or {}
  local self = setmetatable({
    cfg = cfg,
    environ = opts.environ or core.proc.environ(),
    store = opts.store,
    sink = opts.sink,
    decide = opts.restart_policy or restart.decide,
    instances = {},      -- key "service:id" -> Instance
    ports = {},          -- port -> key
    listeners = {},
    shutting_down = false,
    weights = {},        -- key -> weight remembered by the store
    socket_watches = {}, -- dir -> { watch, users }: starts waiting for sockets there
    sockets_left = {},   -- dir -> { socket name -> its {socket}.N files found there }
  }, Supervisor)
  if self.store then
    for _, row in ipairs(self.store:instances() or {}) do
      self.weights[row.service .. ":" .. row.id] = row.weight
    end
  end
  -- cgroup layout: given by the server (which detects it at start and logs
  -- it); otherwise detected the first time a limit asks for it
  self.cgroups = opts.cgroups
  return self
end

function supervisor.key(service, id) return service .. ":" .. id end

-- supervisor.parse_key("api:prod") -> "api", "prod" | nil, err
function supervisor.parse_key(s)
  local service, id = tostring(s):match("^([^:]+):([^:]+)$")
  if not service then
    return nil, string.format("%q is not SERVICE:ID (for example api:prod)", tostring(s))
  end
  local ok, err = config.valid_name(service)
  if not ok then return nil, "service name " .. err end
  ok, err = config.valid_name(id)
  if not ok then return nil, "instance id " .. err end
  return service, id
end

---------------------------------------------------------------------------
-- events

-- sup:on(fn(event)) subscribes; fn must not wait. Returns an unsubscribe function.
function Supervisor:on(fn)
  self.listeners[#self.listeners + 1] = fn
  return function()
    for i, f in ipairs(self.listeners) do
      if f == fn then table.remove(self.listeners, i) return end
    end
  end
end

function Supervisor:publish(ev)
  for _, fn in ipairs(self.listeners) do
    local ok, err = pcall(fn, ev)
    if not ok then log.error("event listener failed: %s", tostring(err)) end
  end
end

function Instance:transition(event, reason)
  local from = self.state
  local to = supervisor.transitions[from] and supervisor.transitions[from][event]
  if not to then
    error(string.format("%s: no transition from %s on %s", self.key, from, event))
  end
  self.state = to
  if to == "failed" then self.health = "failed"
  elseif to == "starting" or to == "stopped" or to == "sleeping" or to == "backoff" then
    -- no process: whatever the last check said was about one that is gone
    self.health = "unknown"
  end
  if reason then self.reason = reason end
  -- a thousand instances starting at once make thousands of transitions:
  -- nothing is built for nobody (no subscriber, no task waiting)
  if #self.sup.listeners > 0 then
    self.sup:publish({ type = "state", instance = self.key, service = self.service, id = self.id,
      from = from, to = to, event = event, reason = reason, time = core.time() })
  end
  local changed = self.state_changed
  if changed then
    self.state_changed = nil
    changed:set(to)
  end
end

-- The states a start ends in, one way or another: a first start, or a
-- restart after a crash that may back off and start again first.
supervisor.SETTLED = { running = true, unhealthy = true, failed = true, stopped = true, sleeping = true }

-- Waits until the instance's state is one of `states` (a set), or timeout.
function Instance:wait_state(states, timeout_ms)
  local deadline = timeout_ms and core.now() + timeout_ms
  while not states[self.state] do
    local left = deadline and deadline - core.now()
    if left and left <= 0 then return nil, "timeout" end
    -- made by the first waiter, set and dropped by the next transition
    local changed = self.state_changed or sync.event()
    self.state_changed = changed
    local ok, err = changed:wait(left)
    if not ok and err == "timeout" then return nil, "timeout" end
  end
  return self.state
end

---------------------------------------------------------------------------
-- resources of one start

function Supervisor:alloc_port(key)
  local span = PORT_MAX - PORT_MIN + 1
  local start = math.random(0, span - 1)
  for i = 0, span - 1 do
    local port = PORT_MIN + (start + i) % span
    if not self.ports[port] then
      -- also free on the machine: something else may hold it
      local l = core.net.listen { host = "127.0.0.1", port = port }
      if l then
        l:close()
        self.ports[port] = key
        return port
      end
    end
  end
  return nil, string.format("no free TCP port in %d-%d", PORT_MIN, PORT_MAX)
end

-- The instance's cgroup(s), with the service's limits. -> cg | nil (none
-- needed or possible), nil, err (a limit that cannot be enforced: refused)
function Supervisor:cgroup_for(inst, svc)
  local limits = { memory_mb = svc.memory_limit_mb, cpu_shares = svc.cpu_shares, pids = svc.pids_limit }
  local spare = inst.spare_cg
  if spare then
    -- the last start's, emptied when it ended and kept for this one: only
    -- ten moves processes into it. Other limits since then need new ones.
    local asked = spare.asked
    if asked.memory_mb == limits.memory_mb and asked.cpu_shares == limits.cpu_shares and asked.pids == limits.pids then
      inst.spare_cg = nil
      return spare
    end
    inst:drop_spare_cgroup()
  end
  if not self.cgroups then
    if not next(limits) then return nil end
    self.cgroups = cgroup.detect { base = "tenement-" .. core.proc.getpid() }
    -- made here, not by a server with a keeper: the shutdown removes them
    self.own_cgroup_bases = true
  end
  -- one cgroup per start (the generation in its name): a rollout runs the
  -- new process beside the old one, each in its own
  local cg, err = cgroup.create(self.cgroups, inst.service .. "." .. inst.id .. "." .. inst.gen, limits)
  if not cg then
    if next(limits) then return nil, err end
    return nil -- no limits asked: an instance without a cgroup still runs
  end
  cg.asked = limits
  for _, note in ipairs(cg.notes or {}) do log.info("%s: %s", inst.key, note) end
  return cg
end

function Supervisor:free_port(port)
  if port then self.ports[port] = nil end
end

-- The environment an instance gets: the allow-list, then what the config
-- sets, then what tenement sets (which cannot be overridden).
function Supervisor:instance_env(svc, vars)
  local env = {}
  for _, name in ipairs(supervisor.env_allow) do
    env[name] = self.environ[name]
  end
  env.PATH = env.PATH or DEFAULT_PATH
  for k, v in pairs(svc.env or {}) do
    local s, err = config.expand(v, vars)
    if not s then return nil, string.format("env %s: %s", k, err) end
    env[k] = s
  end
  env.PORT = tostring(vars.port)
  env.SOCKET_PATH = vars.socket
  env.INSTANCE_DIR = vars.instance_dir
  env.INSTANCE_ID = vars.id
  env.SERVICE_NAME = vars.name
  local list = {}
  for k, v in pairs(env) do list[#list + 1] = k .. "=" .. v end
  table.sort(list)
  return list
end

local function dirname(path) return path:match("^(.*)/[^/]*$") or "." end

-- Why the program of argv[1] cannot be run, or nil: none by that path, or
-- on the PATH of the app's env (list of "K=V"). A start of it fails each
-- time, and every isolation level finds it where the host does (the
-- sandbox's root is the host's, a private file system binds the command's
-- directory): refused at once rather than retried with backoff, a deploy
-- of a version not yet installed too.
local function missing_program(prog, env, cwd)
  local function runnable(path)
    local st = core.fs.stat(path)
    return st and st.type ~= "directory" and core.fs.access(path, "x")
  end
  if prog:find("/", 1, true) then
    local path = prog:sub(1, 1) == "/" and prog or ((cwd or core.fs.cwd() or ".") .. "/" .. prog)
    if runnable(path) then return nil end
    return string.format("command: %s is not there, or not executable%s", path,
      prog:sub(1, 1) == "/" and "" or " (a relative command is taken from workdir, else from where ten serve runs)")
  end
  local search
  for _, kv in ipairs(env) do search = kv:match("^PATH=(.*)$") or search end
  for dir in (search or ""):gmatch("[^:]+") do
    if runnable(dir .. "/" .. prog) then return nil end
  end
  return string.format("command: no program %q on the app's PATH (%s): name it by its path, or install it", prog,
    search or "none set")
end

-- Everything one start takes, released together whatever happens.
function Instance:release_start()
  local sup = self.sup
  sup:free_port(self.port)
  self.port = nil
  if self.socket then core.fs.unlink(self.socket) end
  -- a driver that keeps state of its own (a sandbox's bundle) cleans it up
  -- once the process is gone or never started
  local cg = self.cg
  self.cg = nil
  if cg then
    -- whatever of the instance is left, wherever it went (setsid, double fork)
    local ok, err = cg:kill_all()
    if ok and not cg.killed_whole then
      -- kept, empty, for the instance's next start (a wake, a restart):
      -- making them anew took a directory per hierarchy and a first move
      -- into a new group, 0.2 to 0.3 ms of every wake on a host with
      -- cgroup v1 controllers, and each memory cgroup removed lingers in
      -- the kernel while the pages it was charged stay cached
      self:drop_spare_cgroup()
      cg.oom_seen = cg:oom_kills()
      self.spare_cg = cg
    else
      if ok then ok, err = cg:remove() end
      if not ok then log.warn("%s: cgroup: %s", self.key, tostring(err)) end
    end
  end
  local driver, ctx = self.driver, self.launch_ctx
  self.driver, self.launch_ctx = nil, nil
  if driver and driver.cleanup then
    local ok, err = driver.cleanup(ctx)
    if not ok then log.warn("%s: cleanup after the process failed: %s", self.key, tostring(err)) end
  end
  self.proc = nil
  self.pid = nil
end

-- The cgroups kept from the last start go (a stop, a change of limits, the
-- server's shutdown). In a task.
function Instance:drop_spare_cgroup()
  local cg = self.spare_cg
  if not cg then return end
  self.spare_cg = nil
  local ok, err = cg:kill_all()
  if ok then ok, err = cg:remove() end
  if not ok then log.warn("%s: cgroup: %s", self.key, tostring(err)) end
end

-- Starts the process. -> proc | nil, err, lasting (everything released on
-- failure). lasting: no retry can succeed before an operator acts (the
-- configuration names a user this host lacks, an isolation level it cannot
-- run, a template that does not expand); the restart policy then gives up
-- at once instead of spending its backoff on it.
function Instance:launch()
  local sup, svc = self.sup, self.svc
  local function refuse(why)
    self:release_start()
    return nil, why, true
  end
  local driver, derr = runtime.get(svc.isolation)
  if not driver then return nil, derr, true end

  local port, perr = sup:alloc_port(self.key)
  if not port then return nil, perr end
  self.port = port

  -- self.svc, not the file's current one: a rollout launches the new
  -- definition beside the old process
  local vars, verr = config.instance_vars({ settings = sup.cfg.settings, host_env = sup.cfg.host_env,
    services = { [self.service] = svc } }, self.service, self.id, port)
  if not vars then return refuse(verr) end
  if self.socket_suffix then
    -- the replacement of a running process gets a socket of its own
    vars.socket = vars.socket .. self.socket_suffix
    if #vars.socket > 107 then return refuse("socket path too long for a rollout: " .. vars.socket) end
  end
  self.socket = vars.socket
  self.dir = vars.instance_dir

  -- {data_dir}/{service}, as data_dir itself (ten serve checks that),
  -- before anything is made through it: a link there, or a directory
  -- another user may change, would have the server make, chown and delete
  -- instance files wherever that user likes
  local service_dir = dirname(vars.instance_dir)
  local sst = core.fs.stat(service_dir, false)
  local euid = core.proc.geteuid()
  if sst and (sst.type ~= "directory" or sst.uid ~= euid or sst.mode & tonumber("022", 8) ~= 0) then
    return refuse(string.format("%s is %s: another user could swap what the server makes and deletes there; "
      .. "remove it (the server makes it again) or `chown %d %s && chmod go-w %s`", service_dir,
      sst.type ~= "directory" and ("a " .. sst.type .. ", not a directory") or sst.uid ~= euid
        and ("owned by uid " .. sst.uid .. ", not by uid " .. euid .. " that ten serve runs as")
        or string.format("writable by other users (mode %04o)", sst.mode), euid, service_dir, service_dir))
  end
  local ok, err = core.fs.mkdir(vars.instance_dir, tonumber("700", 8))
  if not ok then self:release_start() return nil, err end
  -- a socket directory tenement makes is sticky and open like /tmp: apps
  -- that run as their own user create their sockets there, and none can
  -- remove another's (one that exists is left as its owner made it)
  local socket_dir = dirname(vars.socket)
  if not core.fs.stat(socket_dir) then
    ok, err = core.fs.mkdir(socket_dir, tonumber("755", 8))
    if ok then ok, err = core.fs.chmod(socket_dir, tonumber("1777", 8)) end
    if not ok then self:release_start() return nil, err end
  end
  -- A socket left by an earlier process would answer for a dead instance,
  -- and is removed; one something still listens on is another server's
  -- (the default template names no data directory), and taking it would
  -- send that server's traffic here. Neither file is ours to remove on the
  -- way out.
  local st = core.fs.stat(vars.socket, false)
  if st then
    if st.type ~= "socket" then
      self.socket = nil
      return refuse(string.format("%s exists and is not a socket: refusing to remove it", vars.socket))
    end
    local live = core.net.connect { path = vars.socket, timeout = 1000 }
    if live then
      live:close()
      self.socket = nil
      self:release_start()
      return nil, string.format("%s is in use: another process listens on it (another ten serve with the same "
        .. "socket template?); give each server sockets of its own, e.g. socket = \"{data_dir}/sock/{name}-{id}.sock\"",
        vars.socket)
    end
    core.fs.unlink(vars.socket)
  end
  -- a rollout's sockets ({socket}.N) outlive a server killed meanwhile: the
  -- first start of this server's life clears those nothing listens on
  if not self.socket_suffix then
    local left = sup:left_sockets(socket_dir)
    local name = vars.socket:match("[^/]*$")
    for _, entry in ipairs(left[name] or {}) do
      local path = socket_dir .. "/" .. entry
      local est = core.fs.stat(path, false)
      local live = est and est.type == "socket" and core.net.connect { path = path, timeout = 1000 }
      if live then live:close() elseif est and est.type == "socket" then core.fs.unlink(path) end
    end
    left[name] = nil
  end

  local cmd, cerr = config.expand(svc.command, vars)
  if not cmd then return refuse("command: " .. cerr) end
  local args = {}
  for i, a in ipairs(svc.args or {}) do
    local s, aerr = config.expand(a, vars)
    if not s then return refuse("args: " .. aerr) end
    args[i] = s
  end
  local argv, aerr = command.argv(cmd, args)
  if not argv then return refuse(aerr) end
  local env, eerr = sup:instance_env(svc, vars)
  if not env then self:release_start() return nil, eerr end
  local cwd
  if svc.workdir then
    cwd, err = config.expand(svc.workdir, vars)
    if not cwd then return refuse("workdir: " .. err) end
  end
  local missing = missing_program(argv[1], env, cwd)
  if missing then return refuse(missing) end
  local user
  if svc.user then
    user, err = users.lookup(svc.user)
    if not user then return refuse("user: " .. err) end
  end
  if svc.storage_quota_mb and not self.storage then
    local mount, serr, lasting = storage.attach(sup.cfg.settings.data_dir, self.service, self.id, svc.storage_quota_mb)
    if not mount then self:release_start() return nil, "storage: " .. serr, lasting end
    for _, note in ipairs(mount.notes or {}) do log.info("%s: %s", self.key, note) end
    self.storage = mount
  elseif svc.storage_quota_mb and self.storage then
    -- kept across a rollout's replacement: a quota the new definition
    -- raised is grown now, not at some later start
    local resized, note, lasting = self.storage:resize(svc.storage_quota_mb)
    if lasting then self:release_start() return nil, "storage: " .. note, lasting end
    -- (online growth needs CAP_SYS_RESOURCE: without it the data is still
    -- there, at the old size, and a start from stopped grows it offline)
    if not resized then
      log.warn("%s: could not grow its storage to %d MB while it is mounted (%s); it keeps %d MB until it is "
        .. "stopped and started again", self.key, svc.storage_quota_mb, note, self.storage.quota_mb)
    elseif note then
      log.info("%s: %s", self.key, note)
    end
  end
  if user then
    -- the instance's files are its own, and no one else's
    ok, err = core.fs.chown(vars.instance_dir, user.uid, user.gid)
    if not ok then self:release_start() return nil, err end
  end
  local cg, cgerr = sup:cgroup_for(self, svc)
  if cgerr then self:release_start() return nil, cgerr end
  self.cg = cg

  local out_r, out_w = core.logbuf.pipe()
  local err_r, err_w = core.logbuf.pipe()
  local ctx = {
    argv = argv, env = env, cwd = cwd, stdout_fd = out_w, stderr_fd = err_w,
    service = svc, id = self.id, vars = vars, config_file = sup.cfg.source,
    user = user, rlimits = { nofile = svc.nofile, nproc = svc.nproc },
  }
  local spec, prep_err, prep_lasting = driver.prepare(ctx)
  -- a network namespace made ahead is the spawn's to close; a start that
  -- ends before the spawn, by a failure or an error raised, closes it here
  local spawned = false
  local _ <close> = setmetatable({}, { __close = function()
    if not spawned and spec and spec.netns_fd then core.fs.close_fd(spec.netns_fd) end
  end })
  local function abandon(why, lasting)
    for _, fd in ipairs { out_r, out_w, err_r, err_w } do core.logbuf.close_fd(fd) end
    self:release_start()
    return nil, why, lasting
  end
  if not spec then return abandon(prep_err, prep_lasting) end
  -- the context is kept only for a driver that stops or cleans up by
  -- itself (its argv, env and vars are a few KB an instance otherwise)
  self.driver = driver
  if driver.stop or driver.cleanup then self.launch_ctx = ctx end
  if driver.setup then
    local ready, serr = driver.setup(ctx)
    if not ready then return abandon(serr) end
  end
  if cg then
    local fds, into = cg:proc_fds()
    if not fds then return abandon(into) end
    -- the child is in its cgroups before it execs: no allocation escapes
    spec.cgroup_fds, spec.cgroup_into = fds, into
  end
  -- what the app forked goes when it does: killed by C before the reap,
  -- the one moment the group's number cannot belong to anyone else
  spec.kill_group_at_exit = true
  spawned = true
  local proc, serr = core.proc.spawn(spec)
  if cg then cg:close_fds() end
  core.logbuf.close_fd(out_w)
  core.logbuf.close_fd(err_w)
  if not proc then
    core.logbuf.close_fd(out_r)
    core.logbuf.close_fd(err_r)
    self:release_start()
    return nil, serr
  end
  -- the ring holds earlier runs too, and during a rollout the old process
  -- writes on beside this one: an error about this one quotes only what this
  -- one said, its lines marked with its pid
  self.output_after, self.output_source = self.ring:last_seq(), proc.pid
  self.ring:capture(out_r, "stdout", proc.pid)
  self.ring:capture(err_r, "stderr", proc.pid)
  self.proc = proc
  self.pid = proc.pid
  self.started_at = core.now()
  return proc
end

-- inst:upstream() -> the C upstream (core.http.upstream) the front door
-- proxies through: it points at the socket that takes new requests and
-- counts every request, whichever way it came.
function Instance:upstream()
  local up = self.upstream_obj
  local s = self.sup.cfg.settings
  if not up or self.upstream_settings ~= s then
    local opts = {
      name = self.key,
      timeout = s.proxy_timeout * 1000,
      -- enough idle connections that a busy instance never reconnects
      idle_pool = s.upstream_keepalive,
    }
    if up then
      up:set(opts)
    else
      opts.buckets = metrics.BUCKETS
      up = core.http.upstream(opts)
      self.upstream_obj = up
    end
    self.upstream_settings = s
  end
  local socket = self.route_socket or self.socket
  if socket and socket ~= self.upstream_path then
    assert(up:set { path = socket })
    self.upstream_path = socket
  end
  return up
end

-- Direct routes to it must be decided again (its socket changed).
function Instance:reroute()
  if self.upstream_obj then self.upstream_obj:invalidate() end
end

-- Why a sleep asked of the running instance is refused now, or nil. It is
-- decided when the runner takes it, in the same turn as the stop begins
-- (and the door's routes to the instance are dropped): a request that came
-- between the asking and the taking, through the door or a direct route,
-- is in flight or has moved last_active past what the asker saw.
function Instance:still_busy(msg)
  if self:inflight() > 0 then return "busy: a request is in flight" end
  local active = self:last_active()
  if msg.idle_since and active and active > msg.idle_since then return "busy: a request came since" end
end

-- Proxied requests under way: an instance is never put to sleep under one.
function Instance:inflight()
  return self.upstream_obj and self.upstream_obj:inflight() or 0
end

-- core.now() of the last proxied request, or of the instance becoming
-- ready: idle_timeout runs from whichever came later (health checks never
-- count). From the start of the process, a slow start used up its idle time
-- before it could take a request.
function Instance:last_active()
  local at = self.started_at
  if self.ready_at and (not at or self.ready_at > at) then at = self.ready_at end
  local used = self.upstream_obj and self.upstream_obj:last_active()
  if used and (not at or used > at) then at = used end
  return at
end

-- What the upstream counted: requests, by_class, bytes_in, bytes_out,
-- errors, latency (a histogram as metrics.histogram makes).
function Instance:traffic()
  if self.upstream_obj then return self.upstream_obj:stats() end
  return { requests = 0, errors = 0, bytes_in = 0, bytes_out = 0, inflight = 0, by_class = {},
    latency = metrics.histogram(metrics.BUCKETS) }
end

function Instance:last_output(n)
  n = n or OUTPUT_LINES_IN_ERRORS
  local lines = {}
  -- newest first, then turned: the last n this process wrote
  local all = self.ring:lines(self.output_after or 0)
  for i = #all, 1, -1 do
    if #lines == n then break end
    if all[i].source == self.output_source then lines[#lines + 1] = all[i] end
  end
  if #lines == 0 then return "" end
  local out = { "\nlast output:" }
  for i = #lines, 1, -1 do out[#out + 1] = "  " .. lines[i].stream .. ": " .. lines[i].text end
  return table.concat(out, "\n")
end

-- One health check: GET {health} over the socket, 2xx is healthy; with no
-- `health`, a connection to the socket is. -> true | nil, why, status (the
-- answer's, when there was one)
function Instance:check(timeout_ms)
  local socket = self.socket
  if not socket then return nil, "not running" end
  if self.svc.health then
    local res, err = core.http.request {
      path = socket, method = "GET", target = self.svc.health,
      headers = { ["user-agent"] = "tenement-health" }, timeout = timeout_ms,
    }
    if not res then return nil, err end
    if res.status < 200 or res.status > 299 then
      return nil, string.format("GET %s answered %d", self.svc.health, res.status), res.status
    end
    return true
  end
  local conn, err = core.net.connect { path = socket, timeout = timeout_ms }
  if not conn then return nil, err end
  conn:close()
  return true
end

-- One GET over a kept-open connection. -> status | nil, err, stale
-- (stale: the connection died before answering anything, so a fresh one
-- may be tried), and whether the connection may be used again.
local HEAD_MAX, BODY_MAX = 16 * 1024, 64 * 1024

-- Header lines are found in the response as it came, whatever the case of
-- their names: a check copies and lowers nothing (a thousand instances make
-- a hundred checks a second, each one's garbage collected later).
local function nocase(word)
  return (word:gsub("%a", function(c) return "[" .. c:upper() .. c:lower() .. "]" end))
end
local CONNECTION_CLOSE = "\n" .. nocase("connection") .. ":%s*" .. nocase("close")
local CONTENT_LENGTH = "\n" .. nocase("content") .. "%-" .. nocase("length") .. ":%s*(%d+)"
local CHUNKED = "\n" .. nocase("transfer") .. "%-" .. nocase("encoding") .. ":%s*" .. nocase("chunked")

-- Where `pattern` matches in the head (which ends at head_end): its capture
-- or true | nil
local function in_head(buf, pattern, head_end)
  local at, _, capture = buf:find(pattern)
  if at and at < head_end then return capture or true end
  return nil
end

local function kept_get(conn, request, timeout_ms)
  local ok, err = conn:write(request)
  if not ok then return nil, err, true end
  local buf = ""
  local head_end
  repeat
    local chunk, rerr = conn:read(timeout_ms)
    if not chunk then return nil, rerr or "the connection closed", buf == "" end
    buf = buf .. chunk
    head_end = buf:find("\r\n\r\n", 1, true)
    if not head_end and #buf > HEAD_MAX then return nil, "response head too large" end
  until head_end
  local status = tonumber(buf:match("^HTTP/1%.[01] (%d%d%d)"))
  if not status then return nil, "not an HTTP response" end
  local body_at = head_end + 4
  local reusable = not in_head(buf, CONNECTION_CLOSE, head_end)
  local length = tonumber(in_head(buf, CONTENT_LENGTH, head_end))
  if length then
    if length > BODY_MAX then return status, nil, nil, false end
    while #buf - body_at + 1 < length do
      local chunk = conn:read(timeout_ms)
      if not chunk then return status, nil, nil, false end
      buf = buf .. chunk
    end
  elseif in_head(buf, CHUNKED, head_end) then
    while not buf:find("0\r\n\r\n", body_at, true) and #buf - body_at < BODY_MAX do
      local chunk = conn:read(timeout_ms)
      if not chunk then return status, nil, nil, false end
      buf = buf .. chunk
    end
    reusable = reusable and #buf - body_at < BODY_MAX
  elseif status >= 200 and status ~= 204 and status ~= 304 then
    reusable = false -- a body delimited by the close
  end
  return status, nil, nil, reusable
end

-- The periodic health check, over one connection kept open between checks:
-- a thousand instances checked every few seconds would otherwise cost a
-- connect, an accept and two closes each time. A connection that went away
-- is replaced once. Without `health`, the check is the connect itself.
-- -> true | nil, why
function Instance:check_kept(keep, timeout_ms)
  if not self.svc.health then return self:check(timeout_ms) end
  local socket = self.socket
  if not socket then return nil, "not running" end
  if keep.conn and keep.socket ~= socket then keep.conn:close() keep.conn = nil end
  for _ = 1, 2 do
    local fresh = keep.conn == nil
    if fresh then
      local conn, err = core.net.connect { path = socket, timeout = timeout_ms }
      if not conn then return nil, err end
      keep.conn, keep.socket = conn, socket
    end
    local path = self.svc.health
    if keep.path ~= path then
      keep.path = path
      keep.request = "GET " .. path .. " HTTP/1.1\r\nHost: localhost\r\nUser-Agent: tenement-health\r\n\r\n"
    end
    local status, err, stale, reusable = kept_get(keep.conn, keep.request, timeout_ms)
    if not (status and reusable) then keep.conn:close() keep.conn = nil end
    if status then
      if status < 200 or status > 299 then
        return nil, string.format("GET %s answered %d", self.svc.health, status), status
      end
      return true
    end
    if fresh or not stale then return nil, err end
  end
end

-- The one helper task of a started process (the runner is the other task of
-- a running instance). It waits on the process's pidfd, so an exit is seen
-- at once (while a check is in flight, when the check ends: a process that
-- exits closes its end of the connection). Meanwhile it probes until the
-- process answers, then checks its health every health_check_interval, over
-- one connection kept open from the first probe on. It only puts messages;
-- `gen` says which process they are about. ready_by: the deadline of the
-- start, or nil for a process that is running already.
function Instance:watch(proc, gen, ready_by)
  local keep = {}
  local status = "ready"
  if ready_by then status = self:watch_start(proc, gen, ready_by, keep) end
  if status == "ready" then status = self:watch_health(proc, gen, keep) end
  if keep.conn then keep.conn:close() end
  if status then self.mailbox:put({ type = "exit", gen = gen, status = status }) end
end

-- The watch on a socket directory, shared by the starts waiting there; a
-- directory moved or removed and made again gets a new one (the starts
-- still on the old one poll). -> entry { watch, users } | nil (the
-- directory cannot be watched: those starts only poll)
function Supervisor:watch_socket_dir(dir)
  local entry = self.socket_watches[dir]
  if not entry or entry.watch:moved() then
    local watch, err = core.fs.watch(dir)
    if not watch then
      log.debug("cannot watch %s for sockets (%s): starts there are noticed by polling only", dir, tostring(err))
      return nil
    end
    entry = { watch = watch, users = 0, dir = dir }
    self.socket_watches[dir] = entry
  end
  entry.users = entry.users + 1
  return entry
end

function Supervisor:unwatch_socket_dir(entry)
  entry.users = entry.users - 1
  if entry.users > 0 then return end
  entry.watch:close()
  if self.socket_watches[entry.dir] == entry then self.socket_watches[entry.dir] = nil end
end

-- Probes until the process answers: at once when its socket appears (the
-- directory is watched), and otherwise every millisecond for the first
-- PROBE_FAST_MS, then backing off to every 100 ms (an app that listens
-- before it answers its health check is only polled). A request waiting for
-- a wake waits for this probe. -> "ready" | exit status | nil (no longer
-- current)
local PROBE_FAST_MS = 100
function Instance:watch_start(proc, gen, ready_by, keep)
  local status = self:probe_until_ready(proc, gen, ready_by, keep)
  if status == "ready" or self.gen ~= gen then return status end
  -- not ready in time: the runner stops it, and its exit is reported as ever
  return status or (proc:wait())
end

-- Whether pid is root or runs under it (the parent links in /proc).
local function descends_from(pid, root)
  for _ = 1, 64 do
    if pid == root then return true end
    if pid <= 1 then return false end
    local stat = core.fs.read("/proc/" .. pid .. "/stat")
    -- the command name may hold spaces and parentheses: the parent's pid
    -- follows the state, after the last ')'
    pid = stat and tonumber(stat:match(".*%) %S+ (%d+)"))
    if not pid then return false end
  end
  return false
end

-- An answer on the socket makes the instance ready only if its own process
-- gave it: whoever may create files in the socket directory could bind
-- the path first (the app then fails with EADDRINUSE) and be handed its
-- traffic. The kernel says who listened (SO_PEERCRED). -> true | nil, why
function Instance:answered_by(proc, conn)
  local own, err = conn
  if not own then
    own, err = core.net.connect { path = self.socket, timeout = 1000 }
    if not own then return nil, err end
  end
  local cred, cerr = own:credentials()
  if own ~= conn then own:close() end
  if not cred then return nil, cerr end
  if descends_from(cred.pid, proc.pid) then return true end
  return nil, string.format("%s is served by pid %d (uid %d), which is neither the instance's process (%d) nor "
    .. "one of its children: something else bound the path", self.socket, cred.pid, cred.uid, proc.pid)
end

-- Whether an app that answered its health path with status all through a
-- start would answer so at every start: a client error is the path (or who
-- may ask it), not the app's mood, but for a timeout or a rate limit.
local function answers_alike(status)
  return status ~= nil and status >= 400 and status <= 499 and status ~= 408 and status ~= 425 and status ~= 429
end

function Instance:probe_until_ready(proc, gen, ready_by, keep)
  local name, me = self.socket:match("[^/]*$"), core.current()
  local entry = self.sup:watch_socket_dir(dirname(self.socket))
  local watch = entry and entry.watch
  -- released however this ends: a later wait must not be cut short by it
  local _ <close> = entry and setmetatable({}, { __close = function()
    watch:forget(name, me)
    self.sup:unwatch_socket_dir(entry)
  end })
  if watch then watch:wake_on(name, me) end
  local fast_until = core.now() + PROBE_FAST_MS
  local pause, told = 1, nil
  while self.gen == gen and core.now() < ready_by do
    -- what the directory told before this probe is answered by it
    if watch then watch:take(me) end
    -- a probe that got through waits for its answer as long as the start
    -- may take: cut at a second, a health check slower than that was sent
    -- again and again, and never answered in time (an exit ends the wait,
    -- closing the connection)
    local ok, why_not, status = self:check_kept(keep, math.max(1, ready_by - core.now()))
    if self.gen ~= gen then return nil end
    -- an answer that was not 2xx is what a failed start is to report
    -- (refused connections are only the app not listening yet)
    if not ok and status then self.last_answer, self.last_status = why_not, status end
    if ok then
      local mine, why = self:answered_by(proc, keep.conn)
      if self.gen ~= gen then return nil end
      if not mine then
        if why ~= told then log.warn("%s: not started: %s", self.key, why) end
        told, ok = why, false
        self.refused_answer = why
      end
    end
    if ok then
      self.mailbox:put({ type = "ready", gen = gen })
      return "ready"
    end
    -- the socket changed while it was probed: probe again at once; else wait
    -- for the exit, the socket, or the pause (the watch wakes this wait)
    if not (watch and watch:take(me)) then
      local status = proc:wait(pause)
      if status then return status end
    end
    if core.now() >= fast_until then pause = math.min(pause * 2, 100) end
  end
end

-- Checks every interval until the process exits or is no longer the current
-- one. Due times fall on a grid of interval/20 (at most 1 s), each instance
-- starting on a random step of it: the checks of a thousand instances stay
-- spread over the interval, and those due on one step share a timer wakeup
-- and have their answers read together. -> exit status | nil
function Instance:watch_health(proc, gen, keep)
  local interval = self.sup.cfg.settings.health_check_interval * 1000
  local step = math.min(interval // 20, 1000)
  local timeout = math.min(interval, 5000)
  local due = (core.now() // step + math.random(1, interval // step)) * step
  local failures = 0
  -- the file requests reach the app by: the check's kept connection goes
  -- on answering after someone removed or replaced it, while every request
  -- met ENOENT (another instance's root may write in a shared directory)
  local socket = self.socket
  local listening = socket and core.fs.stat(socket, false)
  while true do
    local status, err = proc:wait(math.max(0, due - core.now()))
    if status then return status end
    if self.gen ~= gen or err == "closed" then return nil end
    -- a wake (a stray one: nothing here asks for any) only waits again
    local checking = core.now() >= due
    if checking and (self.state == "running" or self.state == "unhealthy") then
      local ok, why = self:check_kept(keep, timeout)
      if ok and listening then
        local now = core.fs.stat(socket, false)
        if not now or now.ino ~= listening.ino or now.dev ~= listening.dev then
          ok, why = false, string.format("its socket %s was %s: requests cannot reach it", socket,
            now and "replaced by another file" or "removed")
        end
      end
      if self.gen ~= gen then return nil end
      if ok then
        failures = 0
        self.health = "healthy"
        if self.state == "unhealthy" then self.mailbox:put({ type = "health_ok", gen = gen }) end
      else
        failures = failures + 1
        self.health_failures = (self.health_failures or 0) + 1
        self.last_health_error = why
        if failures >= FAILURES_UNHEALTHY then
          self.health = "unhealthy"
          if self.state == "running" then
            self.mailbox:put({ type = "unhealthy", gen = gen, why = why, failures = failures })
          end
        else
          self.health = "degraded"
        end
      end
    end
    if checking then
      self:check_storage()
      repeat due = due + interval until due > core.now()
    end
  end
end

-- A full quota fails the app's writes with ENOSPC, which only its own output
-- may mention: said in the server's log once it is full, again only after it
-- went under 90%. Full is 99%: ext4 keeps a few blocks no writer gets.
function Instance:check_storage()
  if not self.storage then return end
  local used, total = storage.usage(self.dir)
  if not used or not total or total <= 0 then return end
  if used >= total * 0.99 and not self.storage_full_told then
    self.storage_full_told = true
    log.warn("%s: its storage is full (%d of %d MB used): its writes there fail with ENOSPC; free space in %s, or "
      .. "raise storage_quota_mb (a reload applies it)", self.key, used // (1024 * 1024), total // (1024 * 1024),
      self.dir)
  elseif used < total * 0.9 then
    self.storage_full_told = nil
  end
end

-- SIGTERM to the process group, SIGKILL after stop_timeout. -> exit status
function Instance:terminate(proc, driver, ctx)
  -- a driver may know a better way to ask (runsc does not forward signals)
  if not driver then driver, ctx = self.driver, self.launch_ctx end
  local asked = false
  if self.sup.hurrying then
    proc:kill("SIGKILL", true)
    asked = true
  elseif driver and driver.stop then
    local ok, err = driver.stop(ctx, proc)
    if ok then asked = true else log.warn("%s: %s", self.key, tostring(err)) end
  end
  if not asked then proc:kill("SIGTERM", true) end
  local deadline = core.now() + self.sup.cfg.settings.stop_timeout * 1000
  -- only the exit or the deadline ends the wait (a wake would be a stray
  -- one); sup:hurry sends the SIGKILL early
  self.terminating = proc
  local status, err
  repeat
    status, err = proc:wait(math.max(0, deadline - core.now()))
  until status or err == "closed" or core.now() >= deadline
  self.terminating = nil
  if not status then
    log.warn("%s did not stop within %d s of SIGTERM: SIGKILL", self.key, self.sup.cfg.settings.stop_timeout)
    proc:kill("SIGKILL", true)
    status = proc:wait()
    if status then status.forced = self.sup.cfg.settings.stop_timeout end
  end
  return status
end

local function describe_status(st)
  if not st then return "unknown" end
  if st.forced then
    -- the operator who asked for the stop learns that it took force
    return string.format("killed by SIGKILL: it had not stopped %d s after SIGTERM (stop_timeout)", st.forced)
  end
  if st.signal then return "killed by " .. st.signal end
  return "exited with code " .. tostring(st.code)
end

-- What an exit was: an OOM kill is told apart by the cgroup's own count.
function Instance:exit_info(status)
  local info = { reason = "exit", code = status.code, signal = status.signal, message = describe_status(status) }
  local killed = status.signal == "SIGKILL" or status.code == 137
  -- the count is the cgroup's since it was made: it may have served
  -- earlier starts of the instance
  if killed and self.cg and (self.cg:oom_kills() or 0) > (self.cg.oom_seen or 0) then
    info.reason = "oom"
    info.message = string.format("killed: out of memory, limit %d MB", self.svc.memory_limit_mb or 0)
  end
  return info
end

-- Memory and CPU of the instance: its cgroup, else its main process.
function Instance:usage()
  local u = self.cg and self.cg:usage()
  if u and u.memory_bytes then return u end
  return metrics.proc_usage(self.pid)
end

-- Waits for the mailbox message of this generation, dropping stale ones.
function Instance:next_message(gen, timeout_ms)
  local deadline = timeout_ms and core.now() + timeout_ms
  while true do
    local left = deadline and math.max(0, deadline - core.now())
    local msg, err = self.mailbox:take(left)
    if not msg then return nil, err end
    if msg.gen == nil or msg.gen == gen then return msg end
  end
end

-- One start: launch, wait until ready. -> "ready" | "stop", msg | nil, exit info
function Instance:start_once()
  self.gen = self.gen + 1
  local gen = self.gen
  -- launched by a task of its own: launching goes deep (templates, cgroups,
  -- the driver), and a runner that did it itself would keep its stack grown
  -- for the life of the process (a thousand of them, megabytes); a task's
  -- coroutine is shrunk when it ends
  local launched, proc, err, lasting = core.spawn(self.launch, self):join()
  if not launched then proc, err = nil, tostring(proc) end
  if not proc then
    return nil, { reason = "start", message = "spawn failed: " .. err, lasting = lasting or nil }
  end
  local timeout = self.svc.startup_timeout * 1000
  self.refused_answer, self.last_answer, self.last_status = nil, nil, nil
  core.spawn(self.watch, self, proc, gen, core.now() + timeout)
  -- a rollout's request that comes during the start is for the process
  -- that results: put back for the runner, whatever the start's outcome
  local deferred = {}
  local _ <close> = setmetatable({}, { __close = function()
    for _, m in ipairs(deferred) do self.mailbox:put(m) end
  end })
  while true do
    local msg = self:next_message(gen, timeout - (core.now() - self.started_at))
    if not msg then
      self.gen = self.gen + 1
      self:terminate(proc)
      local what = self.svc.health and ("answer GET " .. self.svc.health .. " with 2xx") or "accept connections"
      local why = self.refused_answer or (self.last_answer and ("the last answer: " .. self.last_answer))
      if not why and self.socket and not core.fs.stat(self.socket) then
        -- the usual first mistake: an app on $PORT, or on a socket of its own
        why = "no socket was ever made there: the app must listen on the Unix socket in $SOCKET_PATH, where "
          .. "requests and health checks go ($PORT gets none)"
      end
      local info = { reason = "start", message = string.format(
        "did not %s on %s within startup_timeout = %d s%s%s", what, self.socket,
        self.svc.startup_timeout, why and (" (" .. why .. ")") or "", self:last_output()),
        lasting = not self.refused_answer and answers_alike(self.last_status) or nil }
      self:release_start()
      return nil, info
    elseif msg.type == "ready" then
      return "ready"
    elseif msg.type == "exit" then
      self.gen = self.gen + 1
      self:settle_output()
      local info = self:exit_info(msg.status)
      info.message = info.message .. " during startup" .. self:last_output()
      self:release_start()
      return nil, info
    elseif msg.type == "stop" or msg.type == "sleep" then
      return msg.type, msg
    elseif msg.type == "replace" then
      deferred[#deferred + 1] = msg
    end
  end
end

-- After an exit, give the pipes a moment to deliver the last lines, so the
-- error shown to the operator includes what the app said before dying.
function Instance:settle_output()
  self.ring:wait_drained(200)
end

-- A rollout of one instance, inside its runner while it runs: start the new
-- definition on a socket of its own, wait until it is ready, switch the
-- traffic to it, let the requests still on the old process finish, then stop
-- the old one. If the new one does not come up, the old one keeps serving.
-- -> true | nil, err
function Instance:replace_process(new_svc)
  local old = { proc = self.proc, socket = self.socket, port = self.port, pid = self.pid, cg = self.cg,
    driver = self.driver, ctx = self.launch_ctx, svc = self.svc, gen = self.gen,
    started_at = self.started_at }
  -- the proxy keeps using the old socket until the switch
  self.route_socket = old.socket
  self.svc = new_svc
  self.socket_suffix = "." .. (self.gen + 1)
  self.port, self.proc, self.driver, self.launch_ctx, self.cg = nil, nil, nil, nil, nil
  local outcome, info = self:start_once()
  self.socket_suffix = nil
  if outcome ~= "ready" then
    -- start_once released what a failed start took; a stop that came in
    -- meanwhile leaves the new process running: end it, then put the old
    -- one back (the stop is handled by the runner right after)
    if outcome == "stop" or outcome == "sleep" then
      self.gen = self.gen + 1
      if self.proc then self:terminate(self.proc) end
      self:release_start()
      self.mailbox:put(info)
    end
    self.svc, self.proc, self.socket, self.port, self.pid = old.svc, old.proc, old.socket, old.port, old.pid
    self.cg = old.cg
    self.driver, self.launch_ctx, self.started_at = old.driver, old.ctx, old.started_at
    self.route_socket = nil
    self.gen = self.gen + 1
    core.spawn(self.watch, self, old.proc, self.gen)
    return nil, (info and info.message) or "the new process did not start"
  end
  -- switch: new requests go to the new process
  self.route_socket = nil
  self:reroute()
  core.http.pool_close(old.socket)
  -- drain: requests already on the old process finish (bounded by stop_timeout)
  local deadline = core.now() + self.sup.cfg.settings.stop_timeout * 1000
  local function busy()
    local pool = core.http.pool_stats(old.socket)
    return pool and pool.exchanges > 0
  end
  while busy() and core.now() < deadline do core.sleep(10) end
  self:terminate(old.proc, old.driver, old.ctx)
  if old.cg then
    local ok, err = old.cg:kill_all()
    if ok then ok, err = old.cg:remove() end
    if not ok then log.warn("%s: cgroup of the old process: %s", self.key, tostring(err)) end
  end
  self.sup:free_port(old.port)
  core.fs.unlink(old.socket)
  if old.driver and old.driver.cleanup then old.driver.cleanup(old.ctx) end
  log.info("%s replaced: pid %s now serves on %s", self.key, tostring(self.pid), self.socket)
  return true
end

-- The runner: the instance's whole life, one task.
function Instance:run()
  -- what is still queued when the runner ends, however it ends (an error
  -- too), is answered: its askers must not wait for ever
  local _ <close> = setmetatable({}, { __close = function() self:answer_queued() end })
  while true do
    local outcome, info = self:start_once()
    local exit
    if outcome == "ready" then
      self:transition("ready")
      self.health = "healthy"
      self.ready_at = core.now()
      -- LAST EXIT as a running instance shows it (false: none), where the
      -- one kept said something of the state it was in
      if self.last_exit_when_running ~= nil then
        self.last_exit, self.last_exit_when_running = self.last_exit_when_running or nil, nil
      end
      -- one line per start, with who asked for it: the first start of a
      -- runner names its asker, the later ones are its own restarts
      log.info("%s running: pid %s on %s, ready in %d ms (%s)", self.key, tostring(self.pid), self.socket or "-",
        core.now() - self.started_at, self.start_why or "restarted")
      self.start_why = nil
      self.ready_event:set(true)
      while not exit do
        local msg = self:next_message(self.gen)
        if msg.type == "exit" then
          -- what the app forked went with it (spec.kill_group_at_exit)
          self:settle_output()
          exit = self:exit_info(msg.status)
          self.gen = self.gen + 1
          self:release_start()
        elseif msg.type == "unhealthy" then
          self:transition("health_bad", msg.why)
          if self.svc.restart ~= "never" then
            local proc = self.proc
            self.gen = self.gen + 1
            self:terminate(proc)
            self:release_start()
            exit = { reason = "health", message = string.format(
              "failed %d health checks in a row (%s)", msg.failures, tostring(msg.why)) }
          end
        elseif msg.type == "health_ok" then
          if self.state == "unhealthy" then self:transition("health_ok") end
        elseif msg.type == "replace" then
          local ok, err = self:replace_process(msg.svc)
          msg.done:set(ok, err)
        elseif msg.type == "stop" or msg.type == "sleep" then
          local busy = msg.type == "sleep" and self:still_busy(msg)
          if not busy then
            outcome, info = msg.type, msg
            break
          end
          msg.answer:set(nil, busy)
        end
      end
    end

    if outcome == "stop" or outcome == "sleep" then
      if info.answer then info.answer:set(true) end
      self:transition(outcome == "stop" and "stop" or "sleep", info.reason)
      local proc = self.proc
      self.gen = self.gen + 1
      local status = proc and self:terminate(proc)
      self:release_start()
      self.last_exit = (outcome == "stop" and "stopped" or "asleep") ..
        (status and (" (" .. describe_status(status) .. ")") or "")
      self:finish_stop(outcome, info.keep_data)
      return
    end

    exit = exit or info
    self.last_exit = exit.message
    local now = core.now() / 1000
    self.history = restart.prune(self.history, self.sup.cfg.settings, now)
    local settings = setmetatable({ restart = self.svc.restart }, { __index = self.sup.cfg.settings })
    local ok, decision = pcall(self.sup.decide, self.history, exit, settings, now)
    -- an answer the runner cannot follow is a failure of the policy too:
    -- taken as it was, it raised in the runner, which died and left the
    -- instance in a state nothing could end
    if ok and not (type(decision) == "table" and (((decision.action == "fail" or decision.action == "stay_down")
      and type(decision.reason) == "string")
      or (decision.action == "restart" and math.type(decision.delay_ms) == "integer" and decision.delay_ms >= 0))) then
      ok, decision = false, "not a decision: " .. tostring(type(decision) == "table" and decision.action or decision)
    end
    if not ok then
      log.error("%s: restart policy failed (%s): using the built-in one", self.key, tostring(decision))
      decision = restart.decide(self.history, exit, settings, now)
    end
    if decision.action == "restart" then
      log.warn("%s %s; restarting in %d ms", self.key, exit.message:match("^[^\n]*"), decision.delay_ms)
      self:transition("restart", exit.message)
      -- s6's rule: no policy may restart faster than this
      local delay = math.max(decision.delay_ms, 10)
      local retry_at = core.now() + delay
      local msg
      repeat
        msg = self:next_message(nil, math.max(0, retry_at - core.now()))
        if msg and msg.type == "replace" then self:take_definition(msg) end
      until not msg or msg.type ~= "replace"
      if msg and (msg.type == "stop" or msg.type == "sleep") then
        -- a sleep asked while it ran (the reaper's) is still a sleep: its
        -- data stays for the wake
        if msg.answer then msg.answer:set(true) end
        self:transition(msg.type, msg.reason)
        self:finish_stop(msg.type, msg.keep_data)
        return
      end
      self.history[#self.history + 1] = core.now() / 1000
      self.restarts = self.restarts + 1
      self:transition("retry")
    elseif decision.action == "fail" then
      local first = exit.message:match("^[^\n]*")
      log.error("%s %s; %s", self.key, first, decision.reason)
      -- the verdict goes with the exit it follows, before the output quoted
      -- under it (which `ten ps` leaves out)
      self.last_exit = first .. "; " .. decision.reason .. exit.message:sub(#first + 1)
      -- the exit itself, for once a start brings the instance back: the
      -- verdict ("gave up") said of a running instance reads as its state
      self.last_exit_when_running = exit.message
      self:transition("fail", self.last_exit)
      self.ready_event:set(nil, self.last_exit)
      self:answer_queued()
      self.runner = nil
      return
    else
      log.info("%s %s; %s", self.key, exit.message:match("^[^\n]*"), decision.reason)
      self:transition("down", decision.reason)
      self.ready_event:set(nil, exit.message)
      self:answer_queued()
      self.runner = nil
      return
    end
  end
end

-- The end of a stop or a sleep, from stopping. The instance says stopped
-- (or sleeping) only once its storage is unmounted and its data removed:
-- an unmount waits for a helper process, and a wake that started the
-- instance again meanwhile had its new directory removed and its runner
-- taken for the old one's (nothing could stop it any more).
function Instance:finish_stop(outcome, keep_data)
  if outcome == "stop" then
    self:drop_spare_cgroup()
    -- asleep, the data stays mounted for the wake; stopped, it is unmounted
    -- and, unless storage_persist (or the server is only restarting), removed
    self:detach_storage()
    if not keep_data and not self.svc.storage_persist and self.dir then
      if self.svc.storage_quota_mb then
        local ok, err = storage.remove(self.sup.cfg.settings.data_dir, self.service, self.id)
        if not ok then log.warn("%s: could not remove its storage image: %s", self.key, err) end
      end
      local ok, err = core.fs.rmtree(self.dir)
      if not ok then log.warn("%s: could not remove %s: %s", self.key, self.dir, err) end
    end
  end
  self:transition(outcome == "stop" and "stopped" or "slept")
  log.info("%s %s (%s)", self.key, outcome == "stop" and "stopped" or "asleep", self.reason or outcome)
  self.ready_event:set(nil, outcome == "stop" and "stopped" or "asleep")
  self:answer_queued()
  self.runner = nil
end

-- A rollout's request for an instance with no process to replace (backing
-- off, or its runner ending): its next start takes the new definition, as
-- for an instance that was not running. Left unanswered, the rollout
-- waited for good and the service stayed locked against rollouts.
function Instance:take_definition(msg)
  self.svc = msg.svc
  msg.done:set(true)
end

-- The runner's end empties the mailbox: a rollout's request takes effect at
-- the next start, and a sleep asked behind a stop (or a give-up) is answered
-- "not running", or its asker waited for ever.
function Instance:answer_queued()
  while self.mailbox:size() > 0 do
    local msg = self.mailbox:take(0)
    if msg and msg.type == "replace" then self:take_definition(msg)
    elseif msg and msg.type == "sleep" and msg.answer then msg.answer:set(nil, "not running") end
  end
end

function Instance:detach_storage()
  local mount = self.storage
  self.storage = nil
  if not mount then return end
  local ok, err = mount:detach()
  if not ok then log.warn("%s: could not unmount its storage: %s", self.key, err) end
end

---------------------------------------------------------------------------
-- the public verbs

function Supervisor:get(service, id)
  return self.instances[supervisor.key(service, id)]
end

function Supervisor:instance(service, id)
  local key = supervisor.key(service, id)
  local inst = self.instances[key]
  if inst then return inst end
  local svc = self.cfg.services[service]
  inst = setmetatable({
    sup = self, service = service, id = id, key = key, svc = svc,
    state = "stopped", health = "unknown", gen = 0, restarts = 0, history = {},
    mailbox = sync.mailbox(), ready_event = sync.event(),
    ring = core.logbuf.ring { tag = key, lines = self.cfg.settings.log_ring_lines, sink = self.sink },
    weight = self.weights[key] or 100,
    -- requests are counted by its upstream (inst:upstream(), made on the first)
    stats = { wakes = 0, wake = metrics.histogram(metrics.WAKE_BUCKETS) },
  }, Instance)
  self.instances[key] = inst
  return inst
end

local function check_target(self, service, id)
  local ok, err = config.valid_name(service)
  if not ok then return nil, "service name " .. err, "bad_request" end
  ok, err = config.valid_name(id)
  if not ok then return nil, "instance id " .. err, "bad_request" end
  if not self.cfg.services[service] then
    local names = {}
    for name in pairs(self.cfg.services) do names[#names + 1] = name end
    table.sort(names)
    return nil, string.format("no service %q in %s (services: %s)", service,
      self.cfg.source or "the configuration", #names > 0 and table.concat(names, ", ") or "none"), "not_found"
  end
  return true
end

-- sup:spawn(service, id [, {wait = true, why = "..."}]) -> inst | nil, err, code
-- Starts the instance (idempotent: a running one is returned as it is) and,
-- by default, waits until it is running or its start failed for good. why
-- says who asked, for the log line of the start.
function Supervisor:spawn(service, id, opts)
  opts = opts or {}
  local ok, err, code = check_target(self, service, id)
  if not ok then return nil, err, code end
  if self.shutting_down then return nil, "the server is shutting down", "unavailable" end
  local inst = self:instance(service, id)
  if inst.state == "stopping" then
    inst:wait_state({ stopped = true, sleeping = true })
  end
  inst.held = nil
  if inst.state == "stopped" or inst.state == "sleeping" or inst.state == "failed" then
    if inst.state == "failed" then inst.history = {} end
    -- a fresh start: no outcome or message of an earlier life carries over
    if inst.ready_event:is_set() then inst.ready_event = sync.event() end
    if inst.mailbox:size() > 0 then inst.mailbox = sync.mailbox() end
    inst.start_why = (inst.state == "sleeping" and "woken " or "started ") .. (opts.why or "by a call")
    -- the reason shown from now on is this start's, not the sleep's or stop's
    inst:transition("spawn", inst.start_why)
    inst.runner = core.spawn(inst.run, inst)
    if self.store and opts.persist ~= false then self:save_desired(inst, true) end
  elseif inst.unsaved and self.store and opts.persist ~= false then
    self:save_desired(inst, true) -- running, and asked for again: what the store missed is tried again
  end
  if opts.wait == false then return inst end
  if inst.state == "running" or inst.state == "unhealthy" then return inst end
  if inst.ready_event:is_set() then
    -- restarting after a crash (backing off, or starting again): the ready
    -- event is the earlier life's, so the wait is for where this one ends
    local state = inst:wait_state(supervisor.SETTLED)
    if state == "running" or state == "unhealthy" then return inst end
    return nil, string.format("%s did not start: %s", inst.key, inst.last_exit or state), "start_failed"
  end
  local ready, why = inst.ready_event:wait()
  if not ready then return nil, string.format("%s did not start: %s", inst.key, why), "start_failed" end
  return inst
end

-- sup:left_sockets(dir) -> { socket name -> { "{name}.N", ... } }: what a
-- server before this one may have left in dir, listed once (a thousand
-- instances sharing a directory read it once, not a thousand times)
function Supervisor:left_sockets(dir)
  local left = self.sockets_left[dir]
  if not left then
    left = {}
    for _, entry in ipairs(core.fs.readdir(dir) or {}) do
      local name = entry:match("^(.+)%.%d+$")
      if name then
        left[name] = left[name] or {}
        table.insert(left[name], entry)
      end
    end
    self.sockets_left[dir] = left
  end
  return left
end

-- sup:save_desired(inst, desired): records whether the instance runs after
-- a restart of the server. A failure (a full disk) does not undo the start
-- or stop the operator asked for, and may need most then: it is logged and
-- kept as inst.unsaved, which the API and the CLI show, until a save succeeds.
function Supervisor:save_desired(inst, desired)
  local ok, err = self.store:set_desired(inst.service, inst.id, desired)
  -- (stored_desired: what the store holds, when known: a failed write of
  -- the same is no loss)
  if ok or inst.stored_desired == desired then
    inst.unsaved, inst.stored_desired = nil, desired
    return true
  end
  inst.unsaved = string.format("the store could not record the %s (%s): after a restart of ten serve it will %s",
    desired and "start" or "stop", err, desired and "not be started again" or "start again")
  log.error("%s: %s", inst.key, inst.unsaved)
end

-- sup:stop(service, id [, {reason, hold, persist, keep_data}]) -> true | nil,
-- err, code. Waits until stopped. hold: an operator's stop, which requests
-- do not undo (Door:ensure_running) until the next spawn.
function Supervisor:stop(service, id, opts)
  opts = opts or {}
  local inst = self:get(service, id)
  if not inst then
    -- a misspelt service is the likelier story; said without the file's
    -- list of services, which a tenant's token must not read
    return nil, string.format("no instance %s%s", supervisor.key(service, id),
      self.cfg.services[service] and "" or string.format(' (there is no service "%s")', service)), "not_found"
  end
  if self.store and opts.persist ~= false then self:save_desired(inst, false) end
  -- held: no request starts it again (the front door asks), only a spawn
  if opts.hold then inst.held = true end
  if inst.runner then
    inst.mailbox:put({ type = "stop", reason = opts.reason or "stopped by request", keep_data = opts.keep_data })
    inst.runner:join()
  end
  -- without a runner, or after one that ended otherwise (a sleep asked
  -- before this stop, a give-up): a stop still ends stopped
  if not inst.runner and (inst.state == "failed" or inst.state == "sleeping") then
    inst:transition("stop", opts.reason or "stopped by request")
    inst.last_exit = inst.last_exit or "stopped"
    inst:finish_stop("stop", opts.keep_data)
  end
  return true
end

-- sup:remember_asleep(service, id): an instance known from before a restart
-- of the server, left asleep until a request wakes it (so a restart does not
-- start a thousand idle tenants at once).
function Supervisor:remember_asleep(service, id)
  local ok, err, code = check_target(self, service, id)
  if not ok then return nil, err, code end
  local inst = self:instance(service, id)
  if inst.state == "stopped" then
    inst.state = "sleeping"
    inst.last_exit = "asleep (restored after a restart of the server)"
    -- no exit of a process of its own: once one runs, there is none to show
    inst.last_exit_when_running = false
  end
  return inst
end

-- sup:sleep(service, id[, reason, idle_since]) -> true | nil, err: stop an
-- idle instance but keep it known (and its data), so its next request wakes
-- it. Refused ("busy: ...") when a request is in flight when the runner
-- takes it, or when the instance was active after idle_since (the
-- last_active the asker judged it idle by).
function Supervisor:sleep(service, id, reason, idle_since)
  local inst = self:get(service, id)
  if not inst or not inst.runner then return nil, "not running" end
  local runner = inst.runner
  local msg = { type = "sleep", reason = reason or "idle", idle_since = idle_since, answer = sync.event() }
  inst.mailbox:put(msg)
  local ok, why = msg.answer:wait()
  if not ok then return nil, why end
  runner:join()
  return true
end

-- sup:forget(service, id): a stopped instance is no longer known at all
-- (a failed deploy leaves no trace).
function Supervisor:forget(service, id)
  local key = supervisor.key(service, id)
  local inst = self.instances[key]
  if inst and inst.runner then return nil, key .. " is still running" end
  if inst then
    inst.ring:close()
    inst:drop_spare_cgroup()
  end
  self.instances[key] = nil
  self.weights[key] = nil
  if self.store then self.store:forget(service, id) end
  return true
end

-- sup:set_weight(service, id, weight) -> inst | nil, err, code. Persisted:
-- the weight survives sleep, wake and restarts of the server.
function Supervisor:set_weight(service, id, weight)
  local ok, err, code = check_target(self, service, id)
  if not ok then return nil, err, code end
  if math.type(weight) ~= "integer" or weight < 0 or weight > 100 then
    return nil, "weight must be an integer from 0 to 100", "bad_request"
  end
  -- saved first: a weight the store refused (a full disk) would route now
  -- and be gone after a restart
  if self.store then
    local saved, serr = self.store:set_weight(service, id, weight)
    if not saved then return nil, "the weight was not changed: the store could not record it (" .. serr .. ")", "internal" end
  end
  local inst = self:instance(service, id)
  inst.weight = weight
  self:publish({ type = "weight", instance = inst.key, service = service, id = id, weight = weight })
  return inst
end

-- The instances of one service, for weighted routing.
function Supervisor:of_service(service)
  local out = {}
  for _, inst in pairs(self.instances) do
    if inst.service == service then out[#out + 1] = inst end
  end
  table.sort(out, function(a, b) return a.key < b.key end)
  return out
end

-- sup:rollout(service, new_svc) -> replaced count | nil, err, code
-- Replaces every running instance of the service, one at a time, with the
-- new definition, with no request dropped. On the first failure it stops,
-- puts the instances already replaced back on the old definition, and says
-- why. Instances that are not running take the new definition at their next
-- start.
function Supervisor:rollout(service, new_svc)
  local old_svc = self.cfg.services[service]
  if not old_svc then return nil, "no service " .. service, "not_found" end
  local old_quota, new_quota = old_svc.storage_quota_mb, new_svc.storage_quota_mb
  if old_quota and new_quota and new_quota < old_quota then
    -- a running instance keeps its mount, so the rollout would pass, the
    -- lower quota hold nothing, and the next start of the instance fail
    for _, inst in ipairs(self:of_service(service)) do
      local _, image = storage.paths(self.cfg.settings.data_dir, service, inst.id)
      if core.fs.stat(image) then
        return nil, string.format("storage_quota_mb of %s cannot be lowered from %d to %d MB: %s holds a file "
          .. "system of %d MB, and shrinking one is not supported; keep %d, or stop the instance and delete %s to "
          .. "start over empty", service, old_quota, new_quota, image, old_quota, old_quota, image), "conflict"
      end
    end
  end
  if self.rolling and self.rolling[service] then return nil, "a rollout of " .. service .. " is already running", "conflict" end
  self.rolling = self.rolling or {}
  self.rolling[service] = true
  self.cfg.services[service] = new_svc
  local done = {}
  local function replace(inst, svc)
    local ev = sync.event()
    inst.mailbox:put({ type = "replace", svc = svc, done = ev })
    return ev:wait()
  end
  for _, inst in ipairs(self:of_service(service)) do
    -- any instance with a runner may have a process of the old definition
    -- (one starting already launched it): its runner replaces it, or, with
    -- no process left to replace, starts the next one on the new definition
    if inst.runner then
      local ok, err = replace(inst, new_svc)
      if not ok then
        log.error("rollout of %s stopped at %s: %s; rolling back %d instance(s)", service, inst.key, err, #done)
        for _, back in ipairs(done) do
          local rok, rerr = replace(back, old_svc)
          if not rok then log.error("rollback of %s failed: %s", back.key, rerr) end
        end
        self.cfg.services[service] = old_svc
        for _, i in ipairs(self:of_service(service)) do i.svc = old_svc end
        self.rolling[service] = nil
        -- the verdict before the output it quotes
        local why, output = tostring(err):match("^(.-)(\nlast output:.*)$")
        return nil, string.format("rollout of %s failed at %s: %s; the old version keeps serving%s",
          service, inst.key, why or err, output or ""), "start_failed"
      end
      done[#done + 1] = inst
    else
      inst.svc = new_svc
    end
  end
  self.rolling[service] = nil
  return #done
end

-- sup:restart(service, id) -> inst | nil, err, code. Clears `failed`.
function Supervisor:restart(service, id)
  local inst = self:get(service, id)
  if not inst then
    local ok, err, code = check_target(self, service, id)
    if not ok then return nil, err, code end
    return nil, string.format("no instance %s: spawn it first", supervisor.key(service, id)), "not_found"
  end
  local was_failed = inst.state == "failed"
  -- the same instance comes back: its data stays, as after a crash (a stop
  -- without keep_data removed the instance directory and its storage image)
  local ok, err, code = self:stop(service, id, { persist = false, keep_data = true, reason = "restarting" })
  if not ok then return nil, err, code end
  -- clearing failed gives the tries back, as a spawn of a failed instance
  -- does (the stop made it stopped, so the spawn could not tell); counted
  -- before the start, so the restarts it backs off into are counted too
  if was_failed then inst.history = {} end
  inst.restarts = inst.restarts + 1
  return self:spawn(service, id, { why = "by a restart" })
end

-- sup:check(service, id) -> true | nil, why : a health check right now.
function Supervisor:check(service, id)
  local inst = self:get(service, id)
  if not inst then return nil, "no instance " .. supervisor.key(service, id), "not_found" end
  if inst.state ~= "running" and inst.state ~= "unhealthy" then
    -- nothing to ask: say what it is instead, and what would start it
    local hint = ({ failed = "`ten restart %s` starts it again", stopped = "`ten spawn %s` starts it",
      sleeping = "its next request wakes it" })[inst.state]
    local last = inst.state == "failed" and inst.last_exit and inst.last_exit:match("^[^\n]*")
    return nil, string.format("%s is %s%s, so no check was made%s", inst.key, inst.state,
      last and (": " .. last) or "", hint and ("; " .. hint:format(inst.key)) or ""), "not_running"
  end
  return inst:check(5000)
end

function Instance:snapshot()
  local now = core.now()
  local snap = {
    instance = self.key, service = self.service, id = self.id,
    state = self.state, health = self.health, pid = self.pid,
    uptime_secs = (self.state == "running" or self.state == "unhealthy") and self.started_at
      and (now - self.started_at) // 1000 or nil,
    idle_secs = self.started_at and (now - self:last_active()) // 1000 or nil,
    restarts = self.restarts,
    socket = self.socket or (config.instance_vars(self.sup.cfg, self.service, self.id) or {}).socket,
    isolation = self.svc.isolation, last_exit = self.last_exit, reason = self.reason,
    weight = self.weight, port = self.port, unsaved = self.unsaved,
  }
  if self.pid then
    local u = self:usage()
    if u then snap.memory_bytes, snap.cpu_seconds = u.memory_bytes, u.cpu_seconds end
  end
  if self.svc.storage_quota_mb then
    -- the file system's own while mounted: the file's may not be applied yet
    snap.storage_quota_bytes = (self.storage and self.storage.quota_mb or self.svc.storage_quota_mb) * 1024 * 1024
    if self.storage then snap.storage_used_bytes = storage.usage(self.dir) end
  end
  return snap
end

-- sup:count_held(service) -> how many of the service's instances hold
-- something: a process, or data and a place to wake (sleeping, failed); a
-- stopped one holds nothing. What max_instances counts.
function Supervisor:count_held(service)
  local n = 0
  for _, inst in ipairs(self:of_service(service)) do
    if inst.state ~= "stopped" then n = n + 1 end
  end
  return n
end

-- sup:list() -> snapshots of every known instance, sorted by key
function Supervisor:list()
  local keys = {}
  for k in pairs(self.instances) do keys[#keys + 1] = k end
  table.sort(keys)
  local out = {}
  -- a snapshot reads the instance's cgroup: a thousand of them take tens of
  -- milliseconds, so inside a task the others get a turn every 50
  local in_task = core.current() ~= nil
  for i, k in ipairs(keys) do
    local inst = self.instances[k] -- one forgotten meanwhile is left out
    if inst then out[#out + 1] = inst:snapshot() end
    if in_task and i % 50 == 0 then coroutine.yield() end
  end
  return out
end

-- sup:state_counts() -> { state = number of instances in it }, without the
-- cost of snapshots (what /health answers)
function Supervisor:state_counts()
  local counts = {}
  for _, inst in pairs(self.instances) do counts[inst.state] = (counts[inst.state] or 0) + 1 end
  return counts
end

-- sup:hurry(): SIGKILL now to every instance waiting out its stop_timeout,
-- and at once to any stopped from here on (ten serve's second signal).
function Supervisor:hurry()
  self.hurrying = true
  for _, inst in pairs(self.instances) do
    if inst.terminating then inst.terminating:kill("SIGKILL", true) end
  end
end

-- sup:shutdown(): stop every instance at once, wait for all of them.
function Supervisor:shutdown()
  self.shutting_down = true
  local tasks = {}
  for _, inst in pairs(self.instances) do
    if inst.runner then
      tasks[#tasks + 1] = core.spawn(function()
        self:stop(inst.service, inst.id, { persist = false, keep_data = true, reason = "server shutting down" })
      end)
    end
  end
  for _, t in ipairs(tasks) do t:join() end
  -- asleep or failed, an instance may still hold the cgroups of its last start
  for _, inst in pairs(self.instances) do inst:drop_spare_cgroup() end
  if self.own_cgroup_bases then
    -- empty by now; one still busy (an instance's cgroups that could not
    -- go) stays, and the log said why
    for _, base in ipairs(cgroup.bases(self.cgroups)) do self.cgroups.fs.rmdir(base) end
  end
end

return supervisor
