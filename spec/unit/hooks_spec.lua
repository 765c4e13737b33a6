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

  -- One instruction can ask for gigabytes, out of reach of the budget: a
  -- string.rep (called either way, with an integer or a float count), a
  -- string doubled a dozen times, a table.concat. 6 GB of such a hook froze the server.
  it("refuses a hook more memory than it may have, however it asks", function()
    local h = assert(load_hook([[
      return function(n, how)
        if how == "method" then return #("ab"):rep(n) end
        if how == "double" then
          local s = ("x"):rep(1 << 20)
          for _ = 1, n do s = s .. s end
          return #s
        end
        if how == "concat" then
          local t = {}
          for i = 1, n do t[i] = ("y"):rep(1 << 20) end
          return #table.concat(t)
        end
        return #string.rep("ab", n, ",")
      end
    ]]))
    -- small ones work as ever
    assert.are.same({ true, 8 }, { hooks.call(h.route, 3, "function") })
    assert.are.same({ true, 6 }, { hooks.call(h.route, 3, "method") })
    assert.are.same({ true, 4 << 20 }, { hooks.call(h.route, 2, "double") })
    local before = collectgarbage("count")
    for _, case in ipairs { { 128 * 1024 * 1024, "function" }, { 2 ^ 28, "method" }, { 12, "double" },
      { 100, "concat" } } do
      local ok, err = hooks.call(h.route, case[1], case[2])
      assert.is_false(ok, case[2])
      assert.matches("hook asked for more than its 64 MiB of memory", err, 1, true)
    end
    collectgarbage()
    assert.is_true(collectgarbage("count") - before < 16 * 1024, "memory the refused hooks made was kept")
    -- the cap is the hook's alone: the server's own strings are as they were
    assert.are.equal(3 * 1024 * 1024, #("abc"):rep(1024 * 1024))
    local big = ("x"):rep(80 * 1024 * 1024)
    assert.are.equal(80 * 1024 * 1024, #big)
  end)

  it("takes an answer nested too deep as a failed call, not a stack overflow of the server", function()
    local h = assert(load_hook([[
      return function(n)
        local t = {}
        for _ = 1, n do t = { t } end
        return { kind = "status", status = 403, x = t }
      end
    ]]))
    assert.are.equal(403, select(2, hooks.call(h.route, 10)).status)
    local ok, err = hooks.call(h.route, 140000)
    assert.is_false(ok)
    assert.are.equal("its answer has tables nested more than 64 deep", err)
  end)

  it("names what a hook reaches for and may not have, with the line, and leaves other globals nil", function()
    local h = assert(load_hook("return function(what)\n  if what == 'req' then return require('socket') end\n"
      .. "  if what == 'io' then return io.open('/etc/passwd') end\n  return undefined_global == nil\nend"))
    local ok, err = hooks.call(h.route, "req")
    assert.is_false(ok)
    assert.matches(":2: require is not available in a hook: a hook computes from what it is given, with string, "
      .. "table, math, utf8, print and pcall$", err)
    ok, err = hooks.call(h.route, "io")
    assert.is_false(ok)
    assert.matches(":3: io is not available in a hook", err)
    assert.are.same({ true, true }, { hooks.call(h.route, "other") })
  end)

  it("says where a hook was when its budget ran out", function()
    local h = assert(load_hook("return function()\n  local n = 0\n  while true do\n    n = n + 1\n  end\nend"))
    local ok, err = hooks.call(h.route)
    assert.is_false(ok)
    assert.matches("^hook exceeded its budget of 1000000 instructions %(at .*hook%.lua:[34]%)$", err)
  end)

  it("takes a file as lua does: a UTF-8 BOM, a #! line, and the lines after it numbered as in the file", function()
    assert.are.same({ true, 1 }, { hooks.call(assert(load_hook("#!/usr/bin/env lua\nreturn function() return 1 end")).route) })
    assert.are.same({ true, 2 }, { hooks.call(assert(load_hook("\239\187\191return function() return 2 end")).route) })
    local _, err = load_hook("#!/usr/bin/env lua\nlocal x = nil\nreturn x.y")
    assert.matches("hook.lua:3: attempt to index a nil value", err, 1, true)
  end)

  it("names what cannot be read or what a file returned instead of a hook", function()
    local dir = support.tmpdir()
    local _, err = hooks.load(dir, "route")
    assert.are.equal("[hooks] route: cannot read " .. dir .. ": Is a directory", err)
    for text, said in pairs {
      ["return 42"] = "it returned a number",
      ["local x = 1"] = "it returned nothing",
      ["return { rout = function() end }"] = "it returned a table with no route",
      ["return { route = 'api' }"] = "it returned a table with route a string",
    } do
      local loaded, lerr = load_hook(text)
      assert.is_nil(loaded)
      assert.matches('must return a function, or a table with a function "route"; ' .. said, lerr, 1, true)
    end
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
      package.path, package.cpath = %q, %q
      local hooks = require "tenement.hooks"
      local h = assert(hooks.load(%q, "route"))
      local ok, err = hooks.call(h.route)
      io.write(tostring(ok), " ", tostring(err))
    ]], support.abs("lua") .. "/?.lua", support.abs(support.build .. "/lib") .. "/?.so", dir .. "/hook.lua"))
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
      package.path, package.cpath = %q, %q
      local hooks = require "tenement.hooks"
      local h = assert(hooks.load(%q, "route"))
      local ok, result = hooks.call(h.route)
      %s
      io.write("done")
    ]], support.abs("lua") .. "/?.lua", support.abs(support.build .. "/lib") .. "/?.so", dir .. "/hook.lua", after))
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
