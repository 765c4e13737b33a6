-- Prometheus text for many instances: made in slices that let the rest of
-- the loop run, streamed piece by piece, exact in its numbers.
local core = require "tenement.core"
local config = require "tenement.config"
local supervisor = require "tenement.supervisor"
local metrics = require "tenement.metrics"
local support = require "support"

local function make_sup(dir, n)
  local cfg = assert(config.parse(table.concat({
    "[settings]",
    string.format("data_dir = %q", dir .. "/data"),
    "[service.app]",
    'command = "/bin/true"',
    string.format("socket = %q", dir .. "/sock/{name}-{id}.sock"),
  }, "\n") .. "\n", dir .. "/tenement.toml", {}))
  local sup = supervisor.new(cfg, { environ = {} })
  for i = 1, n do sup:instance("app", string.format("i%04d", i)) end
  return sup
end

-- the text without the lines that change from one rendering to the next
local function steady(text)
  return (text:gsub("\n(tenement_uptime_seconds) [^\n]*", "\n%1")
    :gsub("\n(process_[%w_]+) [^\n]*", "\n%1"):gsub("\n(tenement_lua_memory_bytes) [^\n]*", "\n%1"))
end

describe("metrics.render", function()
  local dir
  before_each(function() dir = support.tmpdir() end)
  after_each(support.cleanup)

  it("gives other tasks turns while it renders a thousand instances, and streams what it makes", function()
    core.run(function()
      local sup = make_sup(dir, 1000)
      local view = { sup = sup, started = core.now() }
      local turns, done = 0, false
      local other = core.spawn(function()
        while not done do
          turns = turns + 1
          coroutine.yield()
        end
      end)
      local chunks = {}
      metrics.render(view, function(chunk) chunks[#chunks + 1] = chunk end)
      done = true
      other:join()
      assert.is_true(turns > 1, "turns of another task during the rendering: " .. turns)
      assert.is_true(#chunks > 10)
      local streamed = table.concat(chunks)
      assert.are.equal(steady(metrics.render(view)), steady(streamed))
      local _, samples = streamed:gsub('\ntenement_instance_state{service="app",id="i%d+",state="stopped"} 1', "")
      assert.are.equal(1000, samples)
    end)
  end)

  it("keeps an instance forgotten while the text is made as it was, and the text whole", function()
    core.run(function()
      local sup = make_sup(dir, 1000)
      local chunks = {}
      metrics.render({ sup = sup, started = core.now() }, function(chunk)
        -- as the first chunk goes out, every instance was read
        if #chunks == 0 then assert(sup:forget("app", "i0999")) end
        chunks[#chunks + 1] = chunk
      end)
      local text = table.concat(chunks)
      assert.is_nil(sup:get("app", "i0999"))
      assert.matches('tenement_instance_log_lines_total{service="app",id="i0999"} 0\n', text, 1, true)
      assert.matches('tenement_instance_wake_duration_seconds_count{service="app",id="i1000"} 0\n$', text)
    end)
  end)

  -- The exposition format: "all lines for a given metric must be provided
  -- as one single group". Memory and CPU, read together, were written
  -- interleaved, instance by instance.
  it("writes each family's samples as one group under its HELP and TYPE", function()
    core.run(function()
      local sup = make_sup(dir, 3)
      -- two instances with a process to read the usage of (this one)
      local me = tonumber(assert(core.fs.realpath("/proc/self")):match("(%d+)$"))
      sup:get("app", "i0001").pid, sup:get("app", "i0002").pid = me, me
      local text = metrics.render { sup = sup, started = core.now() }
      local family, seen, kinds = nil, {}, {}
      for line in text:gmatch("[^\n]+") do
        local typed, kind = line:match("^# TYPE (%S+) (%S+)$")
        if typed then
          assert.is_nil(seen[typed], typed .. " has a second group")
          seen[typed], kinds[typed], family = true, kind, typed
        elseif not line:match("^# HELP ") then
          local name = line:match("^([%w_]+)")
          local base = kinds[family] == "histogram" and name:gsub("_bucket$", ""):gsub("_sum$", ""):gsub("_count$", "")
            or name
          assert.are.equal(family, base, line)
        end
      end
      local _, memory = text:gsub("\ntenement_instance_memory_bytes{", "")
      local _, cpu = text:gsub("\ntenement_instance_cpu_seconds_total{", "")
      assert.are.same({ 2, 2 }, { memory, cpu })
    end)
  end)

  it("writes numbers in their shortest exact form", function()
    core.run(function()
      local sup = make_sup(dir, 1)
      local inst = sup:get("app", "i0001")
      metrics.observe(inst.stats.wake, 0.0123)
      local text = metrics.render { sup = sup, started = core.now() }
      assert.matches('tenement_instance_wake_duration_seconds_bucket{service="app",id="i0001",le="0.005"} 0\n',
        text, 1, true)
      assert.matches('tenement_instance_wake_duration_seconds_bucket{service="app",id="i0001",le="0.025"} 1\n',
        text, 1, true)
      assert.matches('tenement_instance_wake_duration_seconds_sum{service="app",id="i0001"} 0.0123\n', text, 1, true)
      assert.matches('tenement_instance_wake_duration_seconds_bucket{service="app",id="i0001",le="+Inf"} 1\n',
        text, 1, true)
      -- a value that needs more digits gets as many as it needs, and no more
      metrics.observe(inst.stats.wake, 0.1 + 0.7 - 0.0123)
      text = metrics.render { sup = sup, started = core.now() }
      local sum = text:match('tenement_instance_wake_duration_seconds_sum{service="app",id="i0001"} (%S+)')
      assert.are.equal(0.0123 + (0.1 + 0.7 - 0.0123), tonumber(sum))
      assert.are.equal("0.7999999999999999", sum)
    end)
  end)
end)
