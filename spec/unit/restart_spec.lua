local restart = require "tenement.restart"

local settings = {
  restart = "on-failure", max_restarts = 3, restart_window = 300,
  backoff_base_ms = 1000, backoff_max_ms = 60000,
}

local function with(over)
  local s = {}
  for k, v in pairs(settings) do s[k] = v end
  for k, v in pairs(over or {}) do s[k] = v end
  return s
end

describe("restart policy", function()
  local crash = { code = 1, reason = "exit" }

  it("backs off exponentially from the base: 1 s, 2 s, 4 s", function()
    local h = {}
    local delays = {}
    local now = 1000
    for _ = 1, 3 do
      local d = restart.decide(h, crash, settings, now)
      assert.are.equal("restart", d.action)
      delays[#delays + 1] = d.delay_ms
      h[#h + 1] = now
      now = now + 1
    end
    assert.are.same({ 1000, 2000, 4000 }, delays)
  end)

  it("caps the delay at backoff_max_ms", function()
    local s = with { max_restarts = 20, backoff_max_ms = 5000 }
    local h = {}
    for i = 1, 10 do h[i] = 100 + i end
    local d = restart.decide(h, crash, s, 120)
    assert.are.equal(5000, d.delay_ms)
    assert.are.equal(11, d.attempt)
  end)

  it("fails after max_restarts within the window, saying why", function()
    local d = restart.decide({ 10, 20, 30 }, crash, settings, 40)
    assert.are.equal("fail", d.action)
    assert.matches("restarted 3 times within 300 s", d.reason)
    assert.matches("max_restarts = 3", d.reason)
  end)

  it("forgets restarts older than the window", function()
    local d = restart.decide({ 10, 20, 30 }, crash, settings, 330)
    assert.are.equal("restart", d.action)
    assert.are.equal(1, d.attempt)
    assert.are.equal(1000, d.delay_ms)
    assert.are.same({ 30 }, restart.prune({ 10, 20, 30 }, settings, 329))
  end)

  it("max_restarts = 0 fails at the first crash", function()
    local d = restart.decide({}, crash, with { max_restarts = 0 }, 1)
    assert.are.equal("fail", d.action)
  end)

  it("on-failure leaves a clean exit down and restarts signals, health and start failures", function()
    assert.are.equal("stay_down", restart.decide({}, { code = 0, reason = "exit" }, settings, 1).action)
    assert.are.equal("restart", restart.decide({}, { signal = "SIGKILL", reason = "exit" }, settings, 1).action)
    assert.are.equal("restart", restart.decide({}, { code = 0, reason = "health" }, settings, 1).action)
    assert.are.equal("restart", restart.decide({}, { reason = "start" }, settings, 1).action)
    assert.are.equal("restart", restart.decide({}, { signal = "SIGKILL", reason = "oom" }, settings, 1).action)
  end)

  it("fails at once a start that no retry can mend, whatever the policy", function()
    for _, policy in ipairs { "always", "on-failure", "never" } do
      local d = restart.decide({}, { reason = "start", lasting = true }, with { restart = policy }, 1)
      assert.are.equal("fail", d.action)
      assert.are.equal("not retried: no retry can mend this", d.reason)
    end
  end)

  it("always restarts a clean exit; never restarts nothing, and a crash under it is a failure", function()
    assert.are.equal("restart", restart.decide({}, { code = 0, reason = "exit" }, with { restart = "always" }, 1).action)
    local never = with { restart = "never" }
    for _, exit in ipairs { crash, { signal = "SIGKILL", reason = "exit" }, { reason = "start" },
      { code = 0, reason = "health" }, { signal = "SIGKILL", reason = "oom" } } do
      local d = restart.decide({}, exit, never, 1)
      assert.are.equal("fail", d.action)
      assert.are.equal('not restarted (restart = "never")', d.reason)
    end
    local d = restart.decide({}, { code = 0, reason = "exit" }, never, 1)
    assert.are.equal("stay_down", d.action)
    assert.are.equal('exited cleanly (code 0) and restart = "never"', d.reason)
  end)
end)
