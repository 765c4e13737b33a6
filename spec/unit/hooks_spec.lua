-- User hooks run in a box: what they do stays in it.
local hooks = require "tenement.hooks"
local support = require "support"

local function load_hook(text)
  local dir = support.tmpdir()
  local path = support.write(dir .. "/hook.lua", text)
  return hooks.load(path, "route")
end

describe("hooks", function()
  after_each(support.cleanup)

  it("cannot change the server's string, table, math or utf8 libraries", function()
    local format, insert, floor, char, rep = string.format, table.insert, math.floor, utf8.char, string.rep
    local loaded, err = load_hook([[
      string.format = nil
      table.insert = nil
      math.floor = nil
      utf8.char = nil
      getmetatable("").__index.rep = nil
      return function() return string.rep("x", 2) end
    ]])
    local ok = pcall(function() assert.are.equal(format, string.format) end)
    local kept = { string.rep == rep, table.insert == insert, math.floor == floor, utf8.char == char }
    string.format, table.insert, math.floor, utf8.char, string.rep = format, insert, floor, char, rep
    assert.is_true(ok, "a hook removed string.format from the server")
    assert.are.same({ true, true, true, true }, kept)
    -- the hook itself failed on its own change, or ran: either way contained
    if loaded then
      local called = hooks.call(loaded.route)
      assert.is_boolean(called)
    else
      assert.is_string(err)
    end
  end)

  it("does not let one string.rep build more than a hook may, called either way", function()
    local h = assert(load_hook([[
      return function(n, how)
        if how == "method" then return #("ab"):rep(n) end
        return #string.rep("ab", n, ",")
      end
    ]]))
    -- small ones work as ever
    assert.are.same({ true, 8 }, { hooks.call(h.route, 3, "function") })
    assert.are.same({ true, 6 }, { hooks.call(h.route, 3, "method") })
    -- 256 MB in one C call, outside the instruction budget: refused
    for _, how in ipairs { "function", "method" } do
      local ok, err = hooks.call(h.route, 128 * 1024 * 1024, how)
      assert.is_false(ok)
      assert.matches("a hook may make at most", err, 1, true)
    end
    -- and the server's own strings are as they were
    assert.are.equal(string.rep, getmetatable("").__index.rep)
    assert.are.equal(3 * 1024 * 1024, #("abc"):rep(1024 * 1024))
  end)

  it("stops a hook that catches its own budget error and loops on", function()
    -- in a process of its own: the old behaviour was to loop for good
    local dir = support.tmpdir()
    support.write(dir .. "/hook.lua", [[
      return function()
        while true do pcall(function() while true do end end) end
      end
    ]])
    local script = support.write(dir .. "/run.lua", string.format([[
      package.path = %q
      local hooks = require "tenement.hooks"
      local h = assert(hooks.load(%q, "route"))
      local ok, err = hooks.call(h.route)
      io.write(tostring(ok), " ", tostring(err))
    ]], support.abs("lua") .. "/?.lua", dir .. "/hook.lua"))
    local code, out = support.run("timeout 10 lua5.4 " .. support.quote(script))
    assert.are.equal(0, code, "the hook was never stopped")
    assert.matches("^false hook exceeded its budget", out)
  end)

  -- Code of the hook that would run after its call, outside the budget: a
  -- finalizer run by the server's garbage collector, a metamethod run by
  -- the server reading the answer. Each in a process of its own: the old
  -- behaviour was to loop for good.
  local function run_after(hook, after)
    local dir = support.tmpdir()
    support.write(dir .. "/hook.lua", hook)
    local script = support.write(dir .. "/run.lua", string.format([[
      package.path = %q
      local hooks = require "tenement.hooks"
      local h = assert(hooks.load(%q, "route"))
      local ok, result = hooks.call(h.route)
      %s
      io.write("done")
    ]], support.abs("lua") .. "/?.lua", dir .. "/hook.lua", after))
    return support.run("timeout 10 lua5.4 " .. support.quote(script))
  end

  it("runs no finalizer of a hook outside its budget", function()
    local code, out = run_after([[
      return function()
        setmetatable({}, { __gc = function() while true do end end })
        return "api"
      end
    ]], "collectgarbage() collectgarbage()")
    assert.are.equal(0, code, "a finalizer of the hook held the server")
    assert.are.equal("done", out)
  end)

  it("hands back plain values: no metamethod of the hook runs when its answer is read", function()
    local code, out = run_after([[
      return function()
        return setmetatable({}, { __index = function() while true do end end })
      end
    ]], "assert(ok) local _ = result.kind, result.service, tostring(result)")
    assert.are.equal(0, code, "reading the hook's answer ran its code without a budget")
    assert.are.equal("done", out)
  end)
end)
