-- The scheduler: tasks on coroutines over one libuv loop.
local core = require "tenement.core"

describe("core scheduler", function()
  it("runs a task and returns its results", function()
    local a, b = core.run(function(x, y) return x + y, "done" end, 40, 2)
    assert.are.equal(42, a)
    assert.are.equal("done", b)
  end)

  it("re-raises the main task's error with the task's traceback", function()
    local ok, err = pcall(core.run, function()
      core.sleep(1)
      error("boom in task")
    end)
    assert.is_false(ok)
    assert.matches("boom in task", err)
    assert.matches("stack traceback", err)
  end)

  it("keeps a table error object intact", function()
    local obj = { code = "E42" }
    local ok, err = pcall(core.run, function() error(obj) end)
    assert.is_false(ok)
    assert.are.equal(obj, err)
  end)

  it("interleaves sleeping tasks by their deadlines, not their start order", function()
    local order = {}
    core.run(function()
      local a = core.spawn(function() core.sleep(30); order[#order + 1] = "a" end)
      local b = core.spawn(function() core.sleep(5); order[#order + 1] = "b" end)
      local c = core.spawn(function() order[#order + 1] = "c" end)
      assert.is_true((a:join()))
      assert.is_true((b:join()))
      assert.is_true((c:join()))
    end)
    assert.are.same({ "c", "b", "a" }, order)
  end)

  it("sleep waits at least the time asked for", function()
    core.run(function()
      local t0 = core.hrtime()
      core.sleep(20)
      assert.is_true(core.hrtime() - t0 >= 19 * 1e6)
    end)
  end)

  it("join returns the results of a finished task and the error of a failed one", function()
    core.run(function()
      local good = core.spawn(function() core.sleep(1); return 1, nil, 3 end)
      local ok, x, y, z = good:join()
      assert.is_true(ok)
      assert.are.equal(1, x)
      assert.is_nil(y)
      assert.are.equal(3, z)
      -- joining again gives the same answer
      assert.are.same({ true, 1, nil, 3 }, { good:join() })

      local seen
      core.on_error(function(trace) seen = trace end)
      local bad = core.spawn(function() error("nope") end)
      local ok2, err = bad:join()
      assert.is_nil(ok2)
      assert.matches("nope", err)
      assert.are.equal("failed", bad:status())
      assert.matches("nope", seen)
      core.on_error(nil)
    end)
  end)

  it("join with a timeout gives nil, 'timeout' and does not disturb the joiner later", function()
    core.run(function()
      local slow = core.spawn(function() core.sleep(50); return "late" end)
      local ok, err = slow:join(5)
      assert.is_nil(ok)
      assert.are.equal("timeout", err)
      -- parked again on something else: the slow task's end must not wake this park
      local v, perr = core.park(100)
      assert.is_nil(v)
      assert.are.equal("timeout", perr)
      assert.are.same({ true, "late" }, { slow:join() })
    end)
  end)

  it("a join that timed out or was woken leaves nothing behind in the joined task", function()
    core.run(function()
      local long = core.spawn(function() core.park() end)
      core.sleep(1)
      local function joins(n)
        for _ = 1, n do assert.are.same({ nil, "timeout" }, { long:join(0) }) end
      end
      joins(100)
      collectgarbage(); collectgarbage()
      local before = collectgarbage("count")
      joins(20000)
      collectgarbage(); collectgarbage()
      -- each timed-out join used to stay listed (16 bytes or more each)
      assert.is_true(collectgarbage("count") - before < 100)
      -- woken instead of timed out, likewise
      local me = core.current()
      local waker = core.spawn(function()
        for _ = 1, 20000 do
          local tries = 0
          repeat core.sleep(0); tries = tries + 1 until core.wake(me, nil, "woken") or tries > 10
        end
      end)
      collectgarbage(); collectgarbage()
      before = collectgarbage("count")
      for _ = 1, 20000 do assert.are.same({ nil, "woken" }, { long:join() }) end
      waker:join()
      collectgarbage(); collectgarbage()
      assert.is_true(collectgarbage("count") - before < 100)
      assert.is_true(core.wake(long))
      assert.are.same({ true }, { long:join() })
    end)
  end)

  it("a join cut short by core.wake still holds the task it joins", function()
    core.run(function()
      local weak = setmetatable({}, { __mode = "v" })
      local joiner = core.spawn(function()
        -- the joined task's only reference is the join's own stack slot
        local ok, v = core.spawn(function()
          weak[1] = core.current()
          core.park()
          return "t-done"
        end):join()
        return ok, v
      end)
      -- a helper, so that no slot of this task keeps the joined task's handle
      local function joined_status() return weak[1] and weak[1]:status() end
      repeat core.sleep(1) until joiner:status() == "waiting" and joined_status() == "waiting"
      core.spawn(function()
        -- in this order on the next turn: the joined task ends, a collection,
        -- then the joiner reads the joined task's state
        assert.is_true(core.wake(weak[1]))
        core.spawn(function() collectgarbage(); collectgarbage() end)
        assert.is_true(core.wake(joiner))
      end)
      -- the wake used to clear the joiner's stack, handle included: the
      -- collection freed the task and the joiner read freed memory
      assert.are.same({ true, true, "t-done" }, { joiner:join() })
    end)
  end)

  it("a task cannot join itself", function()
    core.run(function()
      local me = core.current()
      assert.has_error(function() me:join() end, "a task cannot join itself")
    end)
  end)

  it("park and wake pass values and never run the woken task synchronously", function()
    core.run(function()
      local log = {}
      local sleeper = core.spawn(function()
        local a, b = core.park()
        log[#log + 1] = "woke " .. a .. " " .. b
      end)
      core.sleep(1)
      assert.are.equal("waiting", sleeper:status())
      assert.is_true(core.wake(sleeper, "x", "y"))
      log[#log + 1] = "after wake"
      sleeper:join()
      assert.are.same({ "after wake", "woke x y" }, log)
      -- waking a finished task does nothing
      assert.is_false(core.wake(sleeper, 1))
    end)
  end)

  it("does not let wake interrupt a task that waits in an operation", function()
    core.run(function()
      local t = core.spawn(function() core.sleep(20); return "slept" end)
      core.sleep(1)
      assert.is_false(core.wake(t, "intruder"))
      assert.are.same({ true, "slept" }, { t:join() })
    end)
  end)

  it("park times out", function()
    core.run(function()
      local t0 = core.now()
      local v, err = core.park(10)
      assert.is_nil(v)
      assert.are.equal("timeout", err)
      assert.is_true(core.now() - t0 >= 9)
    end)
  end)

  it("a task that polls with sleep(0) or a zero timeout lets ready tasks run", function()
    core.run(function()
      -- a timer of 0 started from a timer's callback was due in the same
      -- timer phase of libuv: the poller ran again and again, the ready
      -- task never (100% CPU, forever)
      for _, wait in ipairs({
        function() core.sleep(0) end,
        function() core.park(0) end,
      }) do
        local flag = false
        core.sleep(1) -- the loop is in its timer phase from here on
        core.spawn(function() flag = true end)
        local n = 0
        while not flag and n < 1000 do wait(); n = n + 1 end
        assert.is_true(flag)
        assert.is_true(n < 10)
      end
    end)
  end)

  it("a bare coroutine.yield in a task gives other tasks a turn", function()
    local order = {}
    core.run(function()
      local other = core.spawn(function() order[#order + 1] = "other" end)
      coroutine.yield()
      order[#order + 1] = "main"
      other:join()
    end)
    assert.are.same({ "other", "main" }, order)
  end)

  it("refuses waiting operations outside a task with a clear error", function()
    assert.has_error(function() core.sleep(1) end)
    local ok, err = pcall(core.sleep, 1)
    assert.is_false(ok)
    assert.matches("must run inside a task", err)
    -- a plain coroutine inside a task is not a task either
    core.run(function()
      local co = coroutine.wrap(function() return pcall(core.park, 1) end)
      local ok2, err2 = co()
      assert.is_false(ok2)
      assert.matches("must run inside a task", err2)
    end)
  end)

  it("core.run cannot be nested", function()
    core.run(function()
      local ok, err = pcall(core.run, function() end)
      assert.is_false(ok)
      assert.matches("inside a task", err)
    end)
  end)

  it("reports a main task that can never finish instead of hanging", function()
    local ok, err = pcall(core.run, function() core.park() end)
    assert.is_false(ok)
    assert.matches("can never happen", err)
  end)

  it("runs <close> variables of a task that failed", function()
    local closed = false
    local ok = pcall(core.run, function()
      local guard <close> = setmetatable({}, { __close = function() closed = true end }) -- luacheck: ignore 211 (its __close is the point)
      core.sleep(1)
      error("fail with a guard")
    end)
    assert.is_false(ok)
    assert.is_true(closed)
  end)

  it("runs 10,000 tasks and leaves none alive", function()
    local before
    local sum = 0
    core.run(function()
      before = core.tasks()
      local tasks = {}
      for i = 1, 10000 do
        tasks[i] = core.spawn(function() core.sleep(i % 3); sum = sum + i end)
      end
      for i = 1, #tasks do tasks[i]:join() end
    end)
    assert.are.equal(10000 * 10001 // 2, sum)
    assert.are.equal(before - 1, core.tasks()) -- the main task ended too
  end)

  it("clocks move forward", function()
    core.run(function()
      local n0, h0, w0 = core.now(), core.hrtime(), core.time()
      core.sleep(2)
      assert.is_true(core.now() > n0)
      assert.is_true(core.hrtime() > h0)
      assert.is_true(core.time() >= w0)
      assert.is_true(w0 > 1.6e9)
    end)
  end)
end)

local function my_pid()
  local f = assert(io.open("/proc/self/stat"))
  local pid = f:read("n")
  f:close()
  return pid
end

describe("core signals", function()
  it("delivers a signal to a waiting task", function()
    core.run(function()
      local w = core.signal("SIGUSR1")
      local waiter = core.spawn(function() return w:wait(2000) end)
      core.sleep(1)
      os.execute("kill -USR1 " .. my_pid())
      local ok, signum = waiter:join()
      assert.is_true(ok)
      assert.are.equal(10, signum)
      w:close()
    end)
  end)

  it("keeps a signal that arrived while nobody waited", function()
    core.run(function()
      local w <close> = core.signal("USR2")
      os.execute("kill -USR2 " .. my_pid())
      core.sleep(20)
      assert.are.equal(12, w:wait(10))
      local v, err = w:wait(5)
      assert.is_nil(v)
      assert.are.equal("timeout", err)
    end)
  end)

  it("closing a watcher wakes its waiter with nil, 'closed'", function()
    core.run(function()
      local w = core.signal("SIGHUP")
      local order = {}
      local waiter = core.spawn(function()
        local r = table.pack(w:wait())
        order[#order + 1] = "waiter"
        return table.unpack(r, 1, r.n)
      end)
      core.sleep(1)
      w:close()
      -- the waiter is woken, not run inside the close
      order[#order + 1] = "closer"
      w:close()
      assert.are.same({ true, nil, "closed" }, { waiter:join() })
      assert.are.same({ "closer", "waiter" }, order)
      assert.has_error(function() w:wait() end, "signal watcher is closed")
    end)
  end)

  it("rejects unknown signal names", function()
    assert.has_error(function() core.signal("SIGNOPE") end)
  end)
end)
