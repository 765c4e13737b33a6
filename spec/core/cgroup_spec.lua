-- tenement.cgroup: per-instance cgroups against the real kernel (limits,
-- usage, OOM kills, killing a tree, removal, stale cleanup), and the cgroup2
-- code path against a fake cgroupfs in a temp dir where this host's
-- cgroup2 hierarchy has no controllers.
local core = require "tenement.core"
local cgroup = require "tenement.cgroup"
local support = require "support"
local fs = core.fs

local FIXTURES = (os.getenv("TEN_BUILD") or "build") .. "/fixtures/"

local function is_root()
  local s = assert(fs.read("/proc/self/status"))
  return s:match("\nUid:%s+(%d+)") == "0"
end

local function slurp(path)
  local s = fs.read(path)
  return s and s:gsub("%s+$", "")
end

-- A base of its own per run: specs of several engineers share this host's
-- cgroups, and cleanup_stale must only ever see ours.
local function unique_base()
  return string.format("tenement-spec-%d-%d", core.proc.getpid(), math.random(1, 1e9))
end

-- Removes the base directories a layout created.
local function drop_base(layout)
  for _, h in ipairs(layout.hierarchies) do
    if h.ready then fs.rmdir(h.base) end
  end
end

-- Spawns argv inside cg (through cgroup_fds, as the supervisor does).
local function spawn_in(cg, argv, extra)
  local fds, into = assert(cg:proc_fds())
  local spec = { argv = argv, stdout = "null", stderr = "null", cgroup_fds = fds, cgroup_into = into }
  for k, v in pairs(extra or {}) do spec[k] = v end
  local p, err = core.proc.spawn(spec)
  cg:close_fds()
  return assert(p, err)
end

local function pid_in_cgroups(pid)
  return slurp("/proc/" .. pid .. "/cgroup")
end

local real_reason = not is_root() and "needs root to create cgroups" or nil
-- the v1 or v2 hierarchy of each kind on this host, or why there is none
local function need(layout, kind)
  local k = layout.kinds[kind]
  if not k.hier then return kind .. " limits cannot be enforced on this host: " .. k.reason end
end

describe("tenement.cgroup", function()
  describe("parsing", function()
    it("reads mountinfo (escapes, superblock options) and /proc/self/cgroup", function()
      local mounts = cgroup.parse_mountinfo(table.concat({
        "32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime shared:9 - cgroup cgroup rw,cpu,cpuacct",
        "41 31 0:38 /sub /mnt/with\\040space rw,relatime - cgroup2 cgroup2 rw,nsdelegate",
        "garbage line",
      }, "\n"))
      assert.are.equal(2, #mounts)
      assert.are.same({ root = "/", point = "/sys/fs/cgroup/cpu,cpuacct", fstype = "cgroup", source = "cgroup",
        super = { rw = true, cpu = true, cpuacct = true } }, mounts[1])
      assert.are.equal("/mnt/with space", mounts[2].point)
      assert.are.equal("/sub", mounts[2].root)
      assert.are.same({
        { id = 4, controllers = { "memory" }, path = "/a/b" },
        { id = 2, controllers = { "cpu", "cpuacct" }, path = "/" },
        { id = 1, controllers = { "name=systemd" }, path = "/x:y" },
        { id = 0, controllers = {}, path = "/svc" },
      }, cgroup.parse_proc_cgroup("4:memory:/a/b\n2:cpu,cpuacct:/\n1:name=systemd:/x:y\n0::/svc\n"))
    end)
  end)

  describe("on this host", function()
    local layout, base
    before_each(function()
      base = unique_base()
      layout = cgroup.detect { base = base }
    end)
    after_each(function()
      core.run(function() cgroup.cleanup_stale(layout) end)
      drop_base(layout)
    end)

    it("detects the hierarchies and says which one serves each limit", function()
      local lines = cgroup.describe(layout)
      -- shown in the spec output: what this host offers
      print("\n  " .. table.concat(lines, "\n  "))
      for _, kind in ipairs(cgroup.KINDS) do
        local k = layout.kinds[kind]
        assert.is_true(k.hier ~= nil or type(k.reason) == "string")
        local found = false
        for _, l in ipairs(lines) do
          if l:find("^" .. kind .. " limits: ") then found = true end
        end
        assert.is_true(found)
      end
      -- the instance base sits beneath ten's own cgroup in each hierarchy
      local own = cgroup.parse_proc_cgroup(assert(fs.read("/proc/self/cgroup")))
      for _, h in ipairs(layout.hierarchies) do
        if h.own then
          assert.are.equal(h.own .. "/" .. base, h.base)
          local listed = false
          for _, e in ipairs(own) do
            if h.path == e.path then listed = true end
          end
          assert.is_true(listed)
        end
      end
    end)

    it("OOM-kills a process past memory_mb, counts it, and lets one under the limit run", function()
      if real_reason then pending(real_reason) return end
      local why = need(layout, "memory")
      if why then pending(why) return end
      core.run(function()
        local cg = assert(cgroup.create(layout, "oom.test", { memory_mb = 50 }))
        local k = layout.kinds.memory
        local limit = k.version == 2 and "memory.max" or "memory.limit_in_bytes"
        local mdir
        for _, d in ipairs(cg:dirs()) do if d:find(k.hier.base, 1, true) == 1 then mdir = d end end
        assert.are.equal(tostring(50 * 1024 * 1024), slurp(mdir .. "/" .. limit))
        assert.are.equal(0, cg:oom_kills())

        local ok = spawn_in(cg, { FIXTURES .. "memhog", "20" })
        assert.are.same({ code = 0, core_dumped = false }, ok:wait(10000))
        assert.are.equal(0, cg:oom_kills())

        local hog = spawn_in(cg, { FIXTURES .. "memhog", "200" })
        local st = hog:wait(10000)
        assert.are.equal("SIGKILL", st.signal)
        assert.are.equal(1, cg:oom_kills())
        assert.is_true(cg:kill_all())
        assert.is_true(cg:remove())
      end)
    end)

    it("reports memory and CPU usage of a running child", function()
      if real_reason then pending(real_reason) return end
      core.run(function()
        local cg = assert(cgroup.create(layout, "usage.test", {}))
        local p = spawn_in(cg, { FIXTURES .. "memhog", "30", "-1" }, { stdout = "pipe" })
        assert.are.equal("allocated 30\n", p.stdout:read(5000))
        local spin = spawn_in(cg, { FIXTURES .. "cpuspin", "0.2", "cpu" })
        assert.are.equal(0, spin:wait(10000).code)
        local u = cg:usage()
        print(string.format("\n  usage: memory %s bytes, cpu %s s", tostring(u.memory_bytes), tostring(u.cpu_seconds)))
        assert.is_true(u.cpu_seconds >= 0.2, "cpu_seconds " .. tostring(u.cpu_seconds))
        if layout.kinds.memory.hier then
          assert.is_true(u.memory_bytes >= 30 * 1024 * 1024, "memory_bytes " .. tostring(u.memory_bytes))
        else
          assert.is_nil(u.memory_bytes)
        end
        assert.is_true(cg:kill_all())
        assert.are.equal("SIGKILL", p:wait(5000).signal)
        assert.is_true(cg:remove())
      end)
    end)

    it("writes cpu shares and reads them back, and shares CPU time in proportion", function()
      if real_reason then pending(real_reason) return end
      local why = need(layout, "cpu")
      if why then pending(why) return end
      core.run(function()
        local hi = assert(cgroup.create(layout, "cpu.hi", { cpu_shares = 400 }))
        local lo = assert(cgroup.create(layout, "cpu.lo", { cpu_shares = 100 }))
        local odd = assert(cgroup.create(layout, "cpu.odd", { cpu_shares = 0 }))
        assert.are.same({ "cpu_shares = 0 is outside 1-10000: using 1" }, odd.notes)
        local function setting(cg)
          local k = layout.kinds.cpu
          for _, d in ipairs(cg:dirs()) do
            if d:find(k.hier.base, 1, true) == 1 then
              return slurp(d .. (k.version == 2 and "/cpu.weight" or "/cpu.shares"))
            end
          end
        end
        if layout.kinds.cpu.version == 2 then
          assert.are.same({ "400", "100", "1" }, { setting(hi), setting(lo), setting(odd) })
        else
          -- weight * 1024 / 100, at least v1's minimum of 2
          assert.are.same({ "4096", "1024", "10" }, { setting(hi), setting(lo), setting(odd) })
        end
        assert.is_true(odd:remove())

        if not fs.access("/usr/bin/taskset", "x") then
          pending("taskset (util-linux) is missing: cannot pin both spinners to one CPU")
          hi:remove() lo:remove()
          return
        end
        -- both on CPU 0: contention is what shares divide
        local a = spawn_in(hi, { "/usr/bin/taskset", "-c", "0", FIXTURES .. "cpuspin", "1.5" })
        local b = spawn_in(lo, { "/usr/bin/taskset", "-c", "0", FIXTURES .. "cpuspin", "1.5" })
        assert.are.equal(0, a:wait(10000).code)
        assert.are.equal(0, b:wait(10000).code)
        local th, tl = hi:usage().cpu_seconds, lo:usage().cpu_seconds
        print(string.format("\n  cpu time with weights 400:100 on one CPU: %.3f s : %.3f s (%.2fx)", th, tl, th / tl))
        assert.is_true(th / tl > 1.5, string.format("ratio %.2f", th / tl))
        assert.is_true(hi:remove())
        assert.is_true(lo:remove())
      end)
    end)

    it("stops a forking process at the pids limit, and kill_all takes the whole tree", function()
      if real_reason then pending(real_reason) return end
      local why = need(layout, "pids")
      if why then pending(why) return end
      core.run(function()
        local cg = assert(cgroup.create(layout, "pids.test", { pids = 5 }))
        local p = spawn_in(cg, { FIXTURES .. "forkn", "10" }, { stdout = "pipe" })
        local out = ""
        while not out:find("\n.*\n") do out = out .. assert(p.stdout:read(5000)) end
        -- the forker is one of the five
        assert.are.equal("forked 4\nfork failed: EAGAIN\n", out)
        assert.are.equal(5, #cg:pids())
        assert.is_true(cg:kill_all())
        assert.are.same({}, cg:pids())
        assert.are.equal("SIGKILL", p:wait(5000).signal)
        local dirs = cg:dirs()
        assert.is_true(cg:remove())
        for _, d in ipairs(dirs) do assert.is_nil(fs.stat(d)) end
        -- removing twice is fine
        assert.is_true(cg:remove())
      end)
    end)

    it("kills a tree of processes that left the process group, without limits", function()
      if real_reason then pending(real_reason) return end
      if not layout.track then pending("no hierarchy to track instances: " .. layout.track_reason) return end
      core.run(function()
        local cg = assert(cgroup.create(layout, "tree.test"))
        -- grandchildren in new sessions: a group kill would miss them
        local p = spawn_in(cg, { "/bin/sh", "-c",
          "setsid sleep 300 & setsid sleep 300 & echo started; exec sleep 300" }, { stdout = "pipe" })
        assert.are.equal("started\n", p.stdout:read(5000))
        local pids = cg:pids()
        assert.are.equal(3, #pids)
        for _, pid in ipairs(pids) do
          assert.truthy(pid_in_cgroups(pid):find(base .. "/tree.test", 1, true))
        end
        assert.is_true(cg:kill_all())
        for _, pid in ipairs(pids) do
          local stat = slurp("/proc/" .. pid .. "/stat")
          assert.is_true(stat == nil or stat:match("%) (%S)") == "Z")
        end
        -- through cgroup.kill where there is one: such a group is not kept
        local has_kill
        for _, d in ipairs(cg:dirs()) do has_kill = has_kill or (core.fs.stat(d .. "/cgroup.kill") and true) end
        assert.are.equal(has_kill, cg.killed_whole)
        assert.are.equal("SIGKILL", p:wait(5000).signal)
        assert.is_true(cg:remove())
        local fds, into = cg:proc_fds()
        assert.are.same({}, fds) -- nothing left to open
        assert.is_nil(into)
      end)
    end)

    it("is born in its cgroup2 group, or moves there where clone3 is refused", function()
      if real_reason then pending(real_reason) return end
      if not (layout.track and layout.track.version == 2) then pending("no cgroup2 hierarchy to track instances") return end
      local cg
      core.run(function() cg = assert(cgroup.create(layout, "born.test", {}, { accounting = false })) end)
      local dir = cg:dirs()[1]
      local rel = dir:sub(#layout.track.mount + 1)
      -- a Lua of its own: the filter stays with the process it is put on
      local script = string.format([[
        local core = require "tenement.core"
        core.run(function()
          local fd = assert(core.fs.open_fd(%q, "r"))
          local p = assert(core.proc.spawn { argv = { "/bin/cat", "/proc/self/cgroup" }, cgroup_into = fd })
          io.write(p.stdout:read(5000) or "")
          p:wait(5000)
        end)
      ]], dir)
      for _, how in ipairs { "", FIXTURES .. "noclone3 38 ", FIXTURES .. "noclone3 1 " } do
        local code, out, err = support.run(string.format("LUA_CPATH=%s %slua5.4 -e %s",
          support.quote(support.build .. "/lib/?.so"), how, support.quote(script)))
        assert.are.equal(0, code, err)
        assert.truthy(out:find("\n0::" .. rel .. "\n", 1, true) or out:find("^0::" .. rel .. "\n"), how .. ": " .. out)
      end
      core.run(function() assert.is_true(cg:remove()) end)
    end)

    it("puts a child that is PID 1 of new namespaces in every hierarchy of its cgroup", function()
      if real_reason then pending(real_reason) return end
      if not layout.track then pending("no hierarchy to track instances: " .. layout.track_reason) return end
      core.run(function()
        local limits = {}
        if layout.kinds.memory.hier then limits.memory_mb = 64 end
        if layout.kinds.pids.hier then limits.pids = 20 end
        local cg = assert(cgroup.create(layout, "ns.test", limits))
        local p = spawn_in(cg, { "/bin/sleep", "300" },
          { clone_flags = { "newpid", "newns" }, mount_proc = true })
        local lines = pid_in_cgroups(p.pid)
        for _, d in ipairs(cg:dirs()) do
          local rel
          for _, h in ipairs(layout.hierarchies) do
            if d:find(h.base, 1, true) == 1 then rel = h.path:gsub("/$", "") .. "/" .. base .. "/ns.test" end
          end
          assert.truthy(lines:find(rel .. "\n", 1, true) or lines:sub(-#rel) == rel, lines)
        end
        assert.is_true(cg:kill_all())
        assert.are.equal("SIGKILL", p:wait(5000).signal)
        assert.is_true(cg:remove())
      end)
    end)

    it("reports a cgroup that cannot be removed while processes are inside", function()
      if real_reason then pending(real_reason) return end
      if not layout.track then pending("no hierarchy to track instances: " .. layout.track_reason) return end
      core.run(function()
        local cg = assert(cgroup.create(layout, "busy.test"))
        local p = spawn_in(cg, { "/bin/sleep", "300" })
        local ok, err = cg:remove(50)
        assert.is_nil(ok)
        assert.truthy(err:find("EBUSY", 1, true), err)
        assert.truthy(err:find("processes: " .. p.pid, 1, true), err)
        assert.is_true(cg:kill_all())
        assert.is_true(cg:remove())
      end)
    end)

    it("cleans up the cgroups of a ten that died, and replaces a leftover of the same name", function()
      if real_reason then pending(real_reason) return end
      if not layout.track then pending("no hierarchy to track instances: " .. layout.track_reason) return end
      core.run(function()
        local old = assert(cgroup.create(layout, "stale.one", { pids = 50 }))
        local p1 = spawn_in(old, { "/bin/sleep", "300" })
        local again = assert(cgroup.create(layout, "stale.two", {}))
        local p2 = spawn_in(again, { "/bin/sleep", "300" })
        -- same name again: what ran there is killed first
        local fresh = assert(cgroup.create(layout, "stale.two", {}))
        assert.are.equal("SIGKILL", p2:wait(5000).signal)
        assert.truthy(table.concat(fresh.notes, "\n"):find("removed a leftover cgroup", 1, true))

        local removed, failures = cgroup.cleanup_stale(layout, "stale.")
        assert.are.same({ "stale.one", "stale.two" }, removed)
        assert.are.same({}, failures)
        assert.are.equal("SIGKILL", p1:wait(5000).signal)
        for _, d in ipairs(old:dirs()) do assert.is_nil(fs.stat(d)) end
        -- a prefix that matches nothing touches nothing
        local keep = assert(cgroup.create(layout, "other", {}))
        assert.are.same({}, (cgroup.cleanup_stale(layout, "stale.")))
        assert.is_truthy(fs.stat(keep:dirs()[1]))
        assert.is_true(keep:remove())
      end)
    end)

    it("refuses a limit no hierarchy can enforce, with the reason", function()
      local l = cgroup.detect { base = base, disable = { memory = true } }
      local cg, err = cgroup.create(l, "refused", { memory_mb = 64, cpu_shares = 100 })
      assert.is_nil(cg)
      assert.are.equal("memory_limit_mb = 64 cannot be enforced: memory controller disabled by the caller", err)
      -- nothing was created for the refused instance
      for _, h in ipairs(l.hierarchies) do
        if h.base then assert.is_nil(fs.stat(h.base .. "/refused")) end
      end
    end)

    it("explains a missing memory controller from this host's mounts", function()
      -- this host without its v1 memory hierarchy: only cgroup2 is left to ask
      local dir = support.tmpdir()
      local kept = {}
      for line in assert(fs.read("/proc/self/mountinfo")):gmatch("[^\n]+") do
        if not line:match(" %- cgroup .*[,%s]memory") then kept[#kept + 1] = line end
      end
      support.write(dir .. "/mountinfo", table.concat(kept, "\n") .. "\n")
      local l = cgroup.detect { base = base, mountinfo_file = dir .. "/mountinfo" }
      assert.is_nil(l.kinds.memory.hier)
      local v2 = l.v2
      if v2 and v2.controllers.memory then
        pending("this host's cgroup2 hierarchy has a memory controller")
        support.cleanup()
        return
      end
      local cg, err = cgroup.create(l, "refused", { memory_mb = 64 })
      assert.is_nil(cg)
      print("\n  " .. err)
      if v2 and v2.reason then
        -- not root: ten could not make cgroups there anyway
        assert.truthy(err:find("^memory_limit_mb = 64 cannot be enforced: the cgroup2 hierarchy at " ..
          v2.mount:gsub("%p", "%%%0") .. " is unusable: cannot create cgroups in "), err)
      elseif v2 then
        assert.truthy(err:find("^memory_limit_mb = 64 cannot be enforced: no memory controller in the " ..
          "cgroup2 hierarchy at " .. v2.mount:gsub("%p", "%%%0")), err)
      end
      assert.truthy(err:find("and no v1 memory hierarchy mounted$"), err)
      support.cleanup()
    end)

    it("raises on misuse", function()
      assert.has_error(function() cgroup.create(layout, "a/b") end)
      assert.has_error(function() cgroup.create(layout, "..") end)
      assert.has_error(function() cgroup.create(layout, "cgroup.procs") end)
      assert.has_error(function() cgroup.create(layout, "x", { memory = 5 }) end)
      assert.has_error(function() cgroup.create(layout, "x", { memory_mb = "5" }) end)
      assert.has_error(function() cgroup.create(layout, "x", { pids = 0 }) end)
      assert.has_error(function() cgroup.detect { base = "/abs" } end)
    end)
  end)

  -- What a whole `ten serve` leaves in the cgroup hierarchies once it is
  -- gone: nothing, whether it stopped on SIGTERM or was killed outright (its
  -- keeper cleans up), and even when no server ever starts on that data
  -- directory again (a test's, a host's that was retired).
  describe("after ten serve", function()
    local dir, cfg, log, pid

    local function alive(p)
      local stat = fs.read("/proc/" .. p .. "/stat")
      return stat ~= nil and stat:match("%) (%S)") ~= "Z"
    end

    local function wait(pred, ms)
      local deadline = os.time() + ms / 1000
      repeat
        if pred() then return true end
        support.sleep(0.05)
      until os.time() > deadline
      return pred()
    end

    -- the cgroup directories ten serve says it uses, from its log
    local function bases()
      local out = {}
      for line in assert(fs.read(log)):gmatch("[^\n]+") do
        local d = line:match("limits: cgroup v%d, in (/%S+)") or line:match("tracked in cgroup %S+ (/%S+)")
          or line:match("tracked in cgroup v1 %S+ (/%S+)")
        if d then out[d] = true end
      end
      local list = {}
      for d in pairs(out) do list[#list + 1] = d end
      table.sort(list)
      return list
    end

    before_each(function()
      if real_reason then return end
      dir = support.tmpdir()
      cfg, log = dir .. "/tenement.toml", dir .. "/serve.log"
      support.write(cfg, table.concat({
        "[settings]",
        string.format("data_dir = %q", dir .. "/data"),
        "port = " .. support.free_port(),
        "stop_timeout = 2",
        "[service.lim]",
        string.format("command = %q", support.fixture("backend")),
        string.format("socket = %q", dir .. "/sock/{name}-{id}.sock"),
        'isolation = "process"',
        "startup_timeout = 1",
        'restart = "never"',
        "pids_limit = 50",
        "memory_limit_mb = 64",
        "[service.free]",
        string.format("command = %q", support.fixture("backend")),
        string.format("socket = %q", dir .. "/sock/{name}-{id}.sock"),
        'isolation = "process"',
        "startup_timeout = 1",
        'restart = "never"',
      }, "\n") .. "\n")
      pid = support.ten_serve(cfg, log)
      assert.is_true(wait(function() return support.ten_run { "ps", "--config", cfg } == 0 end, 5000),
        "ten serve did not come up")
      assert.are.equal(0, (support.ten_run { "spawn", "lim:a", "--config", cfg }))
      assert.are.equal(0, (support.ten_run { "spawn", "free:a", "--config", cfg }))
    end)

    after_each(function()
      if pid and alive(pid) then os.execute("kill -KILL " .. pid) end
      for _, d in ipairs(dir and log and fs.stat(log) and bases() or {}) do
        for _, sub in ipairs(fs.readdir(d) or {}) do
          if fs.stat(d .. "/" .. sub .. "/cgroup.procs") then fs.rmdir(d .. "/" .. sub) end
        end
        fs.rmdir(d)
      end
      support.cleanup()
    end)

    local function left_behind(list)
      local left = {}
      for _, d in ipairs(list) do
        if fs.stat(d) then
          local subs = {}
          for _, n in ipairs(fs.readdir(d) or {}) do
            if fs.stat(d .. "/" .. n .. "/cgroup.procs") then subs[#subs + 1] = n end
          end
          left[#left + 1] = d .. (#subs > 0 and (" (" .. table.concat(subs, " ") .. ")") or "")
        end
      end
      return left
    end

    it("stopped by SIGTERM, leaves no cgroup, not even the base of its instances", function()
      if real_reason then pending(real_reason) return end
      local list = bases()
      if #list == 0 then pending("no instance cgroups on this host (see the serve log)") return end
      os.execute("kill -TERM " .. pid)
      assert.is_true(wait(function() return not alive(pid) end, 10000), "ten serve did not stop")
      wait(function() return #left_behind(list) == 0 end, 3000)
      assert.are.same({}, left_behind(list))
    end)

    it("killed outright, leaves no cgroup once its keeper is done", function()
      if real_reason then pending(real_reason) return end
      local list = bases()
      if #list == 0 then pending("no instance cgroups on this host (see the serve log)") return end
      os.execute("kill -KILL " .. pid)
      wait(function() return #left_behind(list) == 0 end, 5000)
      assert.are.same({}, left_behind(list))
    end)
  end)

  -- The cgroup2 path where this host's cgroup2 has no controllers: a fake
  -- cgroupfs in a temp dir whose mkdir creates the control files, whose
  -- subtree_control refuses controllers while the cgroup holds processes
  -- (the "no internal processes" rule), and that records what was written.
  describe("cgroup2 on a fake cgroupfs", function()
    local root, ffs, mypid

    local CONTROL = {
      ["cgroup.procs"] = "", ["cgroup.subtree_control"] = "", ["cgroup.kill"] = "",
      ["memory.max"] = "max", ["memory.swap.max"] = "max", ["memory.current"] = "12345",
      ["memory.events"] = "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n",
      ["cpu.weight"] = "100", ["cpu.stat"] = "usage_usec 2500000\nuser_usec 1\n", ["pids.max"] = "max",
    }

    local function make_fake()
      local f = setmetatable({}, { __index = fs })
      function f.mkdir(path, mode, parents)
        local existed = fs.stat(path)
        local ok, err, code = fs.mkdir(path, mode, parents)
        if not ok or existed then return ok, err, code end
        local parent = path:match("^(.*)/[^/]+$")
        for name, text in pairs(CONTROL) do support.write(path .. "/" .. name, text) end
        -- a child is offered what its parent hands down
        support.write(path .. "/cgroup.controllers",
          ((fs.read(parent .. "/cgroup.subtree_control") or ""):gsub("%+", "")))
        return true
      end
      function f.rmdir(path)
        for name in pairs(CONTROL) do fs.unlink(path .. "/" .. name) end
        fs.unlink(path .. "/cgroup.controllers")
        return fs.rmdir(path)
      end
      function f.put(path, data)
        local dir, file = path:match("^(.*)/([^/]+)$")
        if not fs.stat(path) then return fs.put(path, data) end
        if file == "cgroup.subtree_control" then
          local procs = fs.read(dir .. "/cgroup.procs") or ""
          if dir ~= root and procs:find("%d") then
            return nil, "write " .. path .. ": EBUSY: resource busy or locked", "EBUSY"
          end
          local cur = {}
          for w in (fs.read(path) or ""):gmatch("%S+") do cur[w:gsub("^%+", "")] = true end
          for w in data:gmatch("%S+") do cur[w:gsub("^%+", "")] = true end
          local list = {}
          for c in pairs(cur) do list[#list + 1] = c end
          table.sort(list)
          return fs.put(path, table.concat(list, " "))
        elseif file == "cgroup.procs" then
          -- moving a process takes it out of the cgroup it was in
          local parent = dir:match("^(.*)/[^/]+$")
          local left = (fs.read(parent .. "/cgroup.procs") or ""):gsub("%f[%d]" .. data .. "%f[%D]%s*", "")
          support.write(parent .. "/cgroup.procs", left)
          support.write(path, data)
          return true
        end
        support.write(path, data)
        return true
      end
      return f
    end

    before_each(function()
      root = support.tmpdir() .. "/unified"
      mypid = core.proc.getpid()
      assert(fs.mkdir(root .. "/system.slice/ten.service"))
      support.write(root .. "/cgroup.controllers", "cpuset cpu io memory hugetlb pids")
      support.write(root .. "/cgroup.subtree_control", "cpu memory pids")
      local own = root .. "/system.slice/ten.service"
      support.write(root .. "/system.slice/cgroup.controllers", "cpu memory pids")
      support.write(own .. "/cgroup.controllers", "cpu memory pids")
      support.write(own .. "/cgroup.subtree_control", "")
      support.write(own .. "/cgroup.procs", tostring(mypid) .. "\n")
      support.write(root .. "/../cgroup", "0::/system.slice/ten.service\n")
      support.write(root .. "/../mountinfo",
        "41 31 0:38 / " .. root .. " rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n" ..
        "50 31 0:40 / /elsewhere rw - ext4 /dev/vda rw\n")
      ffs = make_fake()
    end)
    after_each(support.cleanup)

    local function detect(opts)
      opts = opts or {}
      opts.fs = ffs
      opts.cgroup_file = root .. "/../cgroup"
      opts.mountinfo_file = root .. "/../mountinfo"
      return cgroup.detect(opts)
    end

    it("serves every limit from cgroup2 and writes v2 files", function()
      core.run(function()
        local layout = detect()
        local own = root .. "/system.slice/ten.service"
        for _, kind in ipairs(cgroup.KINDS) do
          assert.are.equal(2, layout.kinds[kind].version)
        end
        assert.are.equal(layout.v2, layout.track)
        assert.are.same({
          "cgroup2 at " .. root .. ", ten in /system.slice/ten.service, controllers: cpu memory pids",
          "memory limits: cgroup v2, in " .. own .. "/tenement",
          "cpu limits: cgroup v2, in " .. own .. "/tenement",
          "pids limits: cgroup v2, in " .. own .. "/tenement",
          "instance processes tracked in cgroup v2 " .. own .. "/tenement",
        }, cgroup.describe(layout))

        local cg = assert(cgroup.create(layout, "api.prod", { memory_mb = 256, cpu_shares = 20000, pids = 100 }))
        local dir = own .. "/tenement/api.prod"
        assert.are.same({ dir }, cg:dirs())
        assert.are.equal(493, fs.stat(dir).mode) -- 0755
        -- ten lived in its own cgroup, which then could not hand controllers down
        assert.are.same({
          "moved ten into " .. own .. "/tenement-server so that " .. own .. " can hand controllers down",
          "cpu_shares = 20000 is outside 1-10000: using 10000",
        }, cg.notes)
        assert.are.equal(tostring(mypid), slurp(own .. "/tenement-server/cgroup.procs"))

        -- a ten started again from inside that leaf uses the same base
        support.write(root .. "/../cgroup", "0::/system.slice/ten.service/tenement-server\n")
        assert.are.equal(own .. "/tenement", detect().v2.base)
        assert.are.equal("cpu memory pids", slurp(own .. "/cgroup.subtree_control"))
        assert.are.equal("cpu memory pids", slurp(own .. "/tenement/cgroup.subtree_control"))
        assert.are.equal("268435456", slurp(dir .. "/memory.max"))
        assert.are.equal("0", slurp(dir .. "/memory.swap.max"))
        assert.are.equal("10000", slurp(dir .. "/cpu.weight"))
        assert.are.equal("100", slurp(dir .. "/pids.max"))
        assert.are.same({ memory_bytes = 12345, cpu_seconds = 2.5 }, cg:usage())
        assert.are.equal(1, cg:oom_kills())
        assert.are.equal(256, cg:memory_limit_mb())

        -- cgroup2: no fd to write "0" to, the directory to be born into
        local fds, into = assert(cg:proc_fds())
        assert.are.same({}, fds)
        assert.is_number(into)
        cg:close_fds()
        cg:close_fds()

        -- kill_all writes cgroup.kill only to a group with processes left
        -- (the real cgroup specs show it kills them): a group killed that
        -- way is never used for another start
        assert.is_true(cg:kill_all())
        assert.are.equal("", slurp(dir .. "/cgroup.kill"))
        assert.is_nil(cg.killed_whole)
        assert.is_true(cg:remove())
        assert.is_nil(fs.stat(dir))

        -- a second instance reuses the prepared base
        local two = assert(cgroup.create(layout, "api.two"))
        assert.are.same({}, two.notes)
        assert.are.same({ memory_bytes = 12345, cpu_seconds = 2.5 }, two:usage())
        assert.is_true(two:remove())
      end)
    end)

    it("says when other processes keep ten's cgroup from handing controllers down", function()
      core.run(function()
        local own = root .. "/system.slice/ten.service"
        support.write(own .. "/cgroup.procs", "1\n" .. mypid .. "\n")
        local layout = detect()
        local cg, err = cgroup.create(layout, "api.prod", { memory_mb = 64 })
        assert.is_nil(cg)
        assert.truthy(err:find("other processes than ten live in " .. own:gsub("%p", "%%%0") ..
          ": run ten in a cgroup of its own %(systemd: a service with Delegate=yes%)"), err)
      end)
    end)

    it("refuses what cgroup2 does not offer and tracks without controllers", function()
      core.run(function()
        local own = root .. "/system.slice/ten.service"
        support.write(own .. "/cgroup.controllers", "hugetlb")
        local layout = detect { base = "x/y" }
        local cg, err = cgroup.create(layout, "api.prod", { pids = 10 })
        assert.is_nil(cg)
        assert.are.equal("pids limit = 10 cannot be enforced: no pids controller in the cgroup2 hierarchy at " ..
          root .. " (ten's cgroup /system.slice/ten.service offers: hugetlb) and no v1 pids hierarchy mounted", err)
        -- no limits: still a cgroup to find the processes in, and no move of ten
        cg = assert(cgroup.create(layout, "api.prod"))
        assert.are.same({ own .. "/x/y/api.prod" }, cg:dirs())
        assert.are.same({}, cg.notes)
        assert.are.equal(tostring(mypid), slurp(own .. "/cgroup.procs"))
        assert.are.same({ cpu_seconds = 2.5 }, cg:usage())
        assert.is_nil(cg:oom_kills())
        assert.is_true(cg:remove())
      end)
    end)

    it("finds ten's cgroup under a mount of part of the hierarchy, or says it cannot", function()
      support.write(root .. "/../mountinfo", "41 31 0:38 /system.slice " .. root .. " rw - cgroup2 cgroup2 rw\n")
      local layout = detect()
      assert.are.equal(root .. "/ten.service", layout.v2.own)
      support.write(root .. "/../mountinfo", "41 31 0:38 /other " .. root .. " rw - cgroup2 cgroup2 rw\n")
      layout = detect()
      assert.is_nil(layout.track)
      assert.are.equal("ten's cgroup /system.slice/ten.service is outside the part of the hierarchy " ..
        "mounted at " .. root .. " (/other)", layout.v2.reason)
      assert.truthy(layout.kinds.memory.reason:find("is unusable: ten's cgroup", 1, true))
    end)

    it("works with no cgroups at all: no limits allowed, no cgroup made", function()
      support.write(root .. "/../mountinfo", "50 31 0:40 / /elsewhere rw - ext4 /dev/vda rw\n")
      local layout = detect()
      assert.is_nil(layout.track)
      local cg = assert(cgroup.create(layout, "api.prod"))
      assert.are.same({}, cg:dirs())
      assert.are.same({ "no cgroup for api.prod: no usable cgroup hierarchy (neither cgroup2 nor v1 pids, " ..
        "memory, cpuacct, cpu or freezer)" }, cg.notes)
      assert.are.same({}, cg:usage())
      assert.are.same({}, assert(cg:proc_fds()))
      assert.is_true(cg:kill_all())
      assert.is_true(cg:remove())
      local none, err = cgroup.create(layout, "api.prod", { memory_mb = 1 })
      assert.is_nil(none)
      assert.are.equal("memory_limit_mb = 1 cannot be enforced: no cgroup2 hierarchy mounted and no v1 " ..
        "memory hierarchy mounted", err)
    end)

    it("reports unreadable /proc files", function()
      local layout = cgroup.detect { cgroup_file = root .. "/missing", mountinfo_file = root .. "/../mountinfo" }
      local want = "cannot read open " .. root .. "/missing: ENOENT"
      assert.are.equal(want, layout.kinds.memory.reason:sub(1, #want))
      assert.truthy(cgroup.describe(layout)[1]:find("cannot read", 1, true))
    end)
  end)
end)
