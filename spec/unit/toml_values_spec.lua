-- Scalar, array and inline-table values of the TOML decoder.
local toml = require("tenement.toml")

local expected_array_mt, expected_datetime_mt = {}, {}

-- Marks an expected value as an array (plain tables mean TOML tables).
local function A(t)
  return setmetatable(t, expected_array_mt)
end

-- An expected date/time: its kind and its tostring() text.
local function DT(kind, text)
  return setmetatable({ kind = kind, text = text }, expected_datetime_mt)
end

-- Returns nil when `got` is exactly `exp` (types included), else where and
-- how they differ.
local function mismatch(exp, got, path)
  path = path or "doc"
  local emt = getmetatable(exp)
  if type(exp) == "number" then
    if math.type(got) ~= math.type(exp) then
      return string.format("%s: expected %s %s, got %s %s", path, math.type(exp), tostring(exp),
        math.type(got) or type(got), tostring(got))
    end
    if exp ~= exp then
      if got ~= got then
        return nil
      end
      return path .. ": expected nan, got " .. tostring(got)
    end
    if exp ~= got or (exp == 0 and 1 / exp ~= 1 / got) then
      return string.format("%s: expected %s, got %s", path, tostring(exp), tostring(got))
    end
    return nil
  elseif type(exp) ~= "table" then
    if type(got) ~= type(exp) or got ~= exp then
      return string.format("%s: expected %s %q, got %s %q", path, type(exp), tostring(exp), type(got), tostring(got))
    end
    return nil
  elseif emt == expected_datetime_mt then
    if type(got) ~= "table" or getmetatable(got) ~= toml.datetime_mt then
      return path .. ": expected a date/time, got " .. tostring(got)
    end
    if got.kind ~= exp.kind or tostring(got) ~= exp.text then
      return string.format("%s: expected %s %s, got %s %s", path, exp.kind, exp.text, got.kind, tostring(got))
    end
    return nil
  elseif emt == expected_array_mt then
    if type(got) ~= "table" or getmetatable(got) ~= toml.array_mt then
      return path .. ": expected an array, got " .. tostring(got)
    end
    local count = 0
    for _ in pairs(got) do
      count = count + 1
    end
    if count ~= #exp or #got ~= #exp then
      return string.format("%s: expected %d elements, got %d", path, #exp, count)
    end
    for i = 1, #exp do
      local problem = mismatch(exp[i], got[i], path .. "[" .. i .. "]")
      if problem then
        return problem
      end
    end
    return nil
  end
  if type(got) ~= "table" or getmetatable(got) ~= toml.table_mt then
    return path .. ": expected a table, got " .. tostring(got)
  end
  for k, v in pairs(exp) do
    local problem = mismatch(v, got[k], path .. "." .. k)
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

local function check_valid(text, expected)
  local doc, err = toml.parse(text)
  assert.is_nil(err)
  assert.is_nil(mismatch(expected, doc))
end

local function check_invalid(text, line, col, fragment)
  local doc, err = toml.parse(text)
  assert.is_nil(doc)
  assert.is_string(err)
  local prefix = string.format("<string>:%d:%d: ", line, col)
  assert.is_true(err:sub(1, #prefix) == prefix, "expected " .. prefix .. "..., got " .. err)
  assert.is_true(err:find(fragment, #prefix + 1, true) ~= nil,
    "expected the message to mention '" .. fragment .. "', got " .. err)
end

-- Cases are { toml, value of x } for valid and { toml, line, col, fragment }
-- for invalid documents.
local function valid_values(title, cases)
  describe(title, function()
    for _, case in ipairs(cases) do
      it("decodes " .. label(case[1]), function()
        check_valid(case[1], { x = case[2] })
      end)
    end
  end)
end

local function invalid_docs(title, cases)
  describe(title, function()
    for _, case in ipairs(cases) do
      it("rejects " .. label(case[1]), function()
        check_invalid(case[1], case[2], case[3], case[4])
      end)
    end
  end)
end

describe("toml values", function()
  valid_values("basic strings", {
    { [[x = "hello"]], "hello" },
    { [[x = ""]], "" },
    { [[x = "with 'single' quotes"]], "with 'single' quotes" },
    { [[x = "# not a comment"]], "# not a comment" },
    { [[x = "b\bt\tn\nf\fr\r"]], "b\bt\tn\nf\fr\r" },
    { [[x = "q\"q"]], 'q"q' },
    { [[x = "back\\slash"]], "back\\slash" },
    { [[x = "\\\""]], '\\"' },
    { [[x = "\u00e9\u00E9"]], "éé" },
    { [[x = "\u0000"]], "\0" },
    { [[x = "\u007F"]], "\127" },
    { [[x = "\u20AC"]], "€" },
    { [[x = "\U0001F600"]], "😀" },
    { [[x = "\U0010FFFF"]], "\u{10FFFF}" },
    { [[x = "\uD7FF\uE000"]], "\u{D7FF}\u{E000}" },
    { "x = \"tab\there\"", "tab\there" },
    { [[x = "ünïcødé ✓"]], "ünïcødé ✓" },
    { [[x = "\u0041BC"]], "ABC" },
    { [[x = "ends with escaped backslash\\"]], "ends with escaped backslash\\" },
  })

  describe("a backslash before a line break or a control character in a basic string", function()
    it("gets a one-line message that says where such a backslash works", function()
      for _, text in ipairs { 'x = "a\\\nb"', 'x = "a\\\r\nb"' } do
        local _, err = toml.parse(text)
        assert.are.equal('<string>:1:7: a backslash cannot end a line of a single-line string:'
          .. ' use a """multi-line""" string for a line-ending backslash', err)
      end
      local _, err = toml.parse('x = "a\\\tb"')
      assert.are.equal("<string>:1:7: invalid escape sequence: a backslash followed by"
        .. " control character U+0009", err)
    end)
  end)

  invalid_docs("invalid basic strings", {
    { [[x = "unterminated]], 1, 5, "unterminated string" },
    { 'x = "line\nbreak"', 1, 5, "cannot contain a newline" },
    { 'x = "line\r\nbreak"', 1, 5, "cannot contain a newline" },
    { [[x = "\x41"]], 1, 6, "invalid escape sequence '\\x'" },
    { [[x = "\e"]], 1, 6, "invalid escape sequence '\\e'" },
    { [[x = "\a"]], 1, 6, "invalid escape sequence '\\a'" },
    { [[x = "\0"]], 1, 6, "invalid escape sequence '\\0'" },
    { [[x = "\'"]], 1, 6, "invalid escape sequence" },
    { [[x = "a\ b"]], 1, 7, "invalid escape sequence '\\ '" },
    { [[x = "\é"]], 1, 6, "invalid escape sequence '\\é'" },
    { [[x = "\u12"]], 1, 6, "4 hexadecimal digits" },
    { [[x = "\u12G4"]], 1, 6, "4 hexadecimal digits" },
    { [[x = "\U0001F60"]], 1, 6, "8 hexadecimal digits" },
    { [[x = "\uD800"]], 1, 6, "not a Unicode scalar value" },
    { [[x = "\uDFFF"]], 1, 6, "not a Unicode scalar value" },
    { [[x = "\U0000DABC"]], 1, 6, "not a Unicode scalar value" },
    { [[x = "\U00110000"]], 1, 6, "not a Unicode scalar value" },
    { [[x = "\UFFFFFFFF"]], 1, 6, "not a Unicode scalar value" },
    { [[x = "ok\"]], 1, 5, "unterminated string" },
    { [[x = "\]], 1, 6, "unterminated escape sequence" },
    { 'x = "nul\0"', 1, 9, "control character U+0000" },
    { 'x = "\1"', 1, 6, "control character U+0001" },
    { 'x = "\31"', 1, 6, "control character U+001F" },
    { 'x = "del\127"', 1, 9, "control character U+007F" },
    { 'x = "bs\8"', 1, 8, "control character U+0008" },
    { 'x = "ff\12"', 1, 8, "control character U+000C" },
    { 'x = "é\1"', 1, 7, "control character U+0001" },
  })

  valid_values("literal strings", {
    { [[x = 'C:\Users\nodejs\templates']], [[C:\Users\nodejs\templates]] },
    { [[x = '']], "" },
    { [[x = 'Tom "Dubs" Preston-Werner']], 'Tom "Dubs" Preston-Werner' },
    { [[x = '<\i\c*\s*>']], [[<\i\c*\s*>]] },
    { [[x = '\u00e9']], [[\u00e9]] },
    { "x = 'a\tb'", "a\tb" },
    { [[x = 'ends with backslash\']], "ends with backslash\\" },
    { [[x = '# no comment']], "# no comment" },
  })

  invalid_docs("invalid literal strings", {
    { [[x = 'unterminated]], 1, 5, "unterminated string" },
    { "x = 'line\nbreak'", 1, 5, "cannot contain a newline" },
    { "x = 'a\0'", 1, 7, "control character U+0000" },
    { "x = 'a\127'", 1, 7, "control character U+007F" },
    { "x = 'a\27b'", 1, 7, "control character U+001B" },
    { [[x = 'it's']], 1, 9, "expected end of line after value, found 's'" },
  })

  valid_values("multi-line basic strings", {
    { 'x = """\nRoses are red\nViolets are blue"""', "Roses are red\nViolets are blue" },
    { 'x = """\r\nRoses\r\nViolets"""', "Roses\nViolets" },
    { 'x = """\n\nkeeps second newline"""', "\nkeeps second newline" },
    { 'x = """no newline"""', "no newline" },
    { 'x = """"""', "" },
    { 'x = """\n"""', "" },
    { 'x = """one " two "" three"""', 'one " two "" three' },
    { 'x = """ends with one quote""""', 'ends with one quote"' },
    { 'x = """ends with two quotes"""""', 'ends with two quotes""' },
    { 'x = """"starts with a quote"""', '"starts with a quote' },
    { 'x = """""""', '"' },
    { 'x = """"""""', '""' },
    { 'x = """The quick brown \\\n\n\n  fox jumps over \\\n    the lazy dog."""',
      "The quick brown fox jumps over the lazy dog." },
    { 'x = """\\\n       The quick brown \\\n       fox.\\\n       """', "The quick brown fox." },
    { 'x = """trailing ws after backslash \\   \t\n   next"""', "trailing ws after backslash next" },
    { 'x = """crlf \\\r\n   next"""', "crlf next" },
    { 'x = """a\\\n\n  \n\t\n  b"""', "ab" },
    { 'x = """a \\\n"""', "a " },
    { 'x = """tab\there"""', "tab\there" },
    { 'x = """esc \\t \\u00e9 \\"\\"\\" \\\\"""', 'esc \t é """ \\' },
    { 'x = """lol\\""""', 'lol"' },
    { 'x = """# not a comment\n[not.a.table]"""', "# not a comment\n[not.a.table]" },
  })

  invalid_docs("invalid multi-line basic strings", {
    { 'x = """unterminated', 1, 5, "unterminated multi-line string" },
    { 'x = """unterminated""', 1, 5, "unterminated multi-line string" },
    { 'x = """six quotes: """"""', 1, 25, "expected end of line after value, found '\"'" },
    { 'x = """closes """ early"""', 1, 19, "expected end of line after value, found 'e'" },
    { 'x = """a \\ b"""', 1, 10, "line-ending backslash" },
    { 'x = """bad \\q"""', 1, 12, "invalid escape sequence '\\q'" },
    { 'x = """bad \\uD834"""', 1, 12, "not a Unicode scalar value" },
    { 'x = """nul \0"""', 1, 12, "control character U+0000" },
    { 'x = """del \127"""', 1, 12, "control character U+007F" },
    { 'x = """a\rb"""', 1, 9, "carriage return not followed by a line feed" },
    { 'x = """a\\\n  \rb"""', 2, 3, "carriage return not followed by a line feed" },
    { 'x = """\nline two \1"""', 2, 10, "control character U+0001" },
  })

  valid_values("multi-line literal strings", {
    { "x = '''\nThe first newline is\ntrimmed in raw strings.\n   All other whitespace\n   is preserved.\n'''",
      "The first newline is\ntrimmed in raw strings.\n   All other whitespace\n   is preserved.\n" },
    { "x = '''I [dw]on't need \\d{2} apples'''", "I [dw]on't need \\d{2} apples" },
    { "x = ''''''", "" },
    { "x = '''\r\na\r\nb'''", "a\nb" },
    { "x = '''no \\ escapes \\n here\\'''", "no \\ escapes \\n here\\" },
    { "x = ''''one quote''''", "'one quote'" },
    { "x = '''''two quotes'''''", "''two quotes''" },
    { "x = '''a '' b ' c'''", "a '' b ' c" },
    { "x = '''tab\tx'''", "tab\tx" },
  })

  invalid_docs("invalid multi-line literal strings", {
    { "x = '''unterminated", 1, 5, "unterminated multi-line string" },
    { "x = '''six: ''''''", 1, 18, "expected end of line after value, found '''" },
    { "x = '''a\0'''", 1, 9, "control character U+0000" },
    { "x = '''a\127'''", 1, 9, "control character U+007F" },
    { "x = '''a\rb'''", 1, 9, "carriage return not followed by a line feed" },
    { "x = '''\n\27'''", 2, 1, "control character U+001B" },
  })

  valid_values("integers", {
    { "x = 99", 99 },
    { "x = +99", 99 },
    { "x = 42", 42 },
    { "x = 0", 0 },
    { "x = -17", -17 },
    { "x = -0", 0 },
    { "x = +0", 0 },
    { "x = 1_000", 1000 },
    { "x = 5_349_221", 5349221 },
    { "x = 53_49_221", 5349221 },
    { "x = 1_2_3_4_5", 12345 },
    { "x = 9223372036854775807", math.maxinteger },
    { "x = -9223372036854775808", math.mininteger },
    { "x = 9_223_372_036_854_775_807", math.maxinteger },
    { "x = 0xDEADBEEF", 0xDEADBEEF },
    { "x = 0xdeadbeef", 0xDEADBEEF },
    { "x = 0xdead_beef", 0xDEADBEEF },
    { "x = 0x0", 0 },
    { "x = 0x00ff", 255 },
    { "x = 0x7FFFFFFFFFFFFFFF", math.maxinteger },
    { "x = 0x00007FFFFFFFFFFFFFFF", math.maxinteger },
    { "x = 0o01234567", 342391 },
    { "x = 0o755", 493 },
    { "x = 0o777777777777777777777", math.maxinteger },
    { "x = 0b11010110", 214 },
    { "x = 0b1_0_1", 5 },
    { "x = 0b0", 0 },
    { "x = 0b" .. string.rep("1", 63), math.maxinteger },
  })

  invalid_docs("invalid integers", {
    { "x = 01", 1, 5, "leading zeros are not allowed" },
    { "x = 00", 1, 5, "leading zeros are not allowed" },
    { "x = -01", 1, 5, "leading zeros are not allowed" },
    { "x = +0_1", 1, 5, "leading zeros are not allowed" },
    { "x = 1__000", 1, 5, "'_' is only allowed between digits" },
    { "x = _1", 1, 5, "'_' is only allowed between digits" },
    { "x = 1_", 1, 5, "'_' is only allowed between digits" },
    { "x = +_1", 1, 5, "'_' is only allowed between digits" },
    { "x = 9223372036854775808", 1, 5, "does not fit in 64 bits" },
    { "x = -9223372036854775809", 1, 5, "does not fit in 64 bits" },
    { "x = 99999999999999999999", 1, 5, "does not fit in 64 bits" },
    { "x = 0x8000000000000000", 1, 5, "does not fit in 64 bits" },
    { "x = 0xFFFFFFFFFFFFFFFF", 1, 5, "does not fit in 64 bits" },
    { "x = 0x1_0000_0000_0000_0000", 1, 5, "does not fit in 64 bits" },
    { "x = 0o1000000000000000000000", 1, 5, "does not fit in 64 bits" },
    { "x = 0b1" .. string.rep("0", 63), 1, 5, "does not fit in 64 bits" },
    { "x = +0x1", 1, 5, "cannot have a sign" },
    { "x = -0x1", 1, 5, "cannot have a sign" },
    { "x = -0o7", 1, 5, "cannot have a sign" },
    { "x = +0b1", 1, 5, "cannot have a sign" },
    { "x = 0X1F", 1, 5, "invalid value '0X1F'" },
    { "x = 0O17", 1, 5, "invalid value '0O17'" },
    { "x = 0B1", 1, 5, "invalid value '0B1'" },
    { "x = 0x", 1, 5, "incomplete hexadecimal integer" },
    { "x = 0o", 1, 5, "incomplete octal integer" },
    { "x = 0b", 1, 5, "incomplete binary integer" },
    { "x = 0xG", 1, 5, "invalid hexadecimal integer" },
    { "x = 0o8", 1, 5, "invalid octal integer" },
    { "x = 0b102", 1, 5, "invalid binary integer" },
    { "x = 0x_1", 1, 5, "invalid hexadecimal integer" },
    { "x = 0x1_", 1, 5, "invalid hexadecimal integer" },
    { "x = 0o1__2", 1, 5, "invalid octal integer" },
    { "x = 0b_1", 1, 5, "invalid binary integer" },
    { "x = 1 2", 1, 7, "expected end of line after value, found '2'" },
    { "x = 42 the answer", 1, 8, "expected end of line after value, found 't'" },
    { "x = ++1", 1, 5, "invalid value '++1'" },
    { "x = --1", 1, 5, "invalid value '--1'" },
    { "x = 1-2", 1, 5, "invalid value '1-2'" },
    { "x = 1,000", 1, 6, "expected end of line after value, found ','" },
    { "x = +", 1, 5, "invalid value '+'" },
    { "x = -", 1, 5, "invalid value '-'" },
  })

  valid_values("floats", {
    { "x = 1.0", 1.0 },
    { "x = +1.0", 1.0 },
    { "x = 3.1415", 3.1415 },
    { "x = -0.01", -0.01 },
    { "x = 5e+22", 5e+22 },
    { "x = 1e06", 1e6 },
    { "x = 1e007", 1e7 },
    { "x = -2E-2", -2e-2 },
    { "x = 6.626e-34", 6.626e-34 },
    { "x = 224_617.445_991_228", 224617.445991228 },
    { "x = 1_000.000_1", 1000.0001 },
    { "x = 1e1_0", 1e10 },
    { "x = 0.0", 0.0 },
    { "x = +0.0", 0.0 },
    { "x = -0.0", -0.0 },
    { "x = 0e0", 0.0 },
    { "x = -0e0", -0.0 },
    { "x = 0.0e-0", 0.0 },
    { "x = 123e-2", 1.23 },
    { "x = 3.141592653589793", 3.141592653589793 },
    { "x = 1.7976931348623157e308", 1.7976931348623157e308 },
    { "x = 5e-324", 5e-324 },
    { "x = 9_007_199_254_740_991.0", 9007199254740991.0 },
    { "x = 1e400", math.huge },
    { "x = -1e400", -math.huge },
    { "x = inf", math.huge },
    { "x = +inf", math.huge },
    { "x = -inf", -math.huge },
    { "x = nan", 0 / 0 },
    { "x = +nan", 0 / 0 },
    { "x = -nan", 0 / 0 },
  })

  invalid_docs("invalid floats", {
    { "x = 1.", 1, 5, "a digit must follow the decimal point" },
    { "x = 1.e5", 1, 5, "a digit must follow the decimal point" },
    { "x = .5", 1, 5, "a digit must come before the decimal point" },
    { "x = -.5", 1, 5, "a digit must come before the decimal point" },
    { "x = +.5", 1, 5, "a digit must come before the decimal point" },
    { "x = 1e", 1, 5, "the exponent has no digits" },
    { "x = 1e+", 1, 5, "the exponent has no digits" },
    { "x = 1.5E-", 1, 5, "the exponent has no digits" },
    { "x = 01.5", 1, 5, "leading zeros are not allowed" },
    { "x = -01.5", 1, 5, "leading zeros are not allowed" },
    { "x = 00e1", 1, 5, "leading zeros are not allowed" },
    { "x = 1_.5", 1, 5, "'_' is only allowed between digits" },
    { "x = 1._5", 1, 5, "'_' is only allowed between digits" },
    { "x = 1.5_", 1, 5, "'_' is only allowed between digits" },
    { "x = 1.5__1", 1, 5, "'_' is only allowed between digits" },
    { "x = 1e_5", 1, 5, "'_' is only allowed between digits" },
    { "x = 1e5_", 1, 5, "'_' is only allowed between digits" },
    { "x = 1_e5", 1, 5, "'_' is only allowed between digits" },
    { "x = 1.5.5", 1, 5, "invalid float '1.5.5'" },
    { "x = 1e5e5", 1, 5, "invalid float '1e5e5'" },
    { "x = 1e2.3", 1, 5, "invalid float '1e2.3'" },
    { "x = 1.2e3.4", 1, 5, "invalid float '1.2e3.4'" },
    { "x = Inf", 1, 5, "invalid value 'Inf'" },
    { "x = NaN", 1, 5, "invalid value 'NaN'" },
    { "x = infinity", 1, 5, "invalid value 'infinity'" },
    { "x = in", 1, 5, "invalid value 'in'" },
    { "x = inf_", 1, 5, "invalid value 'inf_'" },
    { "x = nan_", 1, 5, "invalid value 'nan_'" },
    { "x = ++inf", 1, 5, "invalid value '++inf'" },
    { "x = e5", 1, 5, "invalid value 'e5'" },
  })

  valid_values("booleans", {
    { "x = true", true },
    { "x = false", false },
    { "x=true#comment", true },
  })

  invalid_docs("invalid booleans", {
    { "x = True", 1, 5, "invalid value 'True'" },
    { "x = FALSE", 1, 5, "invalid value 'FALSE'" },
    { "x = tru", 1, 5, "invalid value 'tru'" },
    { "x = truee", 1, 5, "invalid value 'truee'" },
    { "x = t", 1, 5, "invalid value 't'" },
    { "x = f", 1, 5, "invalid value 'f'" },
    { "x = yes", 1, 5, "invalid value 'yes'" },
    { "x = true false", 1, 10, "expected end of line after value, found 'f'" },
  })

  valid_values("offset date-times", {
    { "x = 1979-05-27T07:32:00Z", DT("offset-datetime", "1979-05-27T07:32:00Z") },
    { "x = 1979-05-27t07:32:00z", DT("offset-datetime", "1979-05-27T07:32:00Z") },
    { "x = 1979-05-27 07:32:00Z", DT("offset-datetime", "1979-05-27T07:32:00Z") },
    { "x = 1979-05-27T00:32:00-07:00", DT("offset-datetime", "1979-05-27T00:32:00-07:00") },
    { "x = 1979-05-27T00:32:00+05:30", DT("offset-datetime", "1979-05-27T00:32:00+05:30") },
    { "x = 1979-05-27T00:32:00+00:00", DT("offset-datetime", "1979-05-27T00:32:00Z") },
    { "x = 1979-05-27T00:32:00-00:00", DT("offset-datetime", "1979-05-27T00:32:00Z") },
    { "x = 1979-05-27T00:32:00.999999-07:00", DT("offset-datetime", "1979-05-27T00:32:00.999999-07:00") },
    { "x = 1979-05-27T00:32:00.5Z", DT("offset-datetime", "1979-05-27T00:32:00.5Z") },
    { "x = 1979-05-27T00:32:00.500Z", DT("offset-datetime", "1979-05-27T00:32:00.500Z") },
    { "x = 1987-07-05T17:45:56.123456789123Z", DT("offset-datetime", "1987-07-05T17:45:56.123456789123Z") },
    { "x = 1979-05-27T23:59:59+23:59", DT("offset-datetime", "1979-05-27T23:59:59+23:59") },
    { "x = 0000-01-01T00:00:00Z", DT("offset-datetime", "0000-01-01T00:00:00Z") },
    { "x = 9999-12-31T23:59:59Z", DT("offset-datetime", "9999-12-31T23:59:59Z") },
    { "x = 2000-02-29T12:00:00Z", DT("offset-datetime", "2000-02-29T12:00:00Z") },
  })

  valid_values("local date-times", {
    { "x = 1979-05-27T07:32:00", DT("local-datetime", "1979-05-27T07:32:00") },
    { "x = 1979-05-27 07:32:00", DT("local-datetime", "1979-05-27T07:32:00") },
    { "x = 1979-05-27t07:32:00", DT("local-datetime", "1979-05-27T07:32:00") },
    { "x = 1979-05-27T00:32:00.999999", DT("local-datetime", "1979-05-27T00:32:00.999999") },
    { "x = 1977-12-21T10:32:00.555", DT("local-datetime", "1977-12-21T10:32:00.555") },
  })

  valid_values("local dates", {
    { "x = 1979-05-27", DT("local-date", "1979-05-27") },
    { "x = 1979-05-27 # comment", DT("local-date", "1979-05-27") },
    { "x = 2000-02-29", DT("local-date", "2000-02-29") },
    { "x = 2024-02-29", DT("local-date", "2024-02-29") },
    { "x = 2400-02-29", DT("local-date", "2400-02-29") },
    { "x = 2023-01-31", DT("local-date", "2023-01-31") },
    { "x = 2023-04-30", DT("local-date", "2023-04-30") },
    { "x = 2023-12-31", DT("local-date", "2023-12-31") },
  })

  valid_values("local times", {
    { "x = 07:32:00", DT("local-time", "07:32:00") },
    { "x = 00:32:00.999999", DT("local-time", "00:32:00.999999") },
    { "x = 23:59:59", DT("local-time", "23:59:59") },
    { "x = 00:00:00", DT("local-time", "00:00:00") },
    { "x = 10:32:00.5", DT("local-time", "10:32:00.5") },
  })

  invalid_docs("invalid dates and times", {
    { "x = 1979-13-01", 1, 5, "month 13 is not in 01-12" },
    { "x = 1979-00-01", 1, 5, "month 00 is not in 01-12" },
    { "x = 1979-05-32", 1, 5, "day 32 does not exist in 1979-05" },
    { "x = 1979-05-00", 1, 5, "day 00 does not exist in 1979-05" },
    { "x = 2023-02-29", 1, 5, "day 29 does not exist in 2023-02" },
    { "x = 1900-02-29", 1, 5, "day 29 does not exist in 1900-02" },
    { "x = 2024-02-30", 1, 5, "day 30 does not exist in 2024-02" },
    { "x = 2023-04-31", 1, 5, "day 31 does not exist in 2023-04" },
    { "x = 2023-11-31T00:00:00Z", 1, 5, "day 31 does not exist in 2023-11" },
    { "x = 1979-05-27T24:00:00", 1, 5, "hour 24 is not in 00-23" },
    { "x = 1979-05-27T23:60:00", 1, 5, "minute 60 is not in 00-59" },
    { "x = 1979-05-27T23:59:60Z", 1, 5, "second 60 is not in 00-59" },
    { "x = 23:59:61", 1, 5, "second 61 is not in 00-59" },
    { "x = 25:00:00", 1, 5, "hour 25 is not in 00-23" },
    { "x = 1979-05-27T07:32Z", 1, 5, "invalid time: expected HH:MM:SS" },
    { "x = 1979-05-27T07:32", 1, 5, "invalid time: expected HH:MM:SS" },
    { "x = 1979-05-27 07:32", 1, 5, "invalid time: expected HH:MM:SS" },
    { "x = 07:32", 1, 5, "invalid time: expected HH:MM:SS" },
    { "x = 7:32:00", 1, 6, "expected end of line after value, found ':'" },
    { "x = 07:3:00", 1, 5, "invalid time: expected HH:MM:SS" },
    { "x = 1979-05-27T7:32:00", 1, 5, "invalid time: expected HH:MM:SS" },
    { "x = 1979-05-27T", 1, 5, "invalid time: expected HH:MM:SS" },
    { "x = 1979-5-27", 1, 5, "invalid date: expected YYYY-MM-DD" },
    { "x = 1979-05-7", 1, 5, "invalid date: expected YYYY-MM-DD" },
    { "x = 79-05-27", 1, 5, "invalid value '79-05-27'" },
    { "x = 1979-05-27T07:32:00.", 1, 24, "expected digits after '.'" },
    { "x = 07:32:00.Z", 1, 13, "expected digits after '.'" },
    { "x = 1979-05-27T07:32:00+24:00", 1, 24, "invalid UTC offset +24:00" },
    { "x = 1979-05-27T07:32:00-07:60", 1, 24, "invalid UTC offset -07:60" },
    { "x = 1979-05-27T07:32:00+0700", 1, 24, "expected +HH:MM or -HH:MM" },
    { "x = 1979-05-27T07:32:00+7:00", 1, 24, "expected +HH:MM or -HH:MM" },
    { "x = 1979-05-27T07:32:00-07", 1, 24, "expected +HH:MM or -HH:MM" },
    { "x = 07:32:00Z", 1, 13, "expected end of line after value, found 'Z'" },
    { "x = 07:32:00-07:00", 1, 13, "expected end of line after value, found '-'" },
    { "x = 1979-05-27Z", 1, 15, "expected end of line after value, found 'Z'" },
    { "x = 1979-05-27T07:32:00ZZ", 1, 25, "expected end of line after value, found 'Z'" },
    { "x = 1979-05-2707:32:00", 1, 15, "expected end of line after value, found '0'" },
    { "x = 1979-05-27_07:32:00", 1, 15, "expected end of line after value, found '_'" },
    { "x = 1979-05-27  07:32:00", 1, 17, "expected end of line after value, found '0'" },
  })

  valid_values("arrays", {
    { "x = []", A {} },
    { "x = [ ]", A {} },
    { "x = [1, 2, 3]", A { 1, 2, 3 } },
    { "x = [1,2,3]", A { 1, 2, 3 } },
    { "x = [1, 2, 3,]", A { 1, 2, 3 } },
    { "x = [\n  1,\n  2,\n]", A { 1, 2 } },
    { "x = [\r\n  1,\r\n  2\r\n]", A { 1, 2 } },
    { "x = [ # comment\n  1, # one\n  # standalone\n  2 # two\n  , 3\n]", A { 1, 2, 3 } },
    { "x = [\n# only a comment\n]", A {} },
    { "x = [\"red\", 'yellow', \"\"\"green\"\"\"]", A { "red", "yellow", "green" } },
    { "x = [[1, 2], [\"a\", \"b\"]]", A { A { 1, 2 }, A { "a", "b" } } },
    { "x = [[[]]]", A { A { A {} } } },
    { "x = [0.1, 0.2, 1]", A { 0.1, 0.2, 1 } },
    { "x = [1, \"two\", 3.0, true, 1979-05-27, [4], {five = 5}]",
      A { 1, "two", 3.0, true, DT("local-date", "1979-05-27"), A { 4 }, { five = 5 } } },
    { "x = [{a = 1}, {a = 2}]", A { { a = 1 }, { a = 2 } } },
    { "x = [{}, {}]", A { {}, {} } },
    { "x = [\" \\\", \", ]", A { ' ", ' } },
    { "x = [1979-05-27 07:32:00, 07:32:00]",
      A { DT("local-datetime", "1979-05-27T07:32:00"), DT("local-time", "07:32:00") } },
    { "x = [inf, -inf]", A { math.huge, -math.huge } },
  })

  invalid_docs("invalid arrays", {
    { "x = [1 2]", 1, 8, "expected ',' or ']' after an array element, found '2'" },
    { "x = [1,,2]", 1, 8, "expected a value, found ','" },
    { "x = [,]", 1, 6, "expected a value, found ','" },
    { "x = [,1]", 1, 6, "expected a value, found ','" },
    { "x = [1,2,,]", 1, 10, "expected a value, found ','" },
    { "x = [1, 2", 1, 10, "unterminated array (opened at line 1, column 5)" },
    { "x = [1, 2,", 1, 11, "unterminated array (opened at line 1, column 5)" },
    { "x = [", 1, 6, "unterminated array" },
    { "x = [\n1,\n2\n", 4, 1, "unterminated array (opened at line 1, column 5)" },
    { "x = [1, 2]]", 1, 11, "expected end of line after value, found ']'" },
    { "x = [1}", 1, 7, "expected ',' or ']' after an array element, found '}'" },
    { "x = [1 # comment ]", 1, 19, "unterminated array" },
    { "x = [a]", 1, 6, "invalid value 'a'" },
    { "x = [\"a\" \"b\"]", 1, 10, "expected ',' or ']'" },
    { "x = [1, 2] 3", 1, 12, "expected end of line after value, found '3'" },
    { "x = [1\r2]", 1, 7, "carriage return not followed by a line feed" },
  })

  valid_values("inline tables", {
    { "x = {}", {} },
    { "x = { }", {} },
    { "x = { first = \"Tom\", last = \"Preston-Werner\" }", { first = "Tom", last = "Preston-Werner" } },
    { "x = {a=1,b=2}", { a = 1, b = 2 } },
    { "x = { x = 1, y = 2 }", { x = 1, y = 2 } },
    { "x = { type.name = \"pug\" }", { type = { name = "pug" } } },
    { "x = { a.b = 1, a.c = 2, d = 3 }", { a = { b = 1, c = 2 }, d = 3 } },
    { "x = { a = { b = { c = {} } } }", { a = { b = { c = {} } } } },
    { "x = { \"quoted key\" = 1, 'lit' = 2, \"\" = 3 }", { ["quoted key"] = 1, lit = 2, [""] = 3 } },
    { "x = { arr = [1, 2], tbl = {} }", { arr = A { 1, 2 }, tbl = {} } },
    { "x = { arr = [\n1,\n2\n] }", { arr = A { 1, 2 } } },
    { "x = { a = true, b = false }", { a = true, b = false } },
    { "x = { d = 1979-05-27T07:32:00Z }", { d = DT("offset-datetime", "1979-05-27T07:32:00Z") } },
    { "x = {\ta\t=\t1\t}", { a = 1 } },
    { "x = { s = \"\"\"\nmulti\nline\"\"\", t = '''\nraw''', n = 1 }", { s = "multi\nline", t = "raw", n = 1 } },
  })

  invalid_docs("invalid inline tables", {
    { "x = {a = 1,}", 1, 12, "trailing comma is not allowed in an inline table" },
    { "x = {,}", 1, 6, "expected a key, found ','" },
    { "x = {a = 1,, b = 2}", 1, 12, "expected a key, found ','" },
    { "x = {a = 1 b = 2}", 1, 12, "expected ',' or '}' after an inline table entry, found 'b'" },
    { "x = {\n}", 1, 6, "newlines are not allowed in an inline table" },
    { "x = {a = 1\n}", 1, 11, "newlines are not allowed in an inline table" },
    { "x = {a = 1,\nb = 2}", 1, 12, "newlines are not allowed in an inline table" },
    { "x = {a = 1 # comment\n}", 1, 12, "expected ',' or '}' after an inline table entry, found '#'" },
    { "x = {a = 1", 1, 11, "unterminated inline table" },
    { "x = {a = 1,", 1, 12, "unterminated inline table" },
    { "x = {", 1, 6, "unterminated inline table" },
    { "x = {a = 1, a = 2}", 1, 13, "duplicate key 'a' (defined at line 1, column 6)" },
    { "x = {a.b = 1, a.b = 2}", 1, 17, "duplicate key 'a.b' (defined at line 1, column 8)" },
    { "x = {a = {b = 1}, a.c = 2}", 1, 19, "cannot add keys to inline table 'a'" },
    { "x = {a.b = 1, a = 2}", 1, 15, "duplicate key 'a'" },
    { "x = {a = 1, a.b = 2}", 1, 13, "key 'a' is already defined as a value" },
    { "x = {a}", 1, 7, "expected '=' after key 'a', found '}'" },
    { "x = {a = }", 1, 10, "expected a value, found '}'" },
    { "x = {a = 1]", 1, 11, "expected ',' or '}' after an inline table entry, found ']'" },
  })

  describe("value types", function()
    it("decodes integers as Lua integers and floats as Lua floats", function()
      local doc = assert(toml.parse("i = 1\nf = 1.0\ne = 1e2\nh = 0x10"))
      assert.are.equal("integer", math.type(doc.i))
      assert.are.equal("float", math.type(doc.f))
      assert.are.equal("float", math.type(doc.e))
      assert.are.equal(100.0, doc.e)
      assert.are.equal("integer", math.type(doc.h))
      assert.are.equal(16, doc.h)
    end)

    it("decodes nan as a float that is not equal to itself", function()
      local doc = assert(toml.parse("n = nan\nm = -nan"))
      assert.are.equal("float", math.type(doc.n))
      assert.is_true(doc.n ~= doc.n)
      assert.is_true(doc.m ~= doc.m)
    end)

    it("keeps the sign of negative zero", function()
      local doc = assert(toml.parse("z = -0.0\np = 0.0"))
      assert.are.equal(-math.huge, 1 / doc.z)
      assert.are.equal(math.huge, 1 / doc.p)
    end)

    it("tells empty arrays from empty tables by metatable", function()
      local doc = assert(toml.parse("a = []\nt = {}\n[h]"))
      assert.are.equal(toml.array_mt, getmetatable(doc.a))
      assert.are.equal(toml.table_mt, getmetatable(doc.t))
      assert.are.equal(toml.table_mt, getmetatable(doc.h))
      assert.are.equal(toml.table_mt, getmetatable(doc))
      assert.are_not.equal(toml.array_mt, toml.table_mt)
    end)

    it("gives arrays of tables the array metatable and their elements the table one", function()
      local doc = assert(toml.parse("[[p]]\n[[p]]\nx = [{}]"))
      assert.are.equal(toml.array_mt, getmetatable(doc.p))
      assert.are.equal(toml.table_mt, getmetatable(doc.p[1]))
      assert.are.equal(toml.table_mt, getmetatable(doc.p[2]))
      assert.are.equal(toml.table_mt, getmetatable(doc.p[2].x[1]))
    end)
  end)

  describe("date/time values", function()
    it("exposes the fields of an offset date-time", function()
      local doc = assert(toml.parse("d = 1979-05-27T00:32:00.999999-07:30"))
      local d = doc.d
      assert.are.equal(toml.datetime_mt, getmetatable(d))
      assert.are.equal("offset-datetime", d.kind)
      assert.are.same({ 1979, 5, 27, 0, 32, 0 }, { d.year, d.month, d.day, d.hour, d.min, d.sec })
      assert.are.equal(999999000, d.nanos)
      assert.are.equal("integer", math.type(d.nanos))
      assert.are.equal("999999", d.frac)
      assert.are.equal(-450, d.offset)
    end)

    it("gives Z an offset of zero", function()
      local d = assert(toml.parse("d = 2001-02-03T04:05:06Z")).d
      assert.are.equal(0, d.offset)
      assert.are.equal(0, d.nanos)
      assert.is_nil(d.frac)
    end)

    it("truncates fractions beyond nanoseconds but keeps every digit for printing", function()
      local d = assert(toml.parse("d = 2001-02-03T04:05:06.1234567899Z")).d
      assert.are.equal(123456789, d.nanos)
      assert.are.equal("1234567899", d.frac)
      assert.are.equal("2001-02-03T04:05:06.1234567899Z", tostring(d))
    end)

    it("has no time or offset fields on a local date", function()
      local d = assert(toml.parse("d = 2024-02-29")).d
      assert.are.equal("local-date", d.kind)
      assert.are.same({ 2024, 2, 29 }, { d.year, d.month, d.day })
      assert.is_nil(d.hour)
      assert.is_nil(d.offset)
    end)

    it("has no date or offset fields on a local time", function()
      local d = assert(toml.parse("d = 13:14:15.25")).d
      assert.are.equal("local-time", d.kind)
      assert.are.same({ 13, 14, 15, 250000000 }, { d.hour, d.min, d.sec, d.nanos })
      assert.is_nil(d.year)
      assert.is_nil(d.offset)
    end)

    it("has no offset on a local date-time", function()
      local d = assert(toml.parse("d = 1979-05-27 07:32:00")).d
      assert.are.equal("local-datetime", d.kind)
      assert.are.same({ 1979, 5, 27, 7, 32, 0 }, { d.year, d.month, d.day, d.hour, d.min, d.sec })
      assert.is_nil(d.offset)
    end)

    it("prints positive and negative offsets with sign, hours and minutes", function()
      local doc = assert(toml.parse("a = 2000-01-01T00:00:00+01:05\nb = 2000-01-01T00:00:00-11:00"))
      assert.are.equal(65, doc.a.offset)
      assert.are.equal("2000-01-01T00:00:00+01:05", tostring(doc.a))
      assert.are.equal(-660, doc.b.offset)
      assert.are.equal("2000-01-01T00:00:00-11:00", tostring(doc.b))
    end)
  end)
end)
