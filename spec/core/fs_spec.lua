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
      assert(fs.write(dir .. "/other", "x"))
      core.sleep(20)
      assert.are.equal("waiting", waiter:status())
      assert.is_false(w:take("app.sock"))
      assert(fs.write(dir .. "/app.sock", "x"))
      local ok, got = waiter:join(5000)
      assert.is_true(ok)
      assert.are.same({ n = 0 }, got) -- woken, not timed out
      assert.is_true(w:take("app.sock"))
      assert.is_false(w:take("app.sock")) -- taken once
      w:close()
    end)
  end)

  it("cuts a process wait short, and keeps the news for a task that was busy", function()
    core.run(function()
      local w = assert(fs.watch(dir))
      local p = assert(core.proc.spawn { argv = { "/bin/sleep", "100" } })
      local waiter = core.spawn(function()
        w:wake_on("s", core.current())
        core.sleep(30) -- busy: sleep is not a wait the watch may cut short
        local busy_news = w:take("s")
        local st, err = p:wait(60000)
        return busy_news, st, err
      end)
      core.sleep(5)
      assert(fs.write(dir .. "/s", "1"))
      -- the first event came while it slept; this one ends its wait
      core.sleep(60)
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

  it("forgets a name given no task, and says why a directory cannot be watched", function()
    core.run(function()
      local w = assert(fs.watch(dir))
      w:wake_on("gone", core.current())
      w:wake_on("gone", nil)
      assert(fs.write(dir .. "/gone", "x"))
      core.sleep(20)
      assert.is_false(w:take("gone"))
      w:close()
      assert.has_error(function() w:take("gone") end, "the watch is closed")
      local none, err = fs.watch(dir .. "/missing")
      assert.is_nil(none)
      assert.matches("ENOENT", err)
    end)
  end)
end)
