-- core.proc: spawning, watching, signalling and talking to child processes,
-- against real processes of this machine.
local core = require "tenement.core"
local proc = core.proc
local fs = core.fs

local PATH = "/usr/local/bin:/usr/bin:/bin"

-- Everything the pipe gives until end of file.
local function read_all(pipe, timeout)
  local parts = {}
  while true do
    local chunk, err = pipe:read(timeout or 5000)
    if chunk == nil then
      assert(err == nil, err)
      return table.concat(parts)
    end
    parts[#parts + 1] = chunk
  end
end

-- The output of one short command, and its status.
local function run(spec)
  local p = assert(proc.spawn(spec))
  local out = read_all(p.stdout)
  return out, p:wait(5000)
end

local function lines(s)
  local t = {}
  for l in s:gmatch("[^\n]+") do t[#t + 1] = l end
  table.sort(t)
  return t
end

local function tmpdir()
  local base = os.getenv("TMPDIR") or "/tmp"
  local name = string.format("%s/tn-proc-%d-%d", base, proc.getpid(), math.random(1, 1e9))
  assert(fs.mkdir(name, 448))
  return name
end

local function proc_stat(pid)
  local f = io.open("/proc/" .. pid .. "/stat")
  if not f then return nil end
  local s = f:read("a")
  f:close()
  -- fields after the command name: state ppid pgrp session ...
  local rest = s:match("%) (.*)$")
  local fields = {}
  for w in rest:gmatch("%S+") do fields[#fields + 1] = w end
  return { state = fields[1], ppid = tonumber(fields[2]), pgrp = tonumber(fields[3]),
           session = tonumber(fields[4]), start = fields[20] }
end

-- Gone for good (reaped): no process with this pid and start time remains,
-- not even a zombie (unless zombie_ok: a process that is not our child is
-- reaped by whoever adopted it). There is no event to wait for once the
-- handle is dropped or the process is not ours, so poll with a deadline.
local function wait_reaped(pid, start, zombie_ok)
  local deadline = core.now() + 5000
  while core.now() < deadline do
    local st = proc_stat(pid)
    if not st or st.start ~= start or (zombie_ok and st.state == "Z") then return true end
    core.sleep(5)
  end
  local st = proc_stat(pid)
  return false, "pid " .. pid .. " still there in state " .. (st and st.state or "?")
end

-- Let the given tasks run until each waits in an operation.
local function until_waiting(...)
  for _, t in ipairs { ... } do
    for _ = 1, 1000 do
      if t:status() == "waiting" then break end
      coroutine.yield()
    end
    assert(t:status() == "waiting", "task did not reach its wait")
  end
end

-- Open fds once handles of earlier specs were collected and closed.
local function fd_count()
  collectgarbage()
  collectgarbage()
  core.sleep(1) -- close callbacks run on the next loop turn
  return #assert(fs.readdir("/proc/self/fd"))
end

local function is_root()
  local f = assert(io.open("/proc/self/status"))
  local s = f:read("a")
  f:close()
  return s:match("\nUid:%s+(%d+)") == "0"
end

-- The fd number behind a Lua file opened on path (Lua does not expose it).
local function fd_of(path)
  local want = assert(fs.realpath(path))
  for _, n in ipairs(assert(fs.readdir("/proc/self/fd"))) do
    if fs.realpath("/proc/self/fd/" .. n) == want then return tonumber(n) end
  end
  error("no fd open on " .. path)
end

describe("core.proc", function()
  local dir
  before_each(function() dir = tmpdir() end)
  after_each(function() fs.rmtree(dir) end)

  describe("spawn", function()
    it("runs /bin/echo and reads its output", function()
      core.run(function()
        local p = assert(proc.spawn { argv = { "/bin/echo", "hello", "world" } })
        assert.is_number(p.pid)
        assert.is_true(p.pid > 0)
        assert.are.equal("hello world\n", read_all(p.stdout))
        assert.are.same({ code = 0, core_dumped = false }, p:wait())
      end)
    end)

    it("finds a bare name along the default PATH, or spec.env.PATH", function()
      core.run(function()
        assert.are.equal("x\n", (run { argv = { "echo", "x" } }))
        local bin = dir .. "/bin"
        assert(fs.mkdir(bin))
        assert(fs.write(bin .. "/hi", "#!/bin/sh\necho hi from $0\n", 493))
        local out = run { argv = { "hi" }, env = { PATH = "/nonexistent:" .. bin } }
        assert.are.equal("hi from " .. bin .. "/hi\n", out)
      end)
    end)

    it("gives exactly the environment asked for, in both forms, and nothing else", function()
      core.run(function()
        local out = run { argv = { "/usr/bin/env" }, env = { A = "1", "B=2", C = 3 } }
        assert.are.same({ "A=1", "B=2", "C=3" }, lines(out))
        assert.are.equal("", (run { argv = { "/usr/bin/env" } }))
      end)
    end)

    it("proc.environ() is the server's own environment", function()
      local env = proc.environ()
      assert.are.equal(os.getenv("PATH"), env.PATH)
      for k, v in pairs(env) do assert.are.equal(os.getenv(k), v) end
    end)

    it("runs in spec.cwd", function()
      core.run(function()
        local out = run { argv = { "/bin/pwd" }, cwd = dir }
        assert.are.equal(assert(fs.realpath(dir)) .. "\n", out)
      end)
    end)

    it("reports a missing binary with its path and ENOENT", function()
      local p, err, code = proc.spawn { argv = { dir .. "/nope" } }
      assert.is_nil(p)
      assert.are.equal("spawn " .. dir .. "/nope: exec: ENOENT: no such file or directory", err)
      assert.are.equal("ENOENT", code)

      p, err, code = proc.spawn { argv = { "no-such-program-here" }, env = { PATH = "/bin" } }
      assert.is_nil(p)
      assert.matches("spawn no-such-program-here: exec: ENOENT", err, 1, true)
      assert.matches("not found in PATH /bin", err, 1, true)
      assert.are.equal("ENOENT", code)
    end)

    it("tells a missing interpreter from a missing program: the file is there, what it names is not", function()
      assert(fs.write(dir .. "/script", "#!/no/such/interp -x\necho hi\n", 493))
      local p, err, code = proc.spawn { argv = { dir .. "/script" } }
      assert.is_nil(p)
      assert.are.equal("spawn " .. dir .. "/script: exec: ENOENT: no such file or directory " ..
        "(its interpreter /no/such/interp is missing)", err)
      assert.are.equal("ENOENT", code)
      -- an ELF binary whose dynamic loader is missing
      local elf = assert(io.open("/bin/true", "rb")):read("a")
      local at = assert(elf:find("/lib64/ld-linux-x86-64.so.2", 1, true), "no loader path in /bin/true")
      elf = elf:sub(1, at - 1) .. "/lib64/nosuch-loader-64.so2" .. elf:sub(at + #"/lib64/ld-linux-x86-64.so.2")
      assert(fs.write(dir .. "/elf", elf, 493))
      p, err = proc.spawn { argv = { dir .. "/elf" } }
      assert.is_nil(p)
      assert.are.equal("spawn " .. dir .. "/elf: exec: ENOENT: no such file or directory " ..
        "(its ELF interpreter, the dynamic loader, is missing)", err)
    end)

    it("reports a file that is not executable with EACCES", function()
      assert(fs.write(dir .. "/data", "#!/bin/sh\n", 420))
      local p, err, code = proc.spawn { argv = { dir .. "/data" } }
      assert.is_nil(p)
      assert.are.equal("spawn " .. dir .. "/data: exec: EACCES: permission denied", err)
      assert.are.equal("EACCES", code)
      -- by name: found but not runnable is EACCES, as execvp says
      p, err, code = proc.spawn { argv = { "data" }, env = { PATH = dir } }
      assert.is_nil(p)
      assert.are.equal("EACCES", code)
    end)

    it("runs the program behind exec_fd, which argv[1] only names, and passes that fd on to no one", function()
      core.run(function()
        -- opened without close-on-exec (Lua's io.open): still not inherited
        local f = assert(io.open("/bin/sh", "rb"))
        local out, st = run { argv = { "named-sh", "-c", 'echo "$0"; ls /proc/$$/fd' }, exec_fd = fd_of("/bin/sh") }
        f:close()
        assert.are.equal(0, st.code)
        assert.are.equal("named-sh\n0\n1\n2\n", out)
      end)
    end)

    it("reports an exec_fd that cannot be run at the exec stage", function()
      assert(fs.write(dir .. "/data", "#!/bin/sh\n", 420))
      local fd = assert(fs.open_fd(dir .. "/data", "r"))
      local p, err, code = proc.spawn { argv = { "data" }, exec_fd = fd }
      fs.close_fd(fd)
      assert.is_nil(p)
      assert.are.equal("spawn data: exec: EACCES: permission denied", err)
      assert.are.equal("EACCES", code)
      p, err, code = proc.spawn { argv = { "gone" }, exec_fd = 9999 }
      assert.is_nil(p)
      assert.are.equal("spawn gone: exec: EBADF: bad file descriptor", err)
      assert.are.equal("EBADF", code)
      assert.has_error(function() proc.spawn { argv = { "x" }, exec_fd = 2 } end,
        "spawn: spec.exec_fd must be a file descriptor above 2")
      assert.has_error(function() proc.spawn { argv = { "x" }, exec_fd = "3" } end,
        "spawn: spec.exec_fd must be a file descriptor above 2")
    end)

    it("names chdir when the cwd is bad, and leaves no child behind", function()
      core.run(function()
        local before = fd_count()
        local p, err, code = proc.spawn { argv = { "/bin/true" }, cwd = dir .. "/missing" }
        assert.is_nil(p)
        assert.are.equal("spawn /bin/true: chdir " .. dir .. "/missing: ENOENT: no such file or directory", err)
        assert.are.equal("ENOENT", code)
        assert.are.equal(before, fd_count())
      end)
    end)

    it("raises on a malformed spec", function()
      assert.has_error(function() proc.spawn() end)
      assert.has_error(function() proc.spawn {} end, "spawn: spec.argv must be a list of strings")
      assert.has_error(function() proc.spawn { argv = {} } end, "spawn: spec.argv is empty")
      assert.has_error(function() proc.spawn { argv = { "/bin/true" }, stdni = "pipe" } end,
        "spawn: unknown field 'stdni' in the spec")
      assert.has_error(function() proc.spawn { argv = { "/bin/true" }, stdin = "file" } end)
      assert.has_error(function() proc.spawn { argv = { "/bin/true" }, env = { "NOEQUALS" } } end)
      assert.has_error(function() proc.spawn { argv = { "/bin/true", "a\0b" } } end,
        "spawn: spec.argv item contains a NUL byte")
      assert.has_error(function() proc.spawn { argv = { "/bin/true" }, clone_flags = { "newfoo" } } end)
      assert.has_error(function() proc.spawn { argv = { "/bin/true" }, rlimits = { files = 1 } } end,
        "spawn: unknown rlimit 'files'")
      assert.has_error(function() proc.spawn { argv = { "/bin/true" }, pdeathsig = "SIGNOPE" } end)
      assert.has_error(function() proc.spawn { argv = { "/bin/true" }, uid = 1000 } end,
        "spawn: spec.uid needs spec.gid too (the group would stay the server's)")
    end)

    it("puts the child in its own process group, or session with setsid", function()
      core.run(function()
        local p = assert(proc.spawn { argv = { "/bin/cat", "/proc/self/stat" } })
        local pgrp = tonumber(read_all(p.stdout):match("%) %a %d+ (%d+)"))
        assert.are.equal(p.pid, pgrp)
        p:wait()
        p = assert(proc.spawn { argv = { "/bin/cat", "/proc/self/stat" }, setsid = true })
        local session = tonumber(read_all(p.stdout):match("%) %a %d+ %d+ (%d+)"))
        assert.are.equal(p.pid, session)
        p:wait()
      end)
    end)

    it("resets signal dispositions and the mask, and passes no fd but stdio", function()
      core.run(function()
        -- an fd of ours without CLOEXEC (Lua's io.open), which must not leak
        local f = assert(io.open(dir .. "/leak", "w"))
        local out = run { argv = { "/bin/sh", "-c", "ls /proc/$$/fd" } }
        f:close()
        assert.are.same({ "0", "1", "2" }, lines(out))
        -- the server ignores SIGPIPE; the child must not (grep itself is the
        -- child: a shell blocks signals of its own while it waits for jobs)
        out = run { argv = { "/bin/grep", "-E", "^Sig(Blk|Ign)", "/proc/self/status" } }
        assert.are.same({ "SigBlk:\t0000000000000000", "SigIgn:\t0000000000000000" }, lines(out))
        -- only what spec.sigmask names stays blocked
        out = run { argv = { "/bin/grep", "-E", "^Sig(Blk|Ign)", "/proc/self/status" }, sigmask = { "SIGTERM", 1 } }
        assert.are.same({ "SigBlk:\t0000000000004001", "SigIgn:\t0000000000000000" }, lines(out))
      end)
    end)

    it("gives status_pipe's write end as fd 3 and reads a wait status left there as the exit", function()
      core.run(function()
        local out, st = run { argv = { "/bin/sh", "-c", "ls /proc/$$/fd" }, status_pipe = true }
        assert.are.same({ "0", "1", "2", "3" }, lines(out))
        assert.are.same({ code = 0, core_dumped = false }, st)
        -- 9 in the low byte of a wait status: killed by SIGKILL, whatever
        -- the exit code (an init exits 137)
        _, st = run { argv = { "/bin/sh", "-c", [[printf '\011\000\000\000' >&3; exit 137]] }, status_pipe = true }
        assert.are.same({ signal = "SIGKILL", signum = 9, core_dumped = false }, st)
        _, st = run { argv = { "/bin/sh", "-c", [[printf '\000\003\000\000' >&3; exit 137]] }, status_pipe = true }
        assert.are.same({ code = 3, core_dumped = false }, st)
        -- nothing written, or not a whole status: the exit as it was
        _, st = run { argv = { "/bin/sh", "-c", [[printf 'x' >&3; exit 137]] }, status_pipe = true }
        assert.are.same({ code = 137, core_dumped = false }, st)
        -- the pipe is never left open in the server, whatever the outcome
        local function twice()
          local p = assert(proc.spawn { argv = { "/bin/true" }, status_pipe = true, stdout = "null", stderr = "null" })
          p:wait(5000)
          p:close()
          assert.is_nil(proc.spawn { argv = { "/bin/true" }, cwd = dir .. "/none", status_pipe = true })
        end
        twice()
        local before = fd_count()
        for _ = 1, 20 do twice() end
        assert.are.equal(before, fd_count())
      end)
    end)

    it("applies rlimits, no_new_privs and an fd given as stdout", function()
      core.run(function()
        local out = run { argv = { "/bin/sh", "-c", "ulimit -n; ulimit -Hn; grep NoNewPrivs /proc/$$/status" },
                          rlimits = { nofile = { soft = 100, hard = 200 } }, no_new_privs = true }
        assert.are.equal("100\n200\nNoNewPrivs:\t1\n", out)

        local f = assert(io.open(dir .. "/out", "w"))
        local p = assert(proc.spawn { argv = { "/bin/echo", "to a file" }, stdout = fd_of(dir .. "/out") })
        assert.is_nil(p.stdout)
        assert.are.equal(0, p:wait().code)
        f:close()
        assert.are.equal("to a file\n", fs.read(dir .. "/out"))
      end)
    end)

    it("writes 0 to each cgroup fd before exec, and names the stage when it cannot", function()
      core.run(function()
        -- a plain file stands in for cgroup.procs: what matters is the write
        local f = assert(io.open(dir .. "/procs", "w"))
        local p = assert(proc.spawn { argv = { "/bin/true" }, cgroup_fds = { fd_of(dir .. "/procs") } })
        assert.are.equal(0, p:wait().code)
        f:close()
        assert.are.equal("0", fs.read(dir .. "/procs"))

        local q, err, code = proc.spawn { argv = { "/bin/true" }, cgroup_fds = { 9999 } }
        assert.is_nil(q)
        assert.are.equal("spawn /bin/true: cgroup (cgroup_fds[1]): EBADF: bad file descriptor", err)
        assert.are.equal("EBADF", code)
      end)
    end)

    it("changes uid, gid and groups (as root)", function()
      if not is_root() then
        pending("needs root to change identity")
        return
      end
      core.run(function()
        local out = run { argv = { "/usr/bin/id" }, uid = 65534, gid = 65534 }
        assert.are.equal("uid=65534(nobody) gid=65534(nogroup) groups=65534(nogroup)\n", out)
        out = run { argv = { "/usr/bin/id", "-G" }, uid = 65534, gid = 65534, groups = { 65534, 100 } }
        assert.are.equal("65534 100\n", out)
      end)
    end)

    it("runs in new namespaces with clone_flags (as root)", function()
      if not is_root() then
        pending("namespaces need root (or a user namespace, not supported yet)")
        return
      end
      core.run(function()
        local out, st = run { argv = { "/bin/sh", "-c", "echo $$" }, clone_flags = { "newpid" } }
        assert.are.equal("1\n", out)
        assert.are.equal(0, st.code)
        -- a new network namespace has only its own loopback
        out = run { argv = { "/bin/sh", "-c", "echo $$; hostname tn-spec; hostname; tail -n +3 /proc/net/dev | cut -d: -f1" },
                    clone_flags = { "newpid", "newns", "newipc", "newuts", "newnet" } }
        assert.are.equal("1\ntn-spec\nlo\n", out:gsub(" ", ""))
      end)
    end)

    it("joins a network namespace made ahead, and closes its fd whatever happens", function()
      if not is_root() then
        pending("network namespaces need root")
        return
      end
      -- the network namespaces this process holds fds of
      local function held()
        local n = 0
        for _, fd in ipairs(assert(fs.readdir("/proc/self/fd"))) do
          local p = io.popen("readlink /proc/" .. proc.getpid() .. "/fd/" .. fd .. " 2>/dev/null")
          if (p:read("a") or ""):find("^net:") then n = n + 1 end
          p:close()
        end
        return n
      end
      core.run(function()
        local before = held()
        local fd = assert(proc.netns_new())
        assert.are.equal(before + 1, held())
        local host = io.popen("readlink /proc/self/ns/net"):read("l")
        -- lo is up: a connection to a closed port is refused, not unreachable
        local out = run { argv = { "/bin/sh", "-c", "readlink /proc/self/ns/net; tail -n +3 /proc/net/dev | " ..
          "cut -d: -f1 | tr -d ' '; bash -c 'exec 3<>/dev/tcp/127.0.0.1/9' 2>&1 | grep -o 'Connection refused' | head -1" },
          netns_fd = fd }
        local ns, rest = out:match("^(net:%[%d+%])\n(.*)$")
        assert.is_truthy(ns, out)
        assert.are_not.equal(host, ns)
        assert.are.equal("lo\nConnection refused\n", rest)
        assert.are.equal(before, held())
        -- a spawn that fails closes it too, and so does a spec it refuses
        fd = assert(proc.netns_new())
        local p, err = proc.spawn { argv = { "/nonexistent/app" }, netns_fd = fd }
        assert.is_nil(p)
        assert.matches("ENOENT", err)
        assert.are.equal(before, held())
        fd = assert(proc.netns_new())
        assert.has_error(function() proc.spawn { argv = { "/bin/true" }, netns_fd = fd, clone_flags = { "newnet" } } end,
          "spawn: spec.netns_fd is a network namespace to join: it excludes clone_flags newnet (a new one) " ..
          "and newuser (from there it may not be joined)")
        assert.are.equal(before, held())
      end)
    end)

    it("refuses a cgroup_into that is no cgroup2 directory, saying which", function()
      core.run(function()
        local fd = assert(fs.open_fd("/tmp", "r"))
        local p, err, code = proc.spawn { argv = { "/bin/true" }, cgroup_into = fd }
        fs.close_fd(fd)
        assert.is_nil(p)
        assert.matches("cgroup_into", err, 1, true)
        assert.are.equal("EBADF", code)
      end)
    end)

    it("keeps working with a big parent (~200 MB of Lua strings)", function()
      local big = {}
      for i = 1, 200 do big[i] = string.rep(string.char(65 + i % 26), 1 << 20) .. i end
      core.run(function()
        for _ = 1, 20 do
          local p = assert(proc.spawn { argv = { "/bin/true" }, stdout = "null", stderr = "null" })
          assert.are.equal(0, p:wait(5000).code)
        end
      end)
      assert.are.equal(200, #big)
      big = nil -- luacheck: ignore
      collectgarbage()
    end)
  end)

  describe("exit status", function()
    it("gives the exit code", function()
      core.run(function()
        local p = assert(proc.spawn { argv = { "/bin/sh", "-c", "exit 3" } })
        assert.are.same({ code = 3, core_dumped = false }, p:wait())
      end)
    end)

    it("gives the signal that killed it", function()
      core.run(function()
        local p = assert(proc.spawn { argv = { "/bin/sleep", "100" } })
        assert.are.equal("running", p:status())
        assert.is_true(p:kill(9))
        local st = p:wait(5000)
        assert.are.same({ signal = "SIGKILL", signum = 9, core_dumped = false }, st)
        assert.are.same(st, p:status())
      end)
    end)

    it("wait times out, and the process is still there afterwards", function()
      core.run(function()
        local p = assert(proc.spawn { argv = { "/bin/sleep", "100" } })
        local st, err = p:wait(30)
        assert.is_nil(st)
        assert.are.equal("timeout", err)
        assert.are.equal("running", p:status())
        assert.is_true(p:kill("SIGTERM"))
        assert.are.equal("SIGTERM", p:wait(5000).signal)
      end)
    end)

    it("wait twice gives the same status, the second time at once", function()
      core.run(function()
        local p = assert(proc.spawn { argv = { "/bin/sh", "-c", "exit 7" } })
        local a = p:wait()
        local t0 = core.hrtime()
        local b = p:wait(0)
        assert.is_true(core.hrtime() - t0 < 1e6)
        assert.are.same(a, b)
        assert.are.equal(7, b.code)
      end)
      -- and outside a task too, once it ended
    end)

    it("lets several tasks wait for the same process", function()
      core.run(function()
        local p = assert(proc.spawn { argv = { "/bin/sleep", "100" } })
        local waiters = {}
        for i = 1, 3 do waiters[i] = core.spawn(function() return p:wait(5000) end) end
        local impatient = core.spawn(function() return p:wait(1) end)
        until_waiting(table.unpack(waiters))
        assert.are.same({ true, nil, "timeout" }, { impatient:join() })
        p:kill("KILL")
        for i = 1, 3 do
          local ok, st = waiters[i]:join()
          assert.is_true(ok)
          assert.are.equal("SIGKILL", st.signal)
        end
      end)
    end)

    it("wait ends early on core.wake, with its values, and leaves the process watched", function()
      core.run(function()
        local p = assert(proc.spawn { argv = { "/bin/sleep", "100" } })
        local waiter = core.spawn(function() return table.pack(p:wait(60000)) end)
        local later = core.spawn(function() return p:wait(60000) end)
        until_waiting(waiter, later)
        assert.is_true(core.wake(waiter, "news"))
        local ok, got = waiter:join(5000)
        assert.is_true(ok)
        assert.are.same({ n = 1, "news" }, got)
        assert.are.equal("running", p:status())
        -- the woken waiter is gone from the process; the other still hears the exit
        p:kill("KILL")
        local ok2, st = later:join(5000)
        assert.is_true(ok2)
        assert.are.equal("SIGKILL", st.signal)
        assert.are.equal("SIGKILL", p:wait(0).signal)
      end)
    end)

    it("lets a waiter resumed by the exit wake another waiter of the same process", function()
      core.run(function()
        local p = assert(proc.spawn { argv = { "/bin/sleep", "100" } })
        local y = core.spawn(function() return table.pack(p:wait(60000)) end)
        local x = core.spawn(function()
          local st = p:wait(60000)
          core.wake(y, "from x")
          return st
        end)
        until_waiting(y, x)
        p:kill("KILL")
        local ok, st = x:join(5000)
        assert.is_true(ok)
        assert.are.equal("SIGKILL", st.signal)
        local ok2, got = y:join(5000)
        assert.is_true(ok2)
        -- the exit or x, whichever came first: never both, never neither
        assert.is_true(got[1] == "from x" or got[1].signal == "SIGKILL")
      end)
    end)

    it("sees the exit of a child the handle of which was dropped mid-wait", function()
      core.run(function()
        local pid
        local seen = setmetatable({}, { __mode = "k" })
        local function start()
          local p = assert(proc.spawn { argv = { "/bin/sleep", "100" }, stdout = "null", stderr = "null" })
          pid = p.pid
          seen[p] = true
          return p
        end
        -- a tail call: once wait yields, nothing references the handle
        local waiter = core.spawn(function() return start():wait(5000) end)
        until_waiting(waiter)
        collectgarbage()
        collectgarbage()
        assert.is_nil(next(seen)) -- the handle is gone, its waiter is not
        assert(proc.kill(pid, "KILL"))
        local ok, st = waiter:join(5000)
        assert.is_true(ok)
        assert.are.equal("SIGKILL", st.signal)
      end)
    end)
  end)

  describe("kill", function()
    it("does not signal after the process was reaped", function()
      core.run(function()
        local p = assert(proc.spawn { argv = { "/bin/true" } })
        p:wait()
        local ok, err, code = p:kill("KILL")
        assert.is_nil(ok)
        assert.are.equal("process has exited", err)
        assert.are.equal("ESRCH", code)
      end)
    end)

    it("kills the whole process group with group = true, grandchildren included", function()
      core.run(function()
        -- the grandchild holds the stdout pipe: end of file means it died too
        local p = assert(proc.spawn { argv = { "/bin/sh", "-c", "sleep 100 & echo $!; wait" } })
        local line = assert(p.stdout:read(5000))
        local grandchild = tonumber(line:match("^(%d+)"))
        assert.is_number(grandchild)
        local gst = proc_stat(grandchild)
        assert.are.equal(p.pid, gst.pgrp)
        assert.is_true(p:kill("TERM", true))
        assert.are.equal("SIGTERM", p:wait(5000).signal)
        local rest, err = p.stdout:read(5000)
        assert.is_nil(rest)
        assert.is_nil(err)
        -- its end of the pipe closes while it exits, a moment before it is a zombie
        assert(wait_reaped(grandchild, gst.start, true))
      end)
    end)

    it("refuses a group kill once the leader was reaped: its number may lead another group by then", function()
      if not is_root() then
        pending("needs root to choose the next pid (/proc/sys/kernel/ns_last_pid)")
        return
      end
      local probe = io.open("/proc/sys/kernel/ns_last_pid", "w")
      if not probe then
        pending("cannot write /proc/sys/kernel/ns_last_pid here (a read-only /proc/sys, no CAP_SYS_ADMIN)")
        return
      end
      probe:close()
      core.run(function()
        local p = assert(proc.spawn { argv = { "/bin/true" } })
        assert.are.equal(0, p:wait(5000).code)
        -- an unrelated process gets the reaped number and leads a group of it;
        -- another process of the machine may take the number first: retry
        local victim
        for _ = 1, 100 do
          local f = assert(io.open("/proc/sys/kernel/ns_last_pid", "w"))
          f:write(tostring(p.pid - 1))
          f:close()
          local v = assert(proc.spawn { argv = { "/bin/sleep", "100" }, setsid = true })
          if v.pid == p.pid then victim = v break end
          v:kill("SIGKILL")
          v:wait(5000)
        end
        assert(victim, "no process got pid " .. p.pid .. " back in 100 tries")
        assert.are.equal(p.pid, proc_stat(victim.pid).pgrp)
        local ok, err, code = p:kill("SIGKILL", true)
        assert.is_nil(ok)
        assert.are.equal("process has exited", err)
        assert.are.equal("ESRCH", code)
        -- nothing reached it: still running a moment later, then ended by us
        local st, werr = victim:wait(100)
        assert.is_nil(st)
        assert.are.equal("timeout", werr)
        victim:kill("SIGTERM")
        assert.are.equal("SIGTERM", victim:wait(5000).signal)
      end)
    end)

    -- SIGKILL is queued on the process, which dies when it next runs: right
    -- after the kill it may still be listed with the signal pending.
    local function dead_or_dying(pid, start)
      local st = proc_stat(pid)
      if not st or st.start ~= start or st.state == "Z" or st.state == "X" then return true end
      local f = io.open("/proc/" .. pid .. "/status")
      local pend = f and f:read("a"):match("\nShdPnd:%s+(%x+)")
      if f then f:close() end
      return pend ~= nil and (tonumber(pend:sub(-4), 16) & (1 << 8)) ~= 0
    end

    it("kill_group_at_exit kills what the leader left in its group before its exit is reported", function()
      core.run(function()
        local function left_behind(spec)
          local p = assert(proc.spawn(spec))
          local grandchild = tonumber(assert(p.stdout:read(5000)):match("^(%d+)"))
          local gst = proc_stat(grandchild)
          assert.are.equal(p.pid, gst.pgrp)
          assert.are.equal(0, p:wait(5000).code)
          return grandchild, gst.start
        end
        local argv = { "/bin/sh", "-c", "sleep 100 >/dev/null & echo $!" }
        -- without it the group lives on after its leader
        local kept, kept_start = left_behind { argv = argv }
        assert.is_false(dead_or_dying(kept, kept_start))
        assert(proc.kill(kept, "SIGKILL"))
        local gone, gone_start = left_behind { argv = argv, kill_group_at_exit = true }
        assert.is_true(dead_or_dying(gone, gone_start))
        assert(wait_reaped(gone, gone_start, true))
        assert(wait_reaped(kept, kept_start, true))
      end)
    end)

    it("raw proc.kill signals a pid and reports a missing one", function()
      core.run(function()
        local p = assert(proc.spawn { argv = { "/bin/sleep", "100" } })
        assert.is_true(proc.kill(p.pid, "SIGKILL"))
        assert.are.equal("SIGKILL", p:wait(5000).signal)
        local ok, err, code = proc.kill(p.pid, 0)
        assert.is_nil(ok)
        assert.matches("^kill %d+: ESRCH", err)
        assert.are.equal("ESRCH", code)
      end)
      assert.has_error(function() proc.kill(-1, 9) end)
      assert.has_error(function() proc.kill(123, "SIGBOGUS") end)
    end)

    it("signal_name names signals", function()
      assert.are.equal("SIGKILL", proc.signal_name(9))
      assert.are.equal("SIGTERM", proc.signal_name(15))
      assert.are.equal("SIGRTMIN+1", proc.signal_name(35))
      assert.is_nil(proc.signal_name(0))
      assert.is_nil(proc.signal_name(1000))
    end)
  end)

  describe("pdeathsig", function()
    it("kills a child when its parent is SIGKILLed", function()
      local cpath = os.getenv("TEN_BUILD") and (os.getenv("TEN_BUILD") .. "/lib/?.so") or package.cpath
      local helper = [[
        local core = require "tenement.core"
        core.run(function()
          local p = assert(core.proc.spawn { argv = { "/bin/sleep", "100" }, stdout = "inherit" })
          io.stdout:write(p.pid, "\n")
          io.stdout:flush()
          p:wait()
        end)
      ]]
      core.run(function()
        -- the sanitizer runs of the specs need their preload in the helper too
        local env = { PATH = PATH, LUA_CPATH = cpath, LD_PRELOAD = os.getenv("LD_PRELOAD"),
                      ASAN_OPTIONS = os.getenv("ASAN_OPTIONS") }
        local h = assert(proc.spawn { argv = { "lua5.4", "-e", helper }, env = env })
        local line = h.stdout:read(5000)
        if not line then error("helper failed: " .. read_all(h.stderr)) end
        local grandchild = tonumber(line:match("^(%d+)"))
        local gst = assert(proc_stat(grandchild))
        assert.is_true(h:kill("KILL"))
        assert.are.equal("SIGKILL", h:wait(5000).signal)
        -- the grandchild shares the pipe: end of file once it is dead too
        local rest, err = h.stdout:read(5000)
        assert.is_nil(err)
        assert.is_nil(rest)
        assert(wait_reaped(grandchild, gst.start, true))
      end)
    end)
  end)

  describe("pipes", function()
    it("round-trips stdin through cat", function()
      core.run(function()
        local p = assert(proc.spawn { argv = { "/bin/cat" }, stdin = "pipe" })
        assert.is_true(p.stdin:write("hello "))
        assert.is_true(p.stdin:write("cat\n"))
        p.stdin:close()
        p.stdin:close() -- idempotent
        assert.are.equal("hello cat\n", read_all(p.stdout))
        assert.are.equal(0, p:wait().code)
        assert.has_error(function() p.stdin:write("x") end, "pipe is closed")
      end)
    end)

    it("reads a flood of output fully", function()
      core.run(function()
        local p = assert(proc.spawn { argv = { "/usr/bin/head", "-c", "10000000", "/dev/zero" } })
        local n = 0
        while true do
          local chunk = p.stdout:read(5000)
          if not chunk then break end
          n = n + #chunk
        end
        assert.are.equal(10000000, n)
        assert.are.equal(0, p:wait().code)
      end)
    end)

    it("writes more than a pipe holds while another task reads", function()
      core.run(function()
        local p = assert(proc.spawn { argv = { "/bin/cat" }, stdin = "pipe" })
        local data = string.rep("0123456789abcdef", 1 << 18) -- 4 MB
        local reader = core.spawn(function() return read_all(p.stdout) end)
        assert.is_true(p.stdin:write(data, 5000))
        p.stdin:close()
        local ok, out = reader:join()
        assert.is_true(ok)
        assert.are.equal(#data, #out)
        assert.is_true(out == data)
        p:wait()
      end)
    end)

    it("read times out and can be retried; a second reader is refused", function()
      core.run(function()
        local p = assert(proc.spawn { argv = { "/bin/sh", "-c", "read x; echo got $x" }, stdin = "pipe" })
        local chunk, err = p.stdout:read(20)
        assert.is_nil(chunk)
        assert.are.equal("timeout", err)
        local reader = core.spawn(function() return p.stdout:read(5000) end)
        until_waiting(reader)
        assert.has_error(function() p.stdout:read(10) end, "another task is already reading stdout")
        assert(p.stdin:write("it\n"))
        local ok, got = reader:join()
        assert.is_true(ok)
        assert.are.equal("got it\n", got)
        p:wait()
      end)
    end)

    it("reports EPIPE when writing to a child that exited", function()
      core.run(function()
        local p = assert(proc.spawn { argv = { "/bin/true" }, stdin = "pipe" })
        p:wait()
        local ok, err, code = p.stdin:write("anyone?")
        assert.is_nil(ok)
        assert.matches("^write stdin of %d+: EPIPE", err)
        assert.are.equal("EPIPE", code)
      end)
    end)

    it("a closed pipe wakes its reader with nil, 'closed'", function()
      core.run(function()
        local p = assert(proc.spawn { argv = { "/bin/sleep", "100" } })
        local reader = core.spawn(function() return p.stdout:read(5000) end)
        until_waiting(reader)
        p.stdout:close()
        local ok, chunk, err = reader:join()
        assert.is_true(ok)
        assert.is_nil(chunk)
        assert.are.equal("closed", err)
        assert.has_error(function() p.stdout:read() end, "pipe is closed")
        p:kill("KILL")
        p:wait()
      end)
    end)

    it("refuses the wrong direction", function()
      core.run(function()
        local p = assert(proc.spawn { argv = { "/bin/cat" }, stdin = "pipe" })
        assert.has_error(function() p.stdin:read() end)
        assert.has_error(function() p.stdout:write("x") end)
        p.stdin:close()
        p:wait()
      end)
    end)

    it("stdio null and inherit give no pipe", function()
      core.run(function()
        local p = assert(proc.spawn { argv = { "/bin/true" }, stdout = "null", stderr = "inherit" })
        assert.is_nil(p.stdin)
        assert.is_nil(p.stdout)
        assert.is_nil(p.stderr)
        assert.are.equal(0, p:wait().code)
      end)
    end)
  end)

  describe("many processes", function()
    it("runs 200 concurrent spawns", function()
      core.run(function()
        local before = fd_count()
        local ps, tasks = {}, {}
        for i = 1, 200 do
          ps[i] = assert(proc.spawn { argv = { "/bin/sh", "-c", "echo $1; exit $(($1 % 50))", "sh", tostring(i) },
                                      stderr = "null" })
        end
        for i = 1, 200 do
          tasks[i] = core.spawn(function()
            local out = read_all(ps[i].stdout)
            return out, ps[i]:wait(10000)
          end)
        end
        for i = 1, 200 do
          local ok, out, st = tasks[i]:join()
          assert.is_true(ok)
          assert.are.equal(i .. "\n", out)
          assert.are.equal(i % 50, st.code)
        end
        for i = 1, 200 do ps[i]:close() end
        ps = nil -- luacheck: ignore
        assert.are.equal(before, fd_count())
      end)
    end)
  end)

  describe("handle lifetime", function()
    it("close() while running neither kills nor leaves a zombie", function()
      core.run(function()
        local before = fd_count()
        local p = assert(proc.spawn { argv = { "/bin/cat" }, stdin = "pipe", stdout = "null", stderr = "null" })
        local pid = p.pid
        local start = proc_stat(pid).start
        local order = {}
        local waiter = core.spawn(function()
          local st, err = p:wait(5000)
          order[#order + 1] = "waiter"
          return st, err
        end)
        until_waiting(waiter)
        p:close()
        -- the waiter is woken, not run inside the close
        order[#order + 1] = "closer"
        p:close() -- idempotent
        local ok, st, err = waiter:join()
        assert.are.same({ "closer", "waiter" }, order)
        assert.is_true(ok)
        assert.is_nil(st)
        assert.are.equal("closed", err)
        assert.has_error(function() p:wait() end)
        assert.has_error(function() p:kill() end)
        assert.are.equal(pid, p.pid)
        -- closing the handle closed stdin: cat sees end of file and exits
        assert(wait_reaped(pid, start))
        assert.are.equal(before, fd_count())
      end)
    end)

    it("a collected handle of a running child is reaped when the child exits", function()
      core.run(function()
        local before = fd_count()
        local p = assert(proc.spawn { argv = { "/bin/sleep", "100" }, stdout = "null", stderr = "null" })
        local pid = p.pid
        local start = proc_stat(pid).start
        local seen = setmetatable({ [p] = true }, { __mode = "k" })
        p = nil -- luacheck: ignore
        collectgarbage()
        collectgarbage()
        assert.is_nil(next(seen))
        assert.are_not.equal("Z", proc_stat(pid).state) -- not killed
        assert(proc.kill(pid, "KILL"))
        assert(wait_reaped(pid, start))
        assert.are.equal(before, fd_count())
      end)
    end)

    it("__close closes the handle at the end of a scope", function()
      core.run(function()
        local pid, start
        do
          local p <close> = assert(proc.spawn { argv = { "/bin/sleep", "0.05" }, stdout = "null", stderr = "null" })
          pid, start = p.pid, proc_stat(p.pid).start
        end
        assert(wait_reaped(pid, start))
      end)
    end)

    it("a task that fails closes its <close> handle; the child lives on and is reaped", function()
      core.run(function()
        local errors = {}
        core.on_error(function(trace) errors[#errors + 1] = trace end)
        local pid, start
        local t = core.spawn(function()
          local p <close> = assert(proc.spawn { argv = { "/bin/sleep", "100" }, stdout = "null", stderr = "null" })
          pid, start = p.pid, proc_stat(p.pid).start
          error("boom with a process open")
        end)
        local ok, err = t:join()
        core.on_error(nil)
        assert.is_nil(ok)
        assert.matches("boom with a process open", err)
        assert.are_not.equal("Z", proc_stat(pid).state)
        assert(proc.kill(pid, "KILL"))
        assert(wait_reaped(pid, start))
      end)
    end)

    it("wait outside a task raises while the child runs, and returns once it ended", function()
      local p = assert(proc.spawn { argv = { "/bin/sleep", "100" }, stdout = "null", stderr = "null" })
      assert.has_error(function() p:wait() end)
      core.run(function()
        p:kill("KILL")
        p:wait()
      end)
      assert.are.equal("SIGKILL", p:wait().signal)
      assert.matches("^tenement.process %(pid %d+%)$", tostring(p))
      p:close()
    end)
  end)
end)

-- RLIMIT_NPROC as the drivers hand it to core.proc.spawn. The kernel never
-- holds root to it (fork checks it only for users other than root without
-- CAP_SYS_RESOURCE or CAP_SYS_ADMIN), so for an app that runs as root the
-- limit would be written and do nothing.
describe("nproc", function()
  local function is_root_here()
    return (fs.read("/proc/self/status") or ""):match("\nUid:%s+%d+%s+(%d+)") == "0"
  end

  it("is refused for an app that would run as root, which the kernel exempts from it", function()
    if not is_root_here() then pending("as another user, nproc binds the app: nothing to refuse") return end
    core.run(function()
      -- the exemption, on this kernel: root forks past nproc = 2
      local p = assert(proc.spawn { argv = { "/bin/sh", "-c",
        "n=0; for i in 1 2 3 4 5 6; do (sleep 0.3) 2>/dev/null & n=$((n+1)); done; wait; echo $n" },
        rlimits = { nproc = 2 }, stdout = "pipe", stderr = "null" })
      local out = read_all(p.stdout)
      p:wait(5000)
      print("\n  root with nproc = 2 started " .. out:gsub("\n", "") .. " of 6 children")
      for _, level in ipairs { "process", "namespace" } do
        local driver = require("tenement.runtimes." .. level)
        local inst = { argv = { "/bin/true" }, env = {}, stdout_fd = "null", stderr_fd = "null",
          service = { name = "svc" }, id = "a", rlimits = { nproc = 20 } }
        local spec, err = driver.prepare(inst)
        assert.is_nil(spec, level)
        assert.matches("nproc = 20", err, 1, true)
        assert.matches("pids_limit", err, 1, true)
        inst.user = { uid = 0, gid = 0 }
        assert.is_nil((driver.prepare(inst)), level)
        -- a user of its own: the kernel holds it to the limit
        inst.user = { uid = 65534, gid = 65534 }
        spec = assert(driver.prepare(inst))
        assert.are.same({ nproc = 20 }, spec.rlimits)
      end
    end)
  end)
end)
