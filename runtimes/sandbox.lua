-- Isolation level "sandbox": the app runs under gVisor (runsc), a kernel in
-- user space that answers the app's system calls itself; the host kernel
-- sees only the sandbox's few, filtered calls. For code you do not trust.
--
-- What the app gets (lua/tenement/oci.lua writes it as an OCI bundle):
--   - the host's root file system, read-only, with a private /proc (only the
--     sandbox's processes), /dev (gVisor's own null, zero, random, ...) and
--     /sys; an empty tmpfs over /tmp and over the data directory (so no other
--     instance's data and not tenement.db); read-write binds of the socket's
--     directory and of $INSTANCE_DIR, at their host paths;
--   - no network at all (runsc --network=none: a loopback only): it is
--     reached through $SOCKET_PATH, which runsc --host-uds=create lets it
--     create on the host, exactly as at every other level;
--   - the service's `user`, else nobody (65534), who gets $INSTANCE_DIR:
--     root in here would own the host's /etc/shadow and every file only
--     root may read; no supplementary groups, no capabilities (with `user =
--     "root"`, gVisor's defaults: KILL, NET_BIND_SERVICE, AUDIT_WRITE), no
--     new privileges; the service's nofile and nproc limits; hostname
--     "<service>-<id>", the environment and argv the supervisor computed.
--
-- Life of one start (the supervisor calls, in this order):
--   prepare(instance) -> spawn spec   pure: plans the bundle in instance.sandbox
--   setup(instance)   -> true | nil, err   writes the bundle (a fresh dir)
--   core.proc.spawn(spec)             `runsc ... run --bundle DIR CID`, in the
--                                     foreground, into the instance's cgroups
--   stop(instance, proc) -> true | nil, err   graceful stop: `runsc kill CID
--                                     SIGTERM` (runsc run does not forward
--                                     signals: a SIGTERM to it kills it, and
--                                     with it the app, without a chance to
--                                     clean up)
--   cleanup(instance) -> true | nil, err   after runsc exited: removes the
--                                     dir (with the state a killed runsc
--                                     leaves), SIGKILLing first any process
--                                     of the sandbox still alive
--
-- runsc run exits with the app's exit code (128 + n when a signal killed
-- it). It is spawned with a parent-death SIGKILL, and starts its gofer and
-- sandbox with one too (it runs them "attached"), so if ten dies, or the
-- supervisor SIGKILLs runsc's process group, the whole sandbox goes.
--
-- cgroups: runsc runs with --ignore-cgroups (else it would make cgroups at
-- the root of every hierarchy and move the sandbox there, out of ten's own
-- limits); the supervisor spawns it into the instance's cgroups
-- (core.proc.spawn's cgroup_fds) and its gofer and sandbox inherit them.
local core = require "tenement.core"
local oci = require "tenement.oci"

local driver = { name = "sandbox" }

-- Where runsc is looked for: PATH (lookup.path, else the server's PATH),
-- then these directories. Specs override both to simulate a missing runsc.
driver.lookup = { path = nil, dirs = { "/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin" } }

-- ptrace: the Debian build (December 2022) has no systrap, and the kvm
-- platform hangs on these hosts. Networking "none": runsc's own needs
-- iptables, and the app is reached through its Unix socket anyway.
driver.FLAGS = { "--platform=ptrace", "--ignore-cgroups", "--network=none", "--host-uds=create" }

-- Who the app is inside when the service names no `user`: nobody.
driver.DEFAULT_USER = { uid = 65534, gid = 65534 }

driver.PROBE_TIMEOUT_MS = 20000
driver.COMMAND_TIMEOUT_MS = 5000

local RUNSC_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
local HOSTNAME_MAX = 64
local ENV = "/usr/bin/env"
local FIX = "install gVisor: apt-get install runsc (Debian 12 and later), " ..
  'or set isolation = "namespace" for the service'

-- The probe's result: { runsc = path } or { reason = "..." }.
local probed
local probing -- a sync.event while a probe runs, so concurrent callers share it
local starts = 0

local function is_exe(path)
  local st = core.fs.stat(path)
  return st ~= nil and st.type == "file" and core.fs.access(path, "x") ~= nil
end

-- locate() -> path | nil, where (the places searched)
function driver.locate()
  local path = driver.lookup.path
  if path == nil then path = (core.proc.environ() or {}).PATH or "" end
  local seen, where = {}, {}
  local function try(dir)
    if dir == "" or seen[dir] then return nil end
    seen[dir] = true
    where[#where + 1] = dir
    local p = dir .. "/runsc"
    if is_exe(p) then return p end
  end
  for dir in path:gmatch("[^:]+") do
    if dir:sub(1, 1) == "/" then
      local p = try(dir)
      if p then return p end
    end
  end
  for _, dir in ipairs(driver.lookup.dirs or {}) do
    local p = try(dir)
    if p then return p end
  end
  return nil, table.concat(where, ":")
end

local function tmpdir() return os.getenv("TMPDIR") or "/tmp" end

local function sh_quote(s)
  return "'" .. tostring(s):gsub("'", "'\\''") .. "'"
end

local function last_lines(s, n)
  local lines = {}
  for line in tostring(s or ""):gmatch("[^\n]+") do lines[#lines + 1] = line end
  local from = math.max(1, #lines - (n or 3) + 1)
  return table.concat(lines, " | ", from)
end

local function read_all(pipe, deadline)
  local parts = {}
  while true do
    local chunk, err = pipe:read(math.max(1, deadline - core.now()))
    if not chunk then return table.concat(parts), err end
    parts[#parts + 1] = chunk
  end
end

-- run(argv, timeout_ms) -> code | nil, output (stdout and stderr), err.
-- In a task it waits without blocking the loop; outside any task (a CLI
-- checking the config) it blocks, which only happens before a loop runs.
local function run(argv, timeout_ms)
  if not core.current() then
    local parts = { "env", "-i", "PATH=" .. RUNSC_PATH, "timeout", "-s", "KILL", tostring(math.ceil(timeout_ms / 1000)) }
    for _, a in ipairs(argv) do parts[#parts + 1] = sh_quote(a) end
    local f = io.popen(table.concat(parts, " ") .. " </dev/null 2>&1", "r")
    if not f then return nil, "", "cannot run " .. argv[1] end
    local out = f:read("a")
    local _, how, code = f:close()
    if how == "exit" and code == 137 then return nil, out, "timeout" end
    return how == "exit" and code or 128 + code, out
  end
  local p, err = core.proc.spawn {
    argv = argv, env = { "PATH=" .. RUNSC_PATH }, stdin = "null", stdout = "pipe", stderr = "pipe",
  }
  if not p then return nil, "", err end
  local deadline = core.now() + timeout_ms
  local out = read_all(p.stdout, deadline)
  local errout = read_all(p.stderr, deadline)
  local st = p:wait(math.max(1, deadline - core.now()))
  if not st then
    p:kill("SIGKILL", true)
    p:wait()
    p:close()
    return nil, out .. errout, "timeout"
  end
  p:close()
  return st.code or (128 + (st.signum or 0)), out .. errout
end

-- Live processes of one runsc state root: runsc itself, its gofer and its
-- sandbox name the root on their command lines (zombies have none left).
local function runsc_processes(root)
  local marks = { "\0--root=" .. root .. "\0", "\0--root\0" .. root .. "\0" }
  local found = {}
  for _, name in ipairs(core.fs.readdir("/proc") or {}) do
    if name:match("^%d+$") then
      local cmdline = core.fs.read("/proc/" .. name .. "/cmdline")
      if cmdline and cmdline ~= "" then
        cmdline = "\0" .. cmdline
        for _, m in ipairs(marks) do
          if cmdline:find(m, 1, true) then found[#found + 1] = tonumber(name) break end
        end
      end
    end
  end
  return found
end
driver.runsc_processes = runsc_processes

local function wait_gone(root, ms)
  local deadline = core.now() + ms
  local left = runsc_processes(root)
  while #left > 0 and core.current() and core.now() < deadline do
    core.sleep(10)
    left = runsc_processes(root)
  end
  return left
end

-- Ends whatever of the sandbox under root still lives. -> pids left
local function end_sandbox(root)
  local left = wait_gone(root, 500)
  if #left > 0 then
    local argv = { "/bin/sh", "-c", 'kill -KILL "$@" 2>/dev/null; exit 0', "sh" }
    for _, pid in ipairs(left) do argv[#argv + 1] = tostring(pid) end
    run(argv, driver.COMMAND_TIMEOUT_MS)
    left = wait_gone(root, 2000)
  end
  return left
end

-- The cheap half of the probe: runsc answers --version.
local function probe_version(runsc)
  local code, out, err = run({ runsc, "--version" }, driver.COMMAND_TIMEOUT_MS)
  if code ~= 0 or not out:find("runsc version", 1, true) then
    return nil, string.format("%s --version failed (%s): %s", runsc,
      err or ("exit " .. tostring(code)), last_lines(out))
  end
  return true
end

-- The real half: a trivial container, run the way instances are, proves
-- the ptrace platform, the gofer and the bundle format work on this host.
local function probe_run(runsc)
  local dir
  for _ = 1, 10 do
    starts = starts + 1
    local cand = string.format("%s/tenement-runsc-probe-%d-%d-%d", tmpdir(),
      core.proc.getpid(), starts, math.random(0, 0x7fffffff))
    if core.fs.mkdir(cand, 448, false) then dir = cand break end
  end
  if not dir then return nil, "cannot create a probe directory in " .. tmpdir() end
  local config = oci.config { args = { "/bin/true" }, env = { "PATH=/usr/bin:/bin" }, hostname = "tenement-probe" }
  local ok, werr = oci.write(dir, config)
  if not ok then core.fs.rmtree(dir) return nil, werr end
  local argv = { runsc, "--root", dir .. "/state" }
  for _, f in ipairs(driver.FLAGS) do argv[#argv + 1] = f end
  for _, a in ipairs { "run", "--bundle", dir, "probe" } do argv[#argv + 1] = a end
  local code, out, err = run(argv, driver.PROBE_TIMEOUT_MS)
  -- a probe that timed out was SIGKILLed; its sandbox dies with it, or here
  if code ~= 0 then end_sandbox(dir .. "/state") end
  core.fs.rmtree(dir)
  if code ~= 0 then
    return nil, string.format("%s could not run a trivial sandbox (%s): %s", runsc,
      err == "timeout" and string.format("no exit within %g s", driver.PROBE_TIMEOUT_MS / 1000) or
        err or ("exit " .. tostring(code)), last_lines(out))
  end
  return true
end

local function probe()
  local runsc, where = driver.locate()
  if not runsc then
    return { reason = string.format("runsc (gVisor) was not found in %s: %s", where, FIX) }
  end
  local ok, err = probe_version(runsc)
  if ok then ok, err = probe_run(runsc) end
  if not ok then
    return { reason = err .. ". Fix: allow ptrace (no seccomp filter or container policy may deny " ..
      "it to ten), or " .. FIX }
  end
  return { runsc = runsc }
end

-- available() -> true | nil, reason. Probes once (about half a second: one
-- trivial sandbox) and remembers the answer.
function driver.available()
  if not probed then
    if probing and core.current() then
      probing:wait()
    else
      local sync = core.current() and require "tenement.sync"
      probing = sync and sync.event()
      -- a probe that raised must still release the tasks waiting for it
      local done, result = pcall(probe)
      if not done then result = { reason = "probing runsc failed: " .. tostring(result) } end
      probed = result
      local ev = probing
      probing = nil
      if ev then ev:set(true) end
    end
  end
  if probed.reason then return nil, probed.reason end
  return true
end

-- For specs: forget the probe, or force its outcome ({ runsc = path } or
-- { reason = "..." }).
function driver.reset(state) probed = state end

---------------------------------------------------------------------------

local function dirname(p) return p:match("^(.*)/[^/]*$") or "." end

local function absolute(p, base)
  if p:sub(1, 1) == "/" then return p end
  return (base or core.fs.cwd()) .. "/" .. p
end

local function normalize(p)
  local segs = {}
  for seg in p:gmatch("[^/]+") do
    if seg == ".." then segs[#segs] = nil
    elseif seg ~= "." then segs[#segs + 1] = seg end
  end
  return "/" .. table.concat(segs, "/")
end

local function hostname(name, id)
  local h = tostring(name) .. "-" .. tostring(id)
  if #h > HOSTNAME_MAX then h = h:sub(1, HOSTNAME_MAX) end
  return h
end

-- A host path the app needs that a tmpfs would hide, and that no bind
-- already covers, gets a read-only bind of its own.
local function expose(binds, hide, path)
  for _, b in ipairs(binds) do
    if oci.under(path, b.path) then return end
  end
  for _, h in ipairs(hide) do
    -- the hidden directory itself exists (an empty tmpfs): nothing to bind
    if oci.under(path, h) and path ~= h then
      binds[#binds + 1] = { path = path, rw = false }
      return
    end
  end
end

-- prepare(instance) -> spec for core.proc.spawn | nil, err
--   instance: { argv, env (list of "K=V"), cwd, stdout_fd, stderr_fd,
--     service (its config: name, ...), id,
--     vars = { name, id, data_dir, instance_dir, socket } }
-- No I/O (once available() has probed). Records the plan in
-- instance.sandbox = { runsc, dir, root, cid, config }, which setup, stop
-- and cleanup read: the supervisor passes them the same table.
function driver.prepare(instance)
  if not probed then
    local ok, err = driver.available()
    if not ok then return nil, err end
  end
  if probed.reason then return nil, probed.reason end
  local vars = instance.vars
  if type(vars) ~= "table" or type(vars.instance_dir) ~= "string" or type(vars.socket) ~= "string"
      or type(vars.data_dir) ~= "string" then
    return nil, "sandbox isolation needs the instance's data_dir, instance_dir and socket (instance.vars)"
  end
  if type(instance.argv) ~= "table" or type(instance.argv[1]) ~= "string" then
    return nil, "sandbox isolation needs the instance's argv"
  end
  local here = core.fs.cwd()
  local data_dir = normalize(absolute(vars.data_dir, here))
  local inst_dir = normalize(absolute(vars.instance_dir, here))
  local sock_dir = normalize(dirname(absolute(vars.socket, here)))
  if sock_dir == "/" or oci.under(data_dir, sock_dir) then
    return nil, string.format("the socket %s is in %s, which holds the data directory %s: bound into the " ..
      "sandbox read-write, it would give the app every instance's data; put sockets elsewhere " ..
      "(socket = \"/tmp/tenement/{name}-{id}.sock\")", vars.socket, sock_dir, data_dir)
  end
  local cwd = normalize(absolute(instance.cwd or here, here))

  local hide = { "/tmp" }
  if data_dir ~= "/" then hide[#hide + 1] = data_dir end
  local binds = { { path = sock_dir, rw = true }, { path = inst_dir, rw = true } }
  expose(binds, hide, cwd)
  local cmd = instance.argv[1]
  if cmd:find("/", 1, true) then expose(binds, hide, dirname(normalize(absolute(cmd, cwd)))) end

  local svc = instance.service or {}
  local name = svc.name or vars.name or "instance"
  local id = instance.id or vars.id or "0"
  starts = starts + 1
  -- gVisor adds HOME=/root to an environment without HOME; env(1) takes it
  -- out again, so the app gets exactly the environment it was given
  local args = instance.argv
  local env = instance.env or {}
  local has_home = false
  for _, kv in ipairs(env) do
    if kv:sub(1, 5) == "HOME=" then has_home = true break end
  end
  -- (a command with "=" in its name would read as an assignment to env)
  if not has_home and not instance.argv[1]:find("=", 1, true) then
    args = { ENV, "-u", "HOME", "--" }
    for i, a in ipairs(instance.argv) do args[4 + i] = a end
  end
  -- what the supervisor computed is well formed; a NUL byte from a config
  -- value is not, and becomes this start's error rather than a crash
  -- the service's user and limits, as at the other levels. Without a user,
  -- not root: the host's root file system is the sandbox's, and root in
  -- there owns /etc/shadow, root's keys and every 0600 file root wrote
  local user = instance.user or driver.DEFAULT_USER
  local rlimits
  if instance.rlimits and next(instance.rlimits) then
    rlimits = {}
    for k, v in pairs(oci.DEFAULT_RLIMITS) do rlimits[k] = v end
    if instance.rlimits.nofile then rlimits.NOFILE = { instance.rlimits.nofile, instance.rlimits.nofile } end
    if instance.rlimits.nproc then rlimits.NPROC = { instance.rlimits.nproc, instance.rlimits.nproc } end
  end
  local made, config = pcall(oci.config, {
    args = args, env = env, cwd = cwd, hostname = hostname(name, id), binds = binds, hide = hide,
    uid = user.uid, gid = user.gid, additional_gids = {},
    -- a user other than root holds no capabilities, as when it execs elsewhere
    caps = user.uid ~= 0 and {} or nil, rlimits = rlimits,
  })
  if not made then return nil, "sandbox bundle: " .. tostring(config):gsub("^oci: ", "") end
  -- unique per start, so no state a crashed start left can block this one
  local cid = string.format("%s-%s-%x%x", name, id, math.floor(core.time()), starts)
  local sandbox = {
    runsc = probed.runsc,
    -- a directory per start: a rollout runs the new start beside the old
    -- one, and each must keep its own bundle and runsc state until it ends
    dir = inst_dir .. ".sandbox/" .. cid,
    cid = cid,
    config = config,
    -- the supervisor hands the instance directory to a service's user;
    -- to the sandbox's own, this driver does
    owner = not instance.user and user or nil,
    inst_dir = inst_dir,
  }
  sandbox.root = sandbox.dir .. "/state"
  instance.sandbox = sandbox

  local argv = { sandbox.runsc, "--root", sandbox.root }
  for _, f in ipairs(driver.FLAGS) do argv[#argv + 1] = f end
  for _, a in ipairs { "run", "--bundle", sandbox.dir, sandbox.cid } do argv[#argv + 1] = a end
  return {
    argv = argv,
    -- runsc needs none of the app's environment (that is in config.json)
    env = { "PATH=" .. RUNSC_PATH },
    cwd = "/",
    stdin = "null",
    stdout = instance.stdout_fd,
    stderr = instance.stderr_fd,
    pdeathsig = "SIGKILL",
  }
end

local function plan(instance)
  local s = type(instance) == "table" and instance.sandbox
  if type(s) ~= "table" then error("sandbox: no plan in instance.sandbox: call prepare(instance) first", 3) end
  return s
end

-- setup(instance) -> true | nil, err. Writes the bundle into a fresh
-- {instance_dir}.sandbox/{cid}/ (ids hold no ".", so it never meets an
-- instance's directory). What a crashed start left beside it goes first: a
-- directory no runsc process names any more. One that still runs is the
-- start a rollout replaces, and stays.
function driver.setup(instance)
  local s = plan(instance)
  local parent = s.dir:match("^(.*)/[^/]+$")
  local ok, err = core.fs.mkdir(parent, 448)
  if not ok then return nil, err end
  for _, name in ipairs(core.fs.readdir(parent) or {}) do
    local old = parent .. "/" .. name
    if #runsc_processes(old .. "/state") == 0 then
      ok, err = core.fs.rmtree(old)
      if not ok then return nil, err end
    end
  end
  ok, err = core.fs.mkdir(s.dir, 448)
  if not ok then return nil, err end
  ok, err = core.fs.mkdir(s.root, 448, false)
  if not ok then return nil, err end
  if s.owner then
    ok, err = core.fs.chown(s.inst_dir, s.owner.uid, s.owner.gid)
    if not ok then return nil, err end
  end
  for _, m in ipairs(s.config.mounts) do
    if m.type == "bind" then
      local st = core.fs.stat(m.source)
      if not st then
        return nil, string.format("%s does not exist on the host, and the sandbox binds it (%s)", m.source,
          m.options[2] == "rw" and "read-write" or "read-only")
      end
    end
  end
  return oci.write(s.dir, s.config)
end

-- stop(instance, proc) -> true | nil, err: sends SIGTERM to the app inside
-- the sandbox. The supervisor waits for proc as usual, and SIGKILLs its
-- process group after stop_timeout; on nil it sends the group SIGTERM
-- itself (which ends runsc, and the sandbox with it, at once).
function driver.stop(instance, proc, signal)
  local s = plan(instance)
  if proc and proc:status() ~= "running" then return true end
  local code, out, err = run({ s.runsc, "--root", s.root, "kill", s.cid, signal or "SIGTERM" },
    driver.COMMAND_TIMEOUT_MS)
  if code ~= 0 then
    return nil, string.format("runsc kill %s: %s", s.cid, err or last_lines(out))
  end
  return true
end

-- cleanup(instance) -> true | nil, err. After runsc exited. A runsc that
-- ended normally has removed its state; one killed by a signal leaves it,
-- but its gofer and sandbox die with it (parent-death signals), so the
-- directory can simply go. Should a process of this sandbox still live
-- (cleanup called while runsc runs), it is SIGKILLed by pid: `runsc delete
-- --force` would take 5 s to give up waiting for a gofer that is not its
-- child. Idempotent.
function driver.cleanup(instance)
  local s = type(instance) == "table" and instance.sandbox
  if type(s) ~= "table" then return true end
  local err
  local left = end_sandbox(s.root)
  if #left > 0 then
    err = string.format("sandbox %s: still running after SIGKILL: pid %s", s.cid, table.concat(left, ", "))
  end
  local ok, rmerr = core.fs.rmtree(s.dir)
  if not ok then err = (err and err .. "; " or "") .. rmerr end
  -- the last start of the instance takes the directory of starts with it
  local parent = s.dir:match("^(.*)/[^/]+$")
  local rest = core.fs.readdir(parent)
  if rest and #rest == 0 then core.fs.rmtree(parent) end
  if err then return nil, err end
  return true
end

return driver
