-- The keeper: a tiny process `ten serve` starts beside itself, which
-- outlives it only to clean up. Instances under process isolation have no
-- PID namespace that dies with ten, and what they fork (or what daemonises
-- with setsid) is not reached by a parent-death signal, so if ten is killed
-- outright (SIGKILL, OOM killer) their grandchildren would live on. When
-- ten goes, however it goes, the keeper SIGKILLs everything left in the
-- server's instance cgroups at once; the next start removes the empty
-- cgroups (cgroup.cleanup_stale), as it always did.
--
-- The keeper holds the server's lock file (handed over as its stdin), so a
-- new `ten serve` on the same data directory waits until the cleanup is
-- over before it starts instances the cleanup could take for leftovers.
local core = require "tenement.core"
local cgroup = require "tenement.cgroup"
local log = require "tenement.log"

local keeper = {}

local LOCK_WAIT_MS = 10000

-- keeper.running_server(pid_file) -> pid | nil: a server still running by
-- the pid file it wrote (its control socket may be gone, or not answer)
function keeper.running_server(pid_file)
  local pid = tonumber((core.fs.read(pid_file) or ""):match("^(%d+)"))
  if not pid or pid == core.proc.getpid() then return nil end
  local comm = core.fs.read("/proc/" .. pid .. "/comm")
  return comm and comm:match("^ten") and pid or nil
end

-- The lock file of a data directory, taken once the keeper of a previous
-- server there is done. In a task. pid_file: where the server holding it
-- wrote its pid. -> fd | nil, err
function keeper.lock(data_dir, pid_file)
  local path = data_dir .. "/keeper.lock"
  local deadline = core.now() + LOCK_WAIT_MS
  local said = false
  while true do
    local fd, err, code = core.fs.lock(path)
    if fd then return fd end
    if code ~= "EAGAIN" then return nil, err end
    -- held by a server that still runs, not by the cleanup after one
    local pid = pid_file and keeper.running_server(pid_file)
    if pid then
      return nil, string.format("another ten serve (pid %d) is running with data_dir %s, though its control socket "
        .. "%s/ten.sock does not answer (removed, or the server is stopped): stop it first (kill %d)",
        pid, data_dir, data_dir, pid)
    end
    if core.now() > deadline then
      return nil, string.format("%s is still held after %d s: is another ten serve using %s?",
        path, LOCK_WAIT_MS // 1000, data_dir)
    end
    if not said then
      log.info("waiting for the cleanup after the previous server on %s", data_dir)
      said = true
    end
    core.sleep(20)
  end
end

-- keeper.start(layout, lock_fd) -> proc | nil, err: from ten serve, once
-- the instance cgroups of layout (cgroup.detect) are known. The keeper is
-- the small static init binary in its keeper mode (c/init.c), run from the
-- same sealed memfd as namespaced instances' PID 1.
function keeper.start(layout, lock_fd)
  local dirs = cgroup.bases(layout)
  if #dirs == 0 then return nil, "no instance cgroups to watch" end
  local init, err = core.proc.init_fd()
  if not init then return nil, err end
  local argv = { "tenement-keeper", "--keep", tostring(core.proc.getpid()) }
  for _, d in ipairs(dirs) do argv[#argv + 1] = d end
  return core.proc.spawn {
    argv = argv, exec_fd = init, env = {},
    stdin = lock_fd, stdout = "null", stderr = "inherit",
    -- out of the terminal's process group: a Ctrl-C is for ten, which
    -- stops its instances itself, and the keeper goes when it has gone
    setsid = true,
    pdeathsig = "SIGTERM",
    -- blocked from exec on, as the keeper keeps them: one that came before
    -- its main() blocked them (ten killed just after starting it) would
    -- kill it instead of waking it to clean up
    sigmask = { "SIGTERM", "SIGINT", "SIGHUP" },
  }
end

return keeper
