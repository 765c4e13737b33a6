-- Isolation level "namespace" (the default): the app runs in its own PID,
-- mount, IPC and UTS namespaces, with a /proc of its own that shows only its
-- processes, and the hostname "<service>-<id>". PID 1 there is tenement's
-- init (c/init.c built alone: a small static binary embedded in ten, run
-- from a sealed memfd, core.proc.init_fd), which forwards signals to the app
-- (PID 2), reaps orphans, kills what the app leaves behind and exits with
-- the app's status. As PID 1 it cannot die of the app's signal, so it exits
-- 128 + n and hands the app's own wait status to core.proc through a pipe
-- (spec.status_pipe): the exit reads "killed by SIGKILL", not code 137.
--
-- network = "isolated" adds a network namespace with only loopback up: the
-- app is reached solely through its Unix socket (a path in the file system,
-- which crosses network namespaces). Run as root, the server keeps a few
-- such namespaces made ahead (by a thread, core.proc.netns_new) and the app
-- joins one: making it inside the spawn took a millisecond or two, with the
-- whole server waiting. In a user namespace the app makes its own, as one
-- made outside could not be joined from there.
--
-- When the server may create namespaces (root), it does so directly;
-- otherwise inside a new user namespace where the server's uid and gid are
-- mapped to root: files stay the server's, and no privilege is gained.
--
-- filesystem = "private" walls the file system off (driver.wall): the app's
-- / is a read-only tmpfs holding the system's programs and libraries and
-- /etc read-only (password hashes, TLS keys and ten's config file masked),
-- devices of its own, a /tmp of its own, its instance directory and socket
-- directory writable, its workdir and command read-only, what `mounts`
-- names, and nothing else of the host: not data_dir, not other instances,
-- not /home, /root, /var or /sys.
--
-- What it is not: a wall against a hostile app. The app runs as the server's
-- user; run as root, it keeps root's power over the host (it could unmount
-- its /proc and look at the host's). The file system, unless private, and,
-- by default, the network are the host's. Use "sandbox" for untrusted code.
local core = require "tenement.core"

local driver = { name = "namespace" }

local BASE_FLAGS = { "newpid", "newns", "newipc", "newuts" }
-- What the init forwards, blocked from its exec on: to PID 1 of a namespace
-- a signal it has not blocked yet is dropped (a stop just after a start
-- then waited for the SIGKILL), while a blocked one waits for it.
local INIT_SIGMASK = { "SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2" }
local HOSTNAME_MAX = 64

-- The result of the one probe: { userns = bool } or { reason = "..." }.
local probed

-- The init's argv: its name, the fd spec.status_pipe gives it, then the
-- app's command line.
local function init_argv(app)
  local argv = { "tenement-init", "--status-fd", "3", "--" }
  for i, a in ipairs(app) do argv[4 + i] = a end
  return argv
end

-- A real start of the init in the namespaces: it proves the namespace steps
-- (each names its stage when it fails) and that the init's memfd may be run.
local function spawn_probe(init, userns)
  local flags = { table.unpack(BASE_FLAGS) }
  if userns then flags[#flags + 1] = "newuser" end
  local p, err, code = core.proc.spawn {
    argv = init_argv { "/bin/true" }, exec_fd = init, status_pipe = true, env = {}, stdin = "null", stdout = "null",
    stderr = "null", clone_flags = flags, mount_proc = true, hostname = "tenement-probe",
  }
  if not p then return nil, err, code end
  if core.current() then p:wait(2000) end
  p:close()
  return true
end

local function why_not(err_direct, err_userns, code)
  local fix
  if err_userns and err_userns:find("mount proc on /proc", 1, true) then
    fix = "parts of this host's /proc are covered (containers mask some of its files), and then only a " ..
      "privileged process may mount a new /proc: run ten as root with CAP_SYS_ADMIN (docker run --privileged)"
  elseif code == "EPERM" or code == "EACCES" then
    fix = "run ten as root, or allow unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1 " ..
      "on Debian; sysctl kernel.apparmor_restrict_unprivileged_userns=0 on Ubuntu 23.10+); inside a " ..
      "container, give it CAP_SYS_ADMIN and an unmasked /proc (docker run --privileged)"
  elseif code == "ENOSPC" then
    fix = "user namespaces are limited to 0 or used up: raise sysctl user.max_user_namespaces"
  elseif code == "EINVAL" then
    fix = "this kernel lacks PID, mount, IPC, UTS or user namespaces (CONFIG_NAMESPACES)"
  else
    fix = "see the error above"
  end
  return string.format("cannot create the namespaces: %s; in a user namespace: %s. Fix: %s, " ..
    'or set isolation = "process" for the service', err_direct, err_userns or "not tried", fix)
end

-- available() -> true | nil, reason. Probes once with a real start of the
-- init (about a millisecond), first directly, then in a user namespace;
-- remembers which.
function driver.available()
  if not probed then
    local init, err = core.proc.init_fd()
    local ok
    if init then ok, err = spawn_probe(init, false) end
    if ok then
      probed = { userns = false }
    elseif not init or err:find(": exec: ", 1, true) then
      -- every namespace step ran before exec: only the init could not
      probed = { reason = string.format("cannot run the init of namespaced instances from memory: %s. Fix: " ..
        "allow ten executable memfds (sysctl vm.memfd_noexec = 0 or 1, and any security module that " ..
        'forbids them), or set isolation = "process" for the service', err) }
    else
      local uok, uerr, ucode = spawn_probe(init, true)
      if uok then probed = { userns = true }
      else probed = { reason = why_not(err, uerr, ucode) } end
    end
  end
  if probed.reason then return nil, probed.reason end
  return true
end

-- Network namespaces made ahead. Each is used once (an app's namespace is
-- its own), so the pool refills itself after every take; until the first is
-- made, and for a while after making one failed (out of fds, memory or
-- namespaces: a burst passes), a spawn makes its own as before.
local NETNS_AHEAD = 2
local NETNS_RETRY_MS = 30000
local netns = { ready = {}, filling = false, failed_at = nil }
driver.netns = netns

-- For specs: forget the probe, or force its outcome ({ userns = bool }),
-- and let go of the namespaces made ahead.
function driver.reset(state)
  probed = state
  for _, fd in ipairs(netns.ready) do core.fs.close_fd(fd) end
  netns.ready, netns.failed_at = {}, nil
end

local function fill_netns()
  if netns.filling then return end
  if netns.failed_at and core.now() - netns.failed_at < NETNS_RETRY_MS then return end
  netns.filling = true
  core.spawn(function()
    local _ <close> = setmetatable({}, { __close = function() netns.filling = false end })
    while #netns.ready < NETNS_AHEAD do
      local fd, err = core.proc.netns_new()
      if not fd then
        if not netns.failed_at then
          require("tenement.log").warn("network namespaces are made inside each spawn for now: %s", err)
        end
        netns.failed_at = core.now()
        return
      end
      netns.failed_at = nil
      netns.ready[#netns.ready + 1] = fd
    end
  end)
end

-- -> fd of a fresh network namespace (the spawn closes it) | nil. Only
-- inside a task (the server's starts): what prepares a spec outside one
-- makes no namespace to be spawned later.
local function take_netns()
  if not core.current() then return nil end
  local fd = table.remove(netns.ready)
  fill_netns()
  return fd
end

local function hostname(service, id)
  local name = tostring(service) .. "-" .. tostring(id)
  if #name > HOSTNAME_MAX then name = name:sub(1, HOSTNAME_MAX) end
  return name
end

-- The host's system directories the app gets read-only: a symlink (Debian's
-- merged /usr makes /bin one) is made again inside.
local SYSTEM_DIRS = { "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc" }
-- Read by root only on the host, and of no use to an app: each covered by
-- an empty file (a directory by an empty tmpfs).
local SECRET_FILES = { "/etc/shadow", "/etc/shadow-", "/etc/gshadow", "/etc/gshadow-", "/etc/sudoers" }
local SECRET_DIRS = { "/etc/ssl/private", "/etc/sudoers.d" }
local DEVICES = { "null", "zero", "full", "random", "urandom", "tty" }
-- What no instance gets whole: the root, and directories the host's users
-- and services share.
local SHARED_DIRS = {}
for _, d in ipairs { "/", "/tmp", "/var", "/var/tmp", "/var/lib", "/var/run", "/run", "/home", "/root", "/etc",
  "/usr", "/srv", "/opt", "/mnt", "/media", "/boot", "/proc", "/sys", "/dev" } do SHARED_DIRS[d] = true end

-- Whether path is dir or lies under it (as tenement.oci.under, which this
-- driver does not load: oci needs cjson, and the driver runs without it).
local function under(path, dir)
  return path == dir or (path:sub(1, #dir + 1) == dir .. "/") or dir == "/"
end

-- driver.wall(instance) -> spec.root for core.proc.spawn | nil, err
--   instance: { argv, cwd, vars (data_dir, instance_dir, socket), service
--               (mounts = { "PATH" | "PATH:rw" }), config_file }
function driver.wall(instance)
  local fs = core.fs
  local vars, svc = instance.vars or {}, instance.service or {}
  local data_dir = fs.realpath(vars.data_dir) or vars.data_dir
  local dir = data_dir .. "/.root"
  local ok, err = fs.mkdir(dir, tonumber("700", 8))
  if not ok then return nil, "file system wall: " .. err end
  local real_instance = fs.realpath(vars.instance_dir) or vars.instance_dir
  local mounts, bound = {}, {}
  local function add(op) mounts[#mounts + 1] = op end
  local function visible(path)
    for _, d in ipairs(bound) do if under(path, d) then return true end end
  end
  for _, path in ipairs(SYSTEM_DIRS) do
    local st = fs.stat(path, false)
    if st and st.type == "link" then
      local target = fs.realpath(path)
      if target then add { "symlink", target, path } end
    elseif st and st.type == "directory" then
      add { "bind", path, path, ro = true }
      bound[#bound + 1] = path
    end
  end
  -- /etc/resolv.conf is often a link into /run, which is not there
  local resolv = fs.stat("/etc/resolv.conf", false)
  if resolv and resolv.type == "link" then
    local target = fs.realpath("/etc/resolv.conf")
    if target and not visible(target) then add { "bind", target, target, ro = true, file = true } end
  end
  add { "tmpfs", "/dev", "mode=0755,size=64k" }
  for _, name in ipairs(DEVICES) do
    if fs.stat("/dev/" .. name) then add { "bind", "/dev/" .. name, "/dev/" .. name, file = true } end
  end
  add { "tmpfs", "/dev/shm", "mode=1777" }
  for i, name in ipairs { "stdin", "stdout", "stderr" } do add { "symlink", "/proc/self/fd/" .. (i - 1), "/dev/" .. name } end
  add { "symlink", "/proc/self/fd", "/dev/fd" }
  -- writes there are the app's memory: charged to its memory cgroup
  add { "tmpfs", "/tmp", "mode=1777" }
  add { "tmpfs", "/var/tmp", "mode=1777" }
  -- the instance's own paths, then what the file adds; a parent before
  -- what lies under it
  local own = {
    { vars.instance_dir, rw = true, role = "the instance directory" },
    { vars.socket and vars.socket:match("^(.*)/[^/]*$"), rw = true, role = "the socket's directory" },
    { instance.cwd, role = "the workdir" },
    { instance.argv and instance.argv[1]:match("^(/.*)/[^/]*$"), role = "the command's directory" },
  }
  for _, m in ipairs(svc.mounts or {}) do
    local path, mode = m:match("^(.-):(r[ow])$")
    own[#own + 1] = { path or m, rw = mode == "rw", role = "named in mounts" }
  end
  -- the writable ones first: a read-only path one of them holds already
  -- (workdir = "{instance_dir}") needs no bind, and one over it made the
  -- app's own directory read-only
  table.sort(own, function(a, b) return (a.rw and 1 or 0) > (b.rw and 1 or 0) end)
  local binds = {}
  for _, b in ipairs(own) do
    local path = b[1]
    if path and path ~= "" then
      -- the operator's links resolved (a /srv that links elsewhere), not
      -- those below the instance directory: the app made those, and the
      -- spawn refuses a link on the way of any bind (ELOOP)
      local real = under(path, vars.instance_dir) and (real_instance .. path:sub(#vars.instance_dir + 1))
        or fs.realpath(path)
      if not real then
        return nil, string.format("file system wall: %s, %s, is not there: filesystem = \"private\" binds it into "
          .. "the app's file system", path, b.role), true
      end
      -- a directory that holds more than the app's own: the whole of a
      -- shared one, data_dir with the store and every instance, the
      -- service's directory with its other instances, or another part of
      -- data_dir (but a socket directory there, which holds sockets)
      local mine = under(real, real_instance)
      local what = SHARED_DIRS[real] and ("the host's " .. real)
        or (under(data_dir, real) and "data_dir (the store, every instance)")
        or (under(real_instance, real) and not mine and "the directories of the service's other instances")
        or (under(real, data_dir) and not mine and b.role ~= "the socket's directory" and "a part of data_dir")
      if what then
        return nil, string.format("file system wall: %s, %s, would bring %s into the app%s: give it a directory "
          .. "of its own%s", path, b.role, what, b.rw and ", writable" or "", b.role == "the socket's directory"
          and ' (socket = "/run/tenement/{name}-{id}/app.sock")' or ""), true
      end
      -- (one a system directory or a writable bind holds already, read-only,
      -- needs no bind)
      if b.rw or not visible(real) then
        local st = fs.stat(real)
        binds[#binds + 1] = { path = real, rw = b.rw, file = st and st.type ~= "directory" }
        bound[#bound + 1] = real
      end
    end
  end
  table.sort(binds, function(a, b) return #a.path < #b.path end)
  for _, b in ipairs(binds) do add { "bind", b.path, b.path, ro = not b.rw, file = b.file } end
  -- last, over whatever brought them in: ten's own file (the environment
  -- it sets may hold secrets) wherever it lies, and root's secrets
  local secrets = { table.unpack(SECRET_FILES) }
  if instance.config_file then secrets[#secrets + 1] = fs.realpath(instance.config_file) or instance.config_file end
  for _, path in ipairs(secrets) do
    local st = fs.stat(path)
    if st and st.type == "file" and visible(path) then add { "bind", "/dev/null", path, file = true } end
  end
  for _, path in ipairs(SECRET_DIRS) do
    local st = fs.stat(path)
    if st and st.type == "directory" and visible(path) then add { "tmpfs", path, "mode=0700,size=4k" } end
  end
  return { dir = dir, mounts = mounts }
end

-- prepare(instance) -> spec for core.proc.spawn | nil, err
--   instance: { argv, env (list of "K=V"), cwd, stdout_fd, stderr_fd,
--               service (its config: name, network, ...), id, vars }
function driver.prepare(instance)
  local ok, err = driver.available()
  if not ok then return nil, err end
  -- made by the probe, and kept open by the core from then on
  local init, ierr = core.proc.init_fd()
  if not init then return nil, ierr end
  local svc = instance.service or {}
  local network = svc.network or "host"
  if network ~= "host" and network ~= "isolated" then
    return nil, string.format('network = %q: expected "host" or "isolated"', tostring(network))
  end

  local flags = { table.unpack(BASE_FLAGS) }
  local netns_fd = network == "isolated" and not probed.userns and take_netns() or nil
  if network == "isolated" and not netns_fd then flags[#flags + 1] = "newnet" end
  if probed.userns then flags[#flags + 1] = "newuser" end
  local name = svc.name or (instance.vars and instance.vars.name) or "instance"
  local root, cwd = nil, instance.cwd
  if svc.filesystem == "private" then
    local werr, lasting
    root, werr, lasting = driver.wall(instance)
    if not root then return nil, werr, lasting end
    -- the host's working directory of ten is not there
    cwd = cwd or instance.vars.instance_dir
  end
  return require("tenement.runtime").credentials(instance, {
    argv = init_argv(instance.argv),
    exec_fd = init,
    status_pipe = true,
    sigmask = INIT_SIGMASK,
    env = instance.env,
    cwd = cwd,
    stdin = "null",
    stdout = instance.stdout_fd,
    stderr = instance.stderr_fd,
    pdeathsig = "SIGKILL",
    clone_flags = flags,
    mount_proc = true,
    root = root,
    hostname = hostname(name, instance.id),
    loopback = (network == "isolated" and not netns_fd) or nil,
    netns_fd = netns_fd,
  })
end

return driver
