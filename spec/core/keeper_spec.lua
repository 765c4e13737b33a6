-- The keeper (lua/tenement/keeper.lua, c/init.c in its keeper mode), against
-- the real kernel: a fake cgroup base in a temp dir is enough for what is
-- looked at here.
local core = require "tenement.core"
local fs = core.fs
local keeper = require "tenement.keeper"

describe("the keeper", function()
  local dir
  before_each(function()
    dir = string.format("%s/tn-keeper-%d-%d", os.getenv("TMPDIR") or "/tmp", core.proc.getpid(), math.random(1, 1e9))
    assert(fs.mkdir(dir, 448, true))
    assert(fs.write(dir .. "/cgroup.procs", "", 420))
  end)
  after_each(function() fs.rmtree(dir) end)

  -- Regression: it blocked SIGTERM only once its main() ran, so a SIGTERM
  -- in its first microseconds (ten's parent-death signal, when ten was
  -- killed just after starting it; a stop of the whole session) killed it
  -- before it could clean up: 13 of 20 such keepers were gone.
  it("is deaf to SIGTERM from its first instruction while ten lives", function()
    core.run(function()
      for _ = 1, 20 do
        local p = assert(keeper.start({ hierarchies = { { base = dir } } }))
        assert(p:kill("SIGTERM"))
        assert(p:kill("SIGINT"))
        assert(p:kill("SIGHUP"))
        local st = p:wait(50)
        if st then p:close() end
        assert.is_nil(st, "the keeper died of a signal meant to be held")
        assert(p:kill("SIGKILL"))
        p:wait(5000)
        p:close()
      end
    end)
  end)
end)
