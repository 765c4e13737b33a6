-- API of the TOML decoder: parse contract, source locations, robustness,
-- speed, and the toml-test decoder executable. Values and document
-- structure are covered by toml_values_spec.lua and toml_structure_spec.lua.
local toml = require("tenement.toml")

local function where_of(tbl, key)
  return { toml.where(tbl, key) }
end

describe("toml.parse", function()
  it("returns a table for a valid document", function()
    local doc, err = toml.parse("a = 1")
    assert.is_nil(err)
    assert.are.equal(toml.table_mt, getmetatable(doc))
    assert.are.equal(1, doc.a)
  end)

  it("returns nil and 'source:line:col: message' for an invalid document", function()
    local doc, err = toml.parse("a = 1\nb = ", "config/tenement.toml")
    assert.is_nil(doc)
    assert.are.equal("config/tenement.toml:2:5: expected a value, found end of input", err)
  end)

  it("names the source <string> by default", function()
    local _, err = toml.parse("=")
    assert.are.equal("<string>:1:1: expected a key, found '='", err)
  end)

  it("raises when the text is not a string", function()
    assert.has_error(function()
      toml.parse(nil)
    end, "toml.parse: text must be a string, got nil")
    assert.has_error(function()
      toml.parse(42)
    end, "toml.parse: text must be a string, got number")
    assert.has_error(function()
      toml.parse({})
    end, "toml.parse: text must be a string, got table")
  end)

  it("returns a fresh document on every call", function()
    local a = assert(toml.parse("t = { x = 1 }"))
    local b = assert(toml.parse("t = { x = 1 }"))
    assert.are_not.equal(a, b)
    assert.are_not.equal(a.t, b.t)
    a.t.x = 2
    assert.are.equal(1, b.t.x)
  end)

  it("leaves nothing but the document's own keys in its tables", function()
    local doc = assert(toml.parse("[a.b]\nc = 1\n[[d]]\ne = [1]"))
    local keys = {}
    for k in pairs(doc) do
      keys[#keys + 1] = k
    end
    table.sort(keys)
    assert.are.same({ "a", "d" }, keys)
    assert.are.same({ "b" }, (function()
      local r = {}
      for k in pairs(doc.a) do
        r[#r + 1] = k
      end
      return r
    end)())
    assert.are.equal(1, #doc.d)
    assert.is_nil(next(doc.d, 1))
  end)

  it("accepts arrays and inline tables nested 1000 deep", function()
    local doc = assert(toml.parse("a = " .. string.rep("[", 1000) .. string.rep("]", 1000)))
    local depth, v = 0, doc.a
    while v do
      depth = depth + 1
      v = v[1]
    end
    assert.are.equal(1000, depth)
    assert.is_table(toml.parse("a = " .. string.rep("{b=", 1000) .. "1" .. string.rep("}", 1000)))
  end)

  it("rejects nesting deeper than 1000 instead of exhausting the stack", function()
    local _, err = toml.parse("a = " .. string.rep("[", 1001) .. string.rep("]", 1001))
    assert.are.equal("<string>:1:1005: arrays and inline tables nest deeper than 1000 levels", err)
    _, err = toml.parse("a = " .. string.rep("[", 100000))
    assert.are.equal("<string>:1:1005: arrays and inline tables nest deeper than 1000 levels", err)
  end)

  it("never raises on malformed input", function()
    -- A fixed linear congruential generator keeps the inputs the same on
    -- every run and every Lua build.
    local state = 12345
    local function random(n)
      state = (state * 1103515245 + 12345) % 2147483648
      return state % n + 1
    end
    local alphabet = {
      "a", "b", "1", "0", "_", "-", "+", ".", "e", "x", "=", " ", "\t", "\n", "\r\n", "\r", "#",
      "[", "]", "[[", "]]", "{", "}", ",", "\"", "'", "\"\"\"", "'''", "\\", "\\u", "\\U", ":",
      "T", "Z", "1979-05-27", "07:32:00", "inf", "nan", "true", "é", "\0", "\127", "\255", "\192\175",
    }
    for _ = 1, 3000 do
      local parts = {}
      for i = 1, random(24) do
        parts[i] = alphabet[random(#alphabet)]
      end
      local text = table.concat(parts)
      local ok, doc, err = pcall(toml.parse, text)
      assert.is_true(ok, "raised on " .. string.format("%q", text) .. ": " .. tostring(doc))
      if doc == nil then
        assert.is_truthy(err:match("^<string>:%d+:%d+: %S"), "bad error " .. tostring(err))
      else
        assert.are.equal(toml.table_mt, getmetatable(doc))
      end
    end
  end)
end)

describe("toml.where", function()
  local doc = assert(toml.parse(table.concat({
    "title = \"x\"",             -- 1
    "  indented = 1",            -- 2
    "owner.name.first = \"T\"",  -- 3
    "[server]",                  -- 4
    "port = 80",                 -- 5
    "tags = [ \"a\",",           -- 6
    "   \"b\" ]",                -- 7
    "env = { HOME = \"/\", \"é\" = 1 }", -- 8
    "[a.b.c]",                   -- 9
    "[a]",                       -- 10
    "k = 1",                     -- 11
    "[[p]]",                     -- 12
    "name = \"one\"",            -- 13
    "[[p]]",                     -- 14
    "  name = \"two\"",          -- 15
    "[p.sub]",                   -- 16
    "\"é\".\"ü\" = 1",           -- 17
    "list = [{ q = 1 }, [2]]",   -- 18
  }, "\n")))

  it("places the root at 1:1", function()
    assert.are.same({ 1, 1 }, where_of(doc))
  end)

  it("places a key at its first character", function()
    assert.are.same({ 1, 1 }, where_of(doc, "title"))
    assert.are.same({ 2, 3 }, where_of(doc, "indented"))
  end)

  it("places each part of a dotted key and the tables it creates", function()
    assert.are.same({ 3, 1 }, where_of(doc, "owner"))
    assert.are.same({ 3, 7 }, where_of(doc.owner, "name"))
    assert.are.same({ 3, 12 }, where_of(doc.owner.name, "first"))
    assert.are.same({ 3, 1 }, where_of(doc.owner))
    assert.are.same({ 3, 7 }, where_of(doc.owner.name))
  end)

  it("places a table at its header and its header key at the key", function()
    assert.are.same({ 4, 1 }, where_of(doc.server))
    assert.are.same({ 4, 2 }, where_of(doc, "server"))
    assert.are.same({ 5, 1 }, where_of(doc.server, "port"))
  end)

  it("places arrays at their bracket and elements at their first character", function()
    assert.are.same({ 6, 1 }, where_of(doc.server, "tags"))
    assert.are.same({ 6, 8 }, where_of(doc.server.tags))
    assert.are.same({ 6, 10 }, where_of(doc.server.tags, 1))
    assert.are.same({ 7, 4 }, where_of(doc.server.tags, 2))
  end)

  it("places inline tables at their brace and counts columns in characters", function()
    assert.are.same({ 8, 7 }, where_of(doc.server.env))
    assert.are.same({ 8, 9 }, where_of(doc.server.env, "HOME"))
    assert.are.same({ 8, 21 }, where_of(doc.server.env, "é"))
  end)

  it("moves a table created on the way to a header to its own later header", function()
    assert.are.same({ 10, 1 }, where_of(doc.a))
    assert.are.same({ 10, 2 }, where_of(doc, "a"))
    assert.are.same({ 9, 1 }, where_of(doc.a.b))
    assert.are.same({ 9, 4 }, where_of(doc.a, "b"))
    assert.are.same({ 9, 1 }, where_of(doc.a.b.c))
    assert.are.same({ 9, 6 }, where_of(doc.a.b, "c"))
    assert.are.same({ 11, 1 }, where_of(doc.a, "k"))
  end)

  it("places arrays of tables and their elements at their [[headers]]", function()
    assert.are.same({ 12, 1 }, where_of(doc.p))
    assert.are.same({ 12, 3 }, where_of(doc, "p"))
    assert.are.same({ 12, 1 }, where_of(doc.p, 1))
    assert.are.same({ 14, 1 }, where_of(doc.p, 2))
    assert.are.same({ 12, 1 }, where_of(doc.p[1]))
    assert.are.same({ 14, 1 }, where_of(doc.p[2]))
    assert.are.same({ 13, 1 }, where_of(doc.p[1], "name"))
    assert.are.same({ 15, 3 }, where_of(doc.p[2], "name"))
  end)

  it("places sub-tables of the latest array element", function()
    assert.are.same({ 16, 1 }, where_of(doc.p[2].sub))
    assert.are.same({ 16, 4 }, where_of(doc.p[2], "sub"))
    assert.are.same({ 17, 1 }, where_of(doc.p[2].sub, "é"))
    assert.are.same({ 17, 5 }, where_of(doc.p[2].sub["é"], "ü"))
  end)

  it("places tables and arrays inside arrays", function()
    assert.are.same({ 18, 8 }, where_of(doc.p[2].sub.list))
    assert.are.same({ 18, 9 }, where_of(doc.p[2].sub.list, 1))
    assert.are.same({ 18, 9 }, where_of(doc.p[2].sub.list[1]))
    assert.are.same({ 18, 11 }, where_of(doc.p[2].sub.list[1], "q"))
    assert.are.same({ 18, 20 }, where_of(doc.p[2].sub.list, 2))
    assert.are.same({ 18, 20 }, where_of(doc.p[2].sub.list[2]))
    assert.are.same({ 18, 21 }, where_of(doc.p[2].sub.list[2], 1))
  end)

  it("returns nil for unknown keys, foreign tables and non-tables", function()
    assert.is_nil(toml.where(doc, "missing"))
    assert.is_nil(toml.where(doc.server.tags, 3))
    assert.is_nil(toml.where({}))
    assert.is_nil(toml.where({}, "x"))
    assert.is_nil(toml.where("title"))
    assert.is_nil(toml.where(nil))
    assert.is_nil(toml.where(42, 1))
  end)

  it("has no location for date/time values", function()
    local d = assert(toml.parse("d = 1979-05-27")).d
    assert.is_nil(toml.where(d))
  end)

  it("counts lines across CRLF endings and multi-line strings", function()
    local d = assert(toml.parse("a = \"\"\"\r\n1\r\n2\"\"\"\r\n  b = 1\r\n"))
    assert.are.same({ 4, 3 }, where_of(d, "b"))
  end)

  it("keeps the locations of separate documents apart", function()
    local one = assert(toml.parse("x = 1"))
    local two = assert(toml.parse("\n\n   x = 1"))
    assert.are.same({ 1, 1 }, where_of(one, "x"))
    assert.are.same({ 3, 4 }, where_of(two, "x"))
  end)

  it("does not keep documents alive", function()
    local weak = setmetatable({}, { __mode = "v" })
    weak[1] = assert(toml.parse("[a]\nb = { c = [1] }"))
    weak[2] = weak[1].a.b
    collectgarbage()
    collectgarbage()
    assert.is_nil(weak[1])
    assert.is_nil(weak[2])
  end)
end)

describe("toml.parse speed", function()
  local function cpu_seconds(fn)
    local start = os.clock()
    fn()
    return os.clock() - start
  end

  it("parses a 1 MB document of many sections in well under a second", function()
    local parts, i = {}, 0
    local size = 0
    while size < 1000000 do
      i = i + 1
      local chunk = string.format(
        "[service%d]\nname = \"service %d \\u00e9\"\nport = %d\nratio = 0.%d\nwhen = 1979-05-27T07:32:00Z\n"
          .. "tags = [\"a\", \"b\", 1, 2.5]\nenv = { A = \"1\", B.C = \"2\" }\ntext = '''\nmulti\nline'''\n# comment\n\n",
        i, i, i % 65536, i)
      parts[i] = chunk
      size = size + #chunk
    end
    local text = table.concat(parts)
    local doc
    local seconds = cpu_seconds(function()
      doc = assert(toml.parse(text))
    end)
    assert.are.equal(i % 65536, doc["service" .. i].port)
    assert.is_true(seconds < 2, string.format("took %.2f s", seconds))
  end)

  it("stays linear on one very long line", function()
    local items = {}
    for j = 1, 40000 do
      items[j] = string.format("{x = %d, \"é\" = \"s\"}", j)
    end
    local text = "a = [" .. table.concat(items, ",") .. "]"
    local doc
    local seconds = cpu_seconds(function()
      doc = assert(toml.parse(text))
    end)
    assert.are.equal(40000, #doc.a)
    local line, col = toml.where(doc.a[40000], "x")
    assert.are.equal(1, line)
    assert.are.equal(utf8.len(text) - utf8.len("x = 40000, \"é\" = \"s\"}]") + 1, col)
    assert.is_true(seconds < 2, string.format("took %.2f s", seconds))
  end)
end)

describe("spec/tools/toml-decoder", function()
  local pwd = io.popen("pwd")
  local root = pwd:read("l")
  pwd:close()
  local decoder = root .. "/spec/tools/toml-decoder"

  local function quote(s)
    return "'" .. s:gsub("'", "'\\''") .. "'"
  end

  -- Runs the decoder with `input` on stdin; returns stdout, stderr, status.
  local function run(input, command)
    local infile, errfile = os.tmpname(), os.tmpname()
    local f = assert(io.open(infile, "wb"))
    f:write(input)
    f:close()
    local pipe = io.popen(string.format("%s < %s 2> %s; echo \"exit:$?\"",
      command or quote(decoder), quote(infile), quote(errfile)))
    local out = pipe:read("a")
    pipe:close()
    f = assert(io.open(errfile, "rb"))
    local err = f:read("a")
    f:close()
    os.remove(infile)
    os.remove(errfile)
    local status = tonumber(out:match("exit:(%d+)%s*$"))
    return out:gsub("exit:%d+%s*$", ""), err, status
  end

  local function tagged(type_name, value)
    return string.format("{\"type\":\"%s\",\"value\":\"%s\"}", type_name, value)
  end

  it("prints every scalar type tagged", function()
    local out, err, status = run(table.concat({
      "s = \"str\"", "i = -42", "f = 2.5", "b = true", "c = false",
      "odt = 1979-05-27T07:32:00.5-07:00", "ldt = 1979-05-27 07:32:00", "ld = 1979-05-27", "lt = 07:32:00.25",
    }, "\n"))
    assert.are.equal("", err)
    assert.are.equal(0, status)
    assert.are.equal("{"
      .. "\"b\":" .. tagged("bool", "true") .. ","
      .. "\"c\":" .. tagged("bool", "false") .. ","
      .. "\"f\":" .. tagged("float", "2.5") .. ","
      .. "\"i\":" .. tagged("integer", "-42") .. ","
      .. "\"ld\":" .. tagged("date-local", "1979-05-27") .. ","
      .. "\"ldt\":" .. tagged("datetime-local", "1979-05-27T07:32:00") .. ","
      .. "\"lt\":" .. tagged("time-local", "07:32:00.25") .. ","
      .. "\"odt\":" .. tagged("datetime", "1979-05-27T07:32:00.5-07:00") .. ","
      .. "\"s\":" .. tagged("string", "str")
      .. "}\n", out)
  end)

  it("prints tables as objects and arrays as arrays, empty ones included", function()
    local out, _, status = run("a = []\nt = {}\nn = [[1], {x = \"y\"}]\n[[aot]]\n[[aot]]\nk = 1\n[sub.deep]")
    assert.are.equal(0, status)
    assert.are.equal("{\"a\":[],"
      .. "\"aot\":[{},{\"k\":" .. tagged("integer", "1") .. "}],"
      .. "\"n\":[[" .. tagged("integer", "1") .. "],{\"x\":" .. tagged("string", "y") .. "}],"
      .. "\"sub\":{\"deep\":{}},"
      .. "\"t\":{}}\n", out)
  end)

  it("escapes quotes, backslashes and control characters and passes UTF-8 through", function()
    local out, _, status = run("\"k\\\"ey\" = \"q\\\" b\\\\ n\\n t\\t nul\\u0000 del\\u007F é 😀\"")
    assert.are.equal(0, status)
    assert.are.equal("{\"k\\\"ey\":" .. tagged("string",
      "q\\\" b\\\\ n\\u000a t\\u0009 nul\\u0000 del\\u007f é 😀") .. "}\n", out)
  end)

  it("prints special floats, exact doubles and 64-bit integers", function()
    local out, _, status = run("a = [inf, -inf, nan, -nan, 0.1, 1e300, -0.0, 5e-324, 1.0]\n"
      .. "i = [9223372036854775807, -9223372036854775808, 0xff]")
    assert.are.equal(0, status)
    assert.are.equal("{\"a\":[" .. table.concat({
      tagged("float", "inf"), tagged("float", "-inf"), tagged("float", "nan"), tagged("float", "nan"),
      tagged("float", "0.1"), tagged("float", "1e+300"), tagged("float", "-0"),
      tagged("float", "4.94065645841247e-324"), tagged("float", "1"),
    }, ",") .. "],\"i\":[" .. table.concat({
      tagged("integer", "9223372036854775807"), tagged("integer", "-9223372036854775808"),
      tagged("integer", "255"),
    }, ",") .. "]}\n", out)
  end)

  it("prints an empty document as an empty object", function()
    local out, err, status = run("")
    assert.are.equal("{}\n", out)
    assert.are.equal("", err)
    assert.are.equal(0, status)
  end)

  it("exits 1 with the error on stderr for invalid TOML", function()
    local out, err, status = run("a = 1\nb = 01\n")
    assert.are.equal(1, status)
    assert.are.equal("", out)
    assert.are.equal("stdin:2:5: invalid integer '01': leading zeros are not allowed\n", err)
  end)

  it("exits 1 on invalid UTF-8", function()
    local out, err, status = run("a = \"\255\"")
    assert.are.equal(1, status)
    assert.are.equal("", out)
    assert.are.equal("stdin:1:6: invalid UTF-8 byte 0xFF\n", err)
  end)

  it("works when started from another directory", function()
    local elsewhere = os.tmpname()
    os.remove(elsewhere)
    local dir = elsewhere:match("^(.*)/[^/]*$")
    local out, err, status = run("x = 1", "cd " .. quote(dir) .. " && " .. quote(decoder))
    assert.are.equal("", err)
    assert.are.equal(0, status)
    assert.are.equal("{\"x\":" .. tagged("integer", "1") .. "}\n", out)
  end)

  it("works when run through lua5.4 with a relative path", function()
    local out, _, status = run("x = 'y'", "lua5.4 spec/tools/toml-decoder")
    assert.are.equal(0, status)
    assert.are.equal("{\"x\":" .. tagged("string", "y") .. "}\n", out)
  end)
end)
