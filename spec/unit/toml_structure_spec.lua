-- Keys, tables, arrays of tables, redefinition rules, comments, newlines
-- and encoding of the TOML decoder.
local toml = require("tenement.toml")

local expected_array_mt = {}

-- Marks an expected value as an array (plain tables mean TOML tables).
local function A(t)
  return setmetatable(t, expected_array_mt)
end

-- Returns nil when `got` is exactly `exp` (types and metatables included),
-- else where and how they differ.
local function mismatch(exp, got, path)
  path = path or "doc"
  if type(exp) == "number" then
    if math.type(got) ~= math.type(exp) or got ~= exp then
      return string.format("%s: expected %s %s, got %s %s", path, math.type(exp), tostring(exp),
        math.type(got) or type(got), tostring(got))
    end
    return nil
  elseif type(exp) ~= "table" then
    if got ~= exp then
      return string.format("%s: expected %q, got %q", path, tostring(exp), tostring(got))
    end
    return nil
  end
  local want_mt = getmetatable(exp) == expected_array_mt and toml.array_mt or toml.table_mt
  if type(got) ~= "table" or getmetatable(got) ~= want_mt then
    return string.format("%s: expected %s, got %s", path,
      want_mt == toml.array_mt and "an array" or "a table", tostring(got))
  end
  for k, v in pairs(exp) do
    local problem = mismatch(v, got[k], path .. "." .. tostring(k))
    if problem then
      return problem
    end
  end
  for k in pairs(got) do
    if exp[k] == nil then
      return path .. ": unexpected key " .. tostring(k)
    end
  end
  return nil
end

local function label(text)
  return (text:gsub("[%c\\]", function(c)
    return string.format("\\x%02X", c:byte())
  end))
end

local function valid_docs(title, cases)
  describe(title, function()
    for _, case in ipairs(cases) do
      it("accepts " .. label(case[1]), function()
        local doc, err = toml.parse(case[1])
        assert.is_nil(err)
        assert.is_nil(mismatch(case[2], doc))
      end)
    end
  end)
end

local function invalid_docs(title, cases)
  describe(title, function()
    for _, case in ipairs(cases) do
      it("rejects " .. label(case[1]), function()
        local doc, err = toml.parse(case[1])
        assert.is_nil(doc)
        assert.is_string(err)
        local prefix = string.format("<string>:%d:%d: ", case[2], case[3])
        assert.is_true(err:sub(1, #prefix) == prefix, "expected " .. prefix .. "..., got " .. err)
        assert.is_true(err:find(case[4], #prefix + 1, true) ~= nil,
          "expected the message to mention '" .. case[4] .. "', got " .. err)
      end)
    end
  end)
end

describe("toml structure", function()
  valid_docs("keys", {
    { "key = 1", { key = 1 } },
    { "bare_key = 1\nbare-key = 2\n1234 = 3", { bare_key = 1, ["bare-key"] = 2, ["1234"] = 3 } },
    { "A = 1\na = 2", { A = 1, a = 2 } },
    { "-_- = 1", { ["-_-"] = 1 } },
    { "true = 1\nfalse = 2\ninf = 3\nnan = 4", { ["true"] = 1, ["false"] = 2, inf = 3, nan = 4 } },
    { "000111 = 1\n10e3 = 2", { ["000111"] = 1, ["10e3"] = 2 } },
    { "2001-02-03 = 1", { ["2001-02-03"] = 1 } },
    { [["127.0.0.1" = 1]], { ["127.0.0.1"] = 1 } },
    { [["character encoding" = 1]], { ["character encoding"] = 1 } },
    { [["ʎǝʞ" = 1]], { ["ʎǝʞ"] = 1 } },
    { [['key2' = 1]], { key2 = 1 } },
    { [['quoted "value"' = 1]], { ['quoted "value"'] = 1 } },
    { [["\u00e9\n\"" = 1]], { ['é\n"'] = 1 } },
    { [['\n' = 1]], { ["\\n"] = 1 } },
    { [["" = 1]], { [""] = 1 } },
    { [['' = 1]], { [""] = 1 } },
    { [["".'' = 1]], { [""] = { [""] = 1 } } },
    { "name = 1\nphysical.color = 2\nphysical.shape = 3",
      { name = 1, physical = { color = 2, shape = 3 } } },
    { [[site."google.com" = true]], { site = { ["google.com"] = true } } },
    { "fruit . color = 1\nfruit\t.\tshape = 2", { fruit = { color = 1, shape = 2 } } },
    { "3.14159 = 'pi'", { ["3"] = { ["14159"] = "pi" } } },
    { [[a."b.c".'d' = 1]], { a = { ["b.c"] = { d = 1 } } } },
    { "a.b.c.d.e = 1", { a = { b = { c = { d = { e = 1 } } } } } },
    { "key=1", { key = 1 } },
    { "key\t=\t1", { key = 1 } },
    { "  indented = 1", { indented = 1 } },
    { "apple.type = 1\norange.type = 2\napple.skin = 3", { apple = { type = 1, skin = 3 }, orange = { type = 2 } } },
  })

  invalid_docs("invalid keys", {
    { "= 1", 1, 1, "expected a key, found '='" },
    { "key", 1, 4, "expected '=' after key 'key', found end of input" },
    { "key\n= 1", 1, 4, "expected '=' after key 'key', found end of line" },
    { "key =", 1, 6, "expected a value, found end of input" },
    { "key =\n1", 1, 6, "expected a value, found end of line" },
    { "key = # comment", 1, 7, "expected a value, found '#'" },
    { "a b = 1", 1, 3, "expected '=' after key 'a', found 'b'" },
    { "é = 1", 1, 1, "expected a key, found 'é'" },
    { "a.é = 1", 1, 3, "expected a key, found 'é'" },
    { "a# = 1", 1, 2, "expected '=' after key 'a', found '#'" },
    { "a = 1 b = 2", 1, 7, "expected end of line after value, found 'b'" },
    { ".a = 1", 1, 1, "expected a key, found '.'" },
    { "a. = 1", 1, 4, "expected a key, found '='" },
    { "a..b = 1", 1, 3, "expected a key, found '.'" },
    { "a.\nb = 1", 1, 3, "expected a key, found end of line" },
    { "a == 1", 1, 4, "expected a value, found '='" },
    { "a = b = 1", 1, 5, "invalid value 'b'" },
    { [["""key""" = 1]], 1, 1, "a multi-line string cannot be used as a key" },
    { [['''key''' = 1]], 1, 1, "a multi-line string cannot be used as a key" },
    { [["unterminated = 1]], 1, 1, "unterminated string" },
    { [['unterminated = 1]], 1, 1, "unterminated string" },
    { [[partial"quoted" = 1]], 1, 8, "expected '=' after key 'partial', found '\"'" },
    { [["a"b = 1]], 1, 4, "expected '=' after key 'a', found 'b'" },
    { [["\x" = 1]], 1, 2, "invalid escape sequence '\\x'" },
    { "[a]\n= 1", 2, 1, "expected a key, found '='" },
    { "a = 1\na = 2", 2, 1, "duplicate key 'a' (defined at line 1, column 1)" },
    { "a = 1\n'a' = 2", 2, 1, "duplicate key 'a'" },
    { "a = 1\n\"a\" = 2", 2, 1, "duplicate key 'a'" },
    { "\"\" = 1\n'' = 2", 2, 1, "duplicate key '\"\"'" },
    { "a.b = 1\na.b = 2", 2, 3, "duplicate key 'a.b' (defined at line 1, column 3)" },
    { "a = false\na.b = true", 2, 1, "key 'a' is already defined as a value (defined at line 1, column 1)" },
    { "a.b = 1\na = 2", 2, 1, "duplicate key 'a'" },
    { "a.b.c = 1\na.b = 2", 2, 3, "duplicate key 'a.b'" },
    { "a = [1]\na.b = 2", 2, 1, "cannot use dotted keys to add to array 'a'" },
    { "a = \"x\"\na.b.c = 1", 2, 1, "key 'a' is already defined as a value" },
  })

  valid_docs("tables", {
    { "[table]", { table = {} } },
    { "[table-1]\nkey1 = \"some string\"\nkey2 = 123\n\n[table-2]\nkey1 = \"another string\"\nkey2 = 456",
      { ["table-1"] = { key1 = "some string", key2 = 123 }, ["table-2"] = { key1 = "another string", key2 = 456 } } },
    { "[dog.\"tater.man\"]\ntype.name = \"pug\"", { dog = { ["tater.man"] = { type = { name = "pug" } } } } },
    { "[a.b.c]", { a = { b = { c = {} } } } },
    { "[ d.e.f ]", { d = { e = { f = {} } } } },
    { "[ g .  h  . i ]", { g = { h = { i = {} } } } },
    { "[ j . \"ʞ\" . 'l' ]", { j = { ["ʞ"] = { l = {} } } } },
    { "[\t\"a b\"\t]", { ["a b"] = {} } },
    { "[\"\"]\nx = 1", { [""] = { x = 1 } } },
    { "[x.1.2]", { x = { ["1"] = { ["2"] = {} } } } },
    { "[true]\n[false]\n[inf]", { ["true"] = {}, ["false"] = {}, inf = {} } },
    { "a = 1\n[t]\nb = 2", { a = 1, t = { b = 2 } } },
    { "[x.y.z.w]\n\n[x]", { x = { y = { z = { w = {} } } } } },
    { "[a.b]\nc = 1\n[a]\nd = 2", { a = { b = { c = 1 }, d = 2 } } },
    { "[a]\nd = 2\n[a.b]\nc = 1", { a = { b = { c = 1 }, d = 2 } } },
    { "[fruit]\napple.color = \"red\"\napple.taste.sweet = true\n[fruit.apple.texture]\nsmooth = true",
      { fruit = { apple = { color = "red", taste = { sweet = true }, texture = { smooth = true } } } } },
    { "a.b = 1\n[a.c]\nd = 2", { a = { b = 1, c = { d = 2 } } } },
    { "[a.b.c]\n[a]\nb.d = 1", { a = { b = { c = {}, d = 1 } } } },
    { "[a]\n[b]\n[a.c]", { a = { c = {} }, b = {} } },
    { "[tbl]\na.b.c = {d.e = 1}\n[tbl.x]\na.b.c = {d.e = 1}",
      { tbl = { a = { b = { c = { d = { e = 1 } } } }, x = { a = { b = { c = { d = { e = 1 } } } } } } } },
  })

  invalid_docs("invalid table headers", {
    { "[]", 1, 2, "expected a key, found ']'" },
    { "[a", 1, 3, "expected ']' to close the table header, found end of input" },
    { "[a\n]", 1, 3, "expected ']' to close the table header, found end of line" },
    { "[a.]", 1, 4, "expected a key, found ']'" },
    { "[.a]", 1, 2, "expected a key, found '.'" },
    { "[a..b]", 1, 4, "expected a key, found '.'" },
    { "[a b]", 1, 4, "expected ']' to close the table header, found 'b'" },
    { "[a]]", 1, 4, "expected end of line after table header, found ']'" },
    { "[a] b = 1", 1, 5, "expected end of line after table header, found 'b'" },
    { "[a]b]", 1, 4, "expected end of line after table header, found 'b'" },
    { "[a[b]", 1, 3, "expected ']' to close the table header, found '['" },
    { "[a#b]", 1, 3, "expected ']' to close the table header, found '#'" },
    { "[a=b]", 1, 3, "expected ']' to close the table header, found '='" },
    { "[ [a] ]", 1, 3, "expected a key, found '['" },
    { "[\"\"\"a\"\"\"]", 1, 2, "a multi-line string cannot be used as a key" },
    { "[é]", 1, 2, "expected a key, found 'é'" },
  })

  invalid_docs("tables defined twice", {
    { "[a]\n[a]", 2, 2, "table 'a' is defined twice (defined at line 1, column 2)" },
    { "[a]\nb = 1\n[a]\nc = 2", 3, 2, "table 'a' is defined twice" },
    { "[a.b]\n[a]\n[a]", 3, 2, "table 'a' is defined twice (defined at line 2, column 2)" },
    { "[a]\n[a.b]\n[a]", 3, 2, "table 'a' is defined twice" },
    { "[a.b]\n[a.b]", 2, 4, "table 'a.b' is defined twice (defined at line 1, column 4)" },
    { "[a]\n['a']", 2, 2, "table 'a' is defined twice" },
    { "[a]\n[\"a\"]", 2, 2, "table 'a' is defined twice" },
    { "[a]\nb = 1\n[a.b]", 3, 4, "key 'a.b' is already defined as a value (defined at line 2, column 1)" },
    { "[fruit]\ntype = \"apple\"\n[fruit.type]", 3, 8, "key 'fruit.type' is already defined as a value" },
    { "a = 1\n[a.b.c.d]", 2, 2, "key 'a' is already defined as a value" },
    { "a = 1\n[a]", 2, 2, "key 'a' is already defined as a value" },
    { "[a]\nb.c = 1\n[a.b.c.d]", 3, 6, "key 'a.b.c' is already defined as a value" },
  })

  invalid_docs("tables defined by dotted keys", {
    { "a.b = 1\n[a]", 2, 2, "cannot define table 'a' with a header: dotted keys already defined it (defined at line 1, column 1)" },
    { "[fruit]\napple.color = \"red\"\n[fruit.apple]", 3, 8, "cannot define table 'fruit.apple' with a header: dotted keys already defined it" },
    { "[fruit]\napple.taste.sweet = true\n[fruit.apple.taste]", 3, 14, "dotted keys already defined it" },
    { "[t1]\nt2.t3.v = 0\n[t1.t2]", 3, 5, "dotted keys already defined it" },
    { "[t1]\nt2.t3.v = 0\n[t1.t2.t3]", 3, 8, "dotted keys already defined it" },
    { "[a.b.c]\n[a]\nb.x = 1\n[a.b]", 4, 4, "dotted keys already defined it" },
    { "[a.b.c]\nz = 9\n[a]\nb.c.t = 1", 4, 3, "cannot add keys to table 'b.c' with dotted keys: it was defined by its own table header (defined at line 1, column 6)" },
    { "[a.b.c.d]\nz = 9\n[a]\nb.c.d.k.t = 1", 4, 5, "cannot add keys to table 'b.c.d' with dotted keys: it was defined by its own table header" },
    { "[a.b]\n[a]\nb.c = 1", 3, 1, "cannot add keys to table 'b' with dotted keys: it was defined by its own table header" },
  })

  invalid_docs("inline tables are closed", {
    { "a = {}\n[a]", 2, 2, "cannot define table 'a' with a header: it is an inline table (defined at line 1, column 1)" },
    { "a = {}\n[a.b]", 2, 2, "cannot add to inline table 'a' (defined at line 1, column 1): inline tables are closed once defined" },
    { "a = {b = 1}\na.c = 2", 2, 1, "cannot add keys to inline table 'a'" },
    { "a = {b = {}}\n[a.b.c]", 2, 2, "cannot add to inline table 'a'" },
    { "a = {b = {}}\na.b.c = 1", 2, 1, "cannot add keys to inline table 'a'" },
    { "a = {b.c = 1}\na.b.d = 2", 2, 1, "cannot add keys to inline table 'a'" },
    { "[t]\na = {}\n[t.a]", 3, 4, "it is an inline table" },
    { "a = {}\n[[a]]", 2, 3, "cannot define 'a' as an array of tables: it is already a table" },
    { "a = {b = 1}\n[[a.c]]", 2, 3, "cannot add to inline table 'a'" },
    { "tab = { inner = { dog = 1 }, inner.cat = 2 }", 1, 30, "cannot add keys to inline table 'inner'" },
    { "tbl = { fruit = { apple.color = 1 }, fruit.apple.texture = { smooth = true } }", 1, 38, "cannot add keys to inline table 'fruit'" },
    { "x = [{a = 1}]\n[x.b]", 2, 2, "cannot add to static array 'x'" },
  })

  valid_docs("arrays of tables", {
    { "[[products]]\nname = \"Hammer\"\nsku = 738594937\n\n[[products]]\n\n[[products]]\nname = \"Nail\"\ncolor = \"gray\"",
      { products = A { { name = "Hammer", sku = 738594937 }, {}, { name = "Nail", color = "gray" } } } },
    { "[[a]]", { a = A { {} } } },
    { "[[ a ]]\n[[\ta\t]]", { a = A { {}, {} } } },
    { "[[a.b]]\nx = 1\n[[a.b]]\nx = 2", { a = { b = A { { x = 1 }, { x = 2 } } } } },
    { "[[fruits]]\nname = \"apple\"\n[fruits.physical]\ncolor = \"red\"\n[[fruits.varieties]]\nname = \"red delicious\"\n"
        .. "[[fruits.varieties]]\nname = \"granny smith\"\n[[fruits]]\nname = \"banana\"\n[[fruits.varieties]]\nname = \"plantain\"",
      { fruits = A {
        { name = "apple", physical = { color = "red" },
          varieties = A { { name = "red delicious" }, { name = "granny smith" } } },
        { name = "banana", varieties = A { { name = "plantain" } } },
      } } },
    { "[[arr]]\n[arr.sub]\nv = 1\n[[arr]]\n[arr.sub]\nv = 2", { arr = A { { sub = { v = 1 } }, { sub = { v = 2 } } } } },
    { "[[a.b]]\n[a]\nc = 1", { a = { b = A { {} }, c = 1 } } },
    { "[[parent.arr]]\n[[parent.arr]]\n[parent]\nnot-arr = 1", { parent = { arr = A { {}, {} }, ["not-arr"] = 1 } } },
    { "[fruit]\napple.color = \"red\"\n[[fruit.apple.seeds]]\nsize = 2",
      { fruit = { apple = { color = "red", seeds = A { { size = 2 } } } } } },
    { "[[a]]\nb.c = 1\n[[a]]\nb.c = 2", { a = A { { b = { c = 1 } }, { b = { c = 2 } } } } },
    { "[[a]]\n[a.b]\n[[a]]\n[a.b]", { a = A { { b = {} }, { b = {} } } } },
    { "[[a]]\n[[a.b]]\n[[a.b]]\n[[a]]\n[[a.b]]", { a = A { { b = A { {}, {} } }, { b = A { {} } } } } },
    { "x = [{a = 1}]\ny = [[1], {}]", { x = A { { a = 1 } }, y = A { A { 1 }, {} } } },
  })

  invalid_docs("invalid arrays of tables", {
    { "[[]]", 1, 3, "expected a key, found ']'" },
    { "[[a]", 1, 4, "expected ']]' to close the array-of-tables header, found ']'" },
    { "[[a", 1, 4, "expected ']]' to close the array-of-tables header, found end of input" },
    { "[[a] ]", 1, 4, "expected ']]' to close the array-of-tables header, found ']'" },
    { "[[a]]]", 1, 6, "expected end of line after table header, found ']'" },
    { "[[a]] b = 1", 1, 7, "expected end of line after table header, found 'b'" },
    { "a = []\n[[a]]", 2, 3, "cannot append to static array 'a' (defined at line 1, column 1)" },
    { "a = [{}]\n[[a]]", 2, 3, "cannot append to static array 'a'" },
    { "[t]\na = []\n[[t.a]]", 3, 5, "cannot append to static array 't.a'" },
    { "[a]\n[[a]]", 2, 3, "cannot define 'a' as an array of tables: it is already a table (defined at line 1, column 2)" },
    { "[[a]]\n[a]", 2, 2, "cannot define table 'a': it is an array of tables (defined at line 1, column 3)" },
    { "a = [1]\n[a]", 2, 2, "cannot define table 'a': it is already an array" },
    { "a = true\n[[a]]", 2, 3, "key 'a' is already defined as a value" },
    { "[[albums.songs]]\n[[albums]]", 2, 3, "cannot define 'albums' as an array of tables: it is already a table" },
    { "[[a.b]]\n[a]\nb = 1", 3, 1, "duplicate key 'b' (defined at line 1, column 5)" },
    { "[[a.b]]\n[a]\nb.y = 2", 3, 1, "cannot use dotted keys to add to array 'b'" },
    { "[[tab.arr]]\n[tab]\narr = {}", 3, 1, "duplicate key 'arr'" },
    { "[[a]]\n[a.b]\n[a.b]", 3, 4, "table 'a.b' is defined twice (defined at line 2, column 4)" },
    { "[[a]]\nb = 1\nb = 2", 3, 1, "duplicate key 'b'" },
    { "[[a]]\n[[a.b]]\n[a.b]", 3, 4, "cannot define table 'a.b': it is an array of tables" },
    { "[[a]]\nb = 1\n[a.b]", 3, 4, "key 'a.b' is already defined as a value" },
  })

  valid_docs("comments and whitespace", {
    { "", {} },
    { "\n\n\n", {} },
    { "   \t  \n", {} },
    { "# only a comment", {} },
    { "# comment\n# another\n", {} },
    { "a = 1 # trailing comment", { a = 1 } },
    { "a = 1# no space", { a = 1 } },
    { "a = \"# not a comment\" # comment", { a = "# not a comment" } },
    { "[t] # comment\nb = 1", { t = { b = 1 } } },
    { "[[t]] # comment", { t = A { {} } } },
    { "# comment with unicode ✓ and tab\t and = [ ] { } \" ' chars\na = 1", { a = 1 } },
    { "#\n#\na = 1\n#", { a = 1 } },
    { "a = 1\n", { a = 1 } },
    { "a = 1", { a = 1 } },
    { "a = 1 # comment at end of input", { a = 1 } },
    { "\ta\t=\t1\t\n\t[\tt\t]\t", { a = 1, t = {} } },
    { "a = 1\r\nb = 2\r\n", { a = 1, b = 2 } },
    { "# comment\r\n[t]\r\na = [\r\n 1,\r\n]\r\n", { t = { a = A { 1 } } } },
    { "a = 1 # comment\r\n", { a = 1 } },
    { "\239\187\191a = 1", { a = 1 } },
    { "a = \"\239\187\191\"", { a = "\239\187\191" } },
  })

  invalid_docs("control characters and newlines", {
    { "a = 1\rb = 2", 1, 6, "carriage return not followed by a line feed" },
    { "\r", 1, 1, "carriage return not followed by a line feed" },
    { "a = 1 \r", 1, 7, "carriage return not followed by a line feed" },
    { "# comment\r", 1, 10, "carriage return not followed by a line feed" },
    { "# comment \rmore\n", 1, 11, "carriage return not followed by a line feed" },
    { "# nul \0 here", 1, 7, "control character U+0000 is not allowed in a comment" },
    { "# del \127", 1, 7, "control character U+007F is not allowed in a comment" },
    { "# \1", 1, 3, "control character U+0001 is not allowed in a comment" },
    { "# \31", 1, 3, "control character U+001F is not allowed in a comment" },
    { "# form \12 feed", 1, 8, "control character U+000C is not allowed in a comment" },
    { "a = 1 # \8", 1, 9, "control character U+0008 is not allowed in a comment" },
    { "# ✓ é \0", 1, 7, "control character U+0000" },
    { "\0", 1, 1, "expected a key, found control character U+0000" },
    { "\12a = 1", 1, 1, "expected a key, found control character U+000C" },
    { "a\11= 1", 1, 2, "expected '=' after key 'a', found control character U+000B" },
    { "a = 1\n\127", 2, 1, "expected a key, found control character U+007F" },
  })

  invalid_docs("invalid UTF-8", {
    { "a = \"\255\"", 1, 6, "invalid UTF-8 byte 0xFF" },
    { "a = \"\128\"", 1, 6, "invalid UTF-8 byte 0x80" },
    { "# \192\175\na = 1", 1, 3, "invalid UTF-8 byte 0xC0" },
    { "a = '\237\160\128'", 1, 6, "invalid UTF-8 byte 0xED" },
    { "a = \"\226\130\"", 1, 6, "invalid UTF-8 byte 0xE2" },
    { "a = 1\nb = 'é\244\144\128\128'", 2, 7, "invalid UTF-8 byte 0xF4" },
    { "a = \"\"\"\n\248\136\128\128\128\"\"\"", 2, 1, "invalid UTF-8 byte 0xF8" },
    { "a = 1 # \226", 1, 9, "invalid UTF-8 byte 0xE2" },
    { "\255\254a\0 \0=\0 \0001\0", 1, 1, "invalid UTF-8 byte 0xFF" },
    { "a = 1\239\187\191", 1, 6, "expected end of line after value, found '\239\187\191'" },
  })

  describe("error positions", function()
    it("counts columns in characters, not bytes", function()
      local _, err = toml.parse("s = \"ééé\" x")
      assert.are.equal("<string>:1:11: expected end of line after value, found 'x'", err)
    end)

    it("counts columns after multi-byte characters in a comment on an earlier line", function()
      local _, err = toml.parse("# ✓✓✓\na = \"€\" ?")
      assert.are.equal("<string>:2:9: expected end of line after value, found '?'", err)
    end)

    it("counts lines across multi-line strings", function()
      local _, err = toml.parse("a = \"\"\"\none\ntwo\n\"\"\"\nb = ?")
      assert.are.equal("<string>:5:5: expected a value, found '?'", err)
    end)

    it("counts CRLF as one line break", function()
      local _, err = toml.parse("a = 1\r\nb = 2\r\nc = ?")
      assert.are.equal("<string>:3:5: expected a value, found '?'", err)
    end)

    it("counts columns from the start of the line after a byte order mark", function()
      local _, err = toml.parse("\239\187\191a = ?")
      assert.are.equal("<string>:1:5: expected a value, found '?'", err)
    end)

    it("reports errors on the last line of a document without a final newline", function()
      local _, err = toml.parse("a = 1\n\n[t]\nb = [1, 2")
      assert.are.equal("<string>:4:10: unterminated array (opened at line 4, column 5)", err)
    end)

    it("reports a duplicate key with the place of the first definition", function()
      local _, err = toml.parse("[server]\nport = 80\nhost = \"x\"\n  port = 81")
      assert.are.equal("<string>:4:3: duplicate key 'port' (defined at line 2, column 1)", err)
    end)

    it("quotes keys that are not bare in messages", function()
      local _, err = toml.parse("[\"a b\".c]\n[\"a b\".c]")
      assert.are.equal("<string>:2:8: table '\"a b\".c' is defined twice (defined at line 1, column 8)", err)
    end)

    it("shortens very long tokens in messages", function()
      local _, err = toml.parse("a = 1" .. string.rep("x", 100))
      assert.is_truthy(err:find("invalid value '1xxx", 1, true))
      assert.is_true(#err < 100)
    end)
  end)
end)
