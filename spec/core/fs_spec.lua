-- core.fs.watch: names appearing in a directory wake the tasks waiting for
-- them (inotify), on real directories of this machine.
local core = require "tenement.core"
local fs = core.fs

local function tmpdir()
  local dir = os.tmpname()
  os.remove(dir)
  assert(fs.mkdir(dir, tonumber("700", 8)))
  return dir
end

local function until_waiting(t)
  for _ = 1, 1000 do
    if t:status() == "waiting" then return end
    coroutine.yield()
  end
  error("task did not reach its wait")
end

-- Writes dir/name and returns once the watch's callbacks for it have run: a
-- second watch of the same directory wakes this task from the same event.
local function touch(dir, name)
  local mine = assert(fs.watch(dir))
  local me = core.current()
  mine:wake_on(name, me)
  assert(fs.write(dir .. "/" .. name, "x"))
  local woke = table.pack(core.park(10000))
  mine:close()
  assert(woke.n == 0, "the event did not come")
end

describe("core.fs.watch", function()
  local dir
  before_each(function() dir = tmpdir() end)
  after_each(function() fs.rmtree(dir) end)

  it("wakes the task waiting for a name when it appears, and only then", function()
    core.run(function()
      local w = assert(fs.watch(dir))
      local waiter = core.spawn(function() return table.pack(core.park(60000)) end)
      until_waiting(waiter)
      w:wake_on("app.sock", waiter)
      touch(dir, "other")
      assert.are.equal("waiting", waiter:status())
      assert.is_false(w:take(waiter))
      assert(fs.write(dir .. "/app.sock", "x"))
      local ok, got = waiter:join(5000)
      assert.is_true(ok)
      assert.are.same({ n = 0 }, got) -- woken, not timed out
      assert.is_true(w:take(waiter))
      assert.is_false(w:take(waiter)) -- taken once
      w:close()
    end)
  end)

  it("cuts a process wait short, and keeps the news for a task that was busy", function()
    core.run(function()
      local w = assert(fs.watch(dir))
      local p = assert(core.proc.spawn { argv = { "/bin/sleep", "100" } })
      local go, in_wait = false, false
      local waiter = core.spawn(function()
        w:wake_on("s", core.current())
        -- busy in a wait the watch may not cut short
        while not go do core.sleep(1) end
        local busy_news = w:take(core.current())
        in_wait = true
        local st, err = p:wait(60000)
        return busy_news, st, err
      end)
      until_waiting(waiter)
      touch(dir, "s")
      go = true
      while not in_wait do core.sleep(1) end
      until_waiting(waiter) -- in p:wait: this event ends it
      assert(fs.write(dir .. "/s", "2"))
      local ok, busy_news, st, err = waiter:join(5000)
      assert.is_true(ok)
      assert.is_true(busy_news)
      assert.is_nil(st)
      assert.is_nil(err)
      assert.are.equal("running", p:status())
      p:kill("KILL")
      p:wait(5000)
      w:close()
    end)
  end)

  it("keeps each task's news its own, and forgets a name only for the task that holds it", function()
    core.run(function()
      local w = assert(fs.watch(dir))
      local a = core.spawn(function() core.park(60000) end)
      local b = core.spawn(function() core.park(60000) end)
      until_waiting(a)
      until_waiting(b)
      w:wake_on("n", a)
      w:wake_on("n", b) -- b holds "n" now (a restart while the old start ends)
      touch(dir, "n")
      assert.is_false(w:take(a))
      assert.is_true(w:take(b))
      w:forget("n", a) -- not a's any more: b keeps it
      touch(dir, "n")
      assert.is_true(w:take(b))
      w:forget("n", b)
      touch(dir, "n")
      assert.is_false(w:take(b))
      core.wake(a)
      core.wake(b)
      a:join()
      b:join()
      w:close()
      assert.has_error(function() w:take(a) end, "the watch is closed")
    end)
  end)

  it("says when the directory itself went away, and why one cannot be watched", function()
    core.run(function()
      local w = assert(fs.watch(dir))
      local waiter = core.spawn(function() return table.pack(core.park(60000)) end)
      until_waiting(waiter)
      w:wake_on("app.sock", waiter)
      assert.is_false(w:moved())
      fs.rmtree(dir)
      local ok, got = waiter:join(5000)
      assert.is_true(ok)
      assert.are.same({ n = 0 }, got) -- every waiter looks again
      assert.is_true(w:moved())
      w:close()
      -- a chmod of the directory is no move
      assert(fs.mkdir(dir, tonumber("700", 8)))
      w = assert(fs.watch(dir))
      assert(fs.chmod(dir, tonumber("755", 8)))
      touch(dir, "after-chmod")
      assert.is_false(w:moved())
      w:close()
      fs.rmtree(dir)
      local none, err = fs.watch(dir)
      assert.is_nil(none)
      assert.matches("ENOENT", err)
      assert(fs.mkdir(dir, tonumber("700", 8)))
    end)
  end)
end)
