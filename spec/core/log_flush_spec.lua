-- What a log reader has the store write before it reads (Server:flush_logs):
-- a real sink fed by real pipes, a real store.
local core = require "tenement.core"
local server = require "tenement.server"
local store = require "tenement.store"
local support = require "support"

local lb = core.logbuf
local PID = io.open("/proc/self/stat"):read("*l"):match("^(%d+)")

-- a pipe into ring, written from here
local function writer(ring)
  local r, w = assert(lb.pipe())
  local f = assert(io.open(("/proc/%s/fd/%d"):format(PID, w), "w"))
  assert(lb.close_fd(w))
  f:setvbuf("no")
  assert(ring:capture(r, "stdout"))
  return f
end

describe("Server:flush_logs", function()
  local dir
  before_each(function() dir = support.tmpdir() end)
  after_each(support.cleanup)

  -- A reader of one instance waited for every line a flood beside it had
  -- left waiting (100,000, over a second at the rate the store indexes).
  it("writes the waiting lines of the instance or service a reader names, or of all", function()
    core.run(function()
      local srv = server.new { settings = { data_dir = dir } }
      srv.store = assert(store.open(dir .. "/tenement.db"))
      srv.sink = lb.sink {}
      srv.log_stats = { write_dropped = 0, unpruned = 0, unpruned_bytes = 0 }
      local instances, writers, said = {}, {}, {}
      for _, key in ipairs { "loud:x", "quiet:q", "quiet:r" } do
        local ring = lb.ring { tag = key, sink = srv.sink }
        instances[key] = { key = key, service = key:match("^[^:]+"), ring = ring }
        writers[key], said[key] = writer(ring), 0
      end
      srv.sup = { instances = instances }
      local function say(key, n)
        for _ = 1, n do writers[key]:write(key, " line\n") end
        said[key] = said[key] + n
        assert(instances[key].ring:wait(said[key] - 1, 5000))
      end
      local function stored()
        local n = {}
        for _, r in ipairs(assert(srv.store.conn:query("SELECT instance, count(*) AS n FROM log_lines GROUP BY instance"))) do
          n[r.instance] = r.n
        end
        return n
      end
      say("loud:x", 3000); say("quiet:q", 2); say("loud:x", 3000); say("quiet:r", 1); say("quiet:q", 1)
      srv:flush_logs(false, { instance = "quiet:q" })
      assert.are.same({ ["quiet:q"] = 3 }, stored())
      assert.are.equal(6001, srv.sink:stats().pending)
      srv:flush_logs(false, { service = "quiet" })
      assert.are.same({ ["quiet:q"] = 3, ["quiet:r"] = 1 }, stored())
      assert.are.equal(6000, srv.sink:stats().pending)
      -- an instance no longer known: nothing to take for it
      srv:flush_logs(false, { instance = "gone:g" })
      assert.are.equal(6000, srv.sink:stats().pending)
      say("quiet:r", 1)
      srv:flush_logs(false, {})
      assert.are.same({ ["quiet:q"] = 3, ["quiet:r"] = 2, ["loud:x"] = 6000 }, stored())
      assert.are.equal(0, srv.sink:stats().pending)
      for key, f in pairs(writers) do
        f:close()
        assert.is_true(instances[key].ring:wait_drained(5000))
        instances[key].ring:close()
      end
      srv.sink:close()
      srv.store:close()
    end)
  end)
end)
