local core = require "tenement.core"
local sync = require "tenement.sync"

describe("sync.mailbox", function()
  it("delivers in order to a waiting taker", function()
    core.run(function()
      local mb = sync.mailbox()
      local got = {}
      local taker = core.spawn(function()
        for _ = 1, 3 do got[#got + 1] = mb:take() end
      end)
      core.sleep(1)
      mb:put("a"); mb:put("b")
      core.sleep(1)
      mb:put("c")
      taker:join()
      assert.are.same({ "a", "b", "c" }, got)
      assert.are.equal(0, mb:size())
    end)
  end)

  it("take times out when nothing comes", function()
    core.run(function()
      local mb = sync.mailbox()
      assert.are.same({ nil, "timeout" }, { mb:take(5) })
      mb:put(1)
      assert.are.equal(1, mb:take(5))
    end)
  end)
end)

describe("sync.event", function()
  it("releases every waiter with the value, and later waiters at once", function()
    core.run(function()
      local ev = sync.event()
      local results = {}
      local tasks = {}
      for i = 1, 100 do
        tasks[i] = core.spawn(function() results[i] = ev:wait() end)
      end
      core.sleep(1)
      ev:set("ready")
      for i = 1, 100 do tasks[i]:join() end
      for i = 1, 100 do assert.are.equal("ready", results[i]) end
      assert.are.equal("ready", ev:wait())
      ev:set("again") -- ignored: an event is set once
      assert.are.equal("ready", ev:wait())
    end)
  end)

  it("wait times out", function()
    core.run(function()
      local ev = sync.event()
      assert.are.same({ nil, "timeout" }, { ev:wait(5) })
      assert.is_false(ev:is_set())
    end)
  end)
end)
