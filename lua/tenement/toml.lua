-- TOML 1.0.0 decoder in plain Lua 5.4.
--
--   toml.parse(text[, source]) -> doc | nil, "source:line:col: message"
--   toml.where(tbl[, key])     -> line, col | nil
--
-- Every table of a document carries toml.table_mt and every array
-- toml.array_mt, because an empty `{}` and an empty `[]` would otherwise be
-- the same Lua value. Date/time values are tables carrying toml.datetime_mt:
--   kind    "offset-datetime" | "local-datetime" | "local-date" | "local-time"
--   year, month, day          (not for local-time)
--   hour, min, sec, nanos     (not for local-date); nanos is an integer
--   frac                      fractional-second digits as written, or nil
--   offset                    minutes east of UTC (offset-datetime only)
-- tostring() gives RFC 3339 text with a "T" separator; a zero offset is
-- written "Z".
--
-- Lines and columns are 1-based; columns count characters, not bytes.
-- toml.where(tbl, key) is where `key` of `tbl` was written: the key itself
-- for `key = value`, dotted keys and headers (the last header to define it),
-- the element's first character for arrays, and the `[[` of the header for
-- an array of tables. toml.where(tbl) is where the table or array was
-- opened: the `[` of its header (or of the header that created it on the
-- way), the `{` or `[` of an inline value, the key part of the dotted key
-- that created it; 1, 1 for the root.
--
-- Decisions where the specification leaves room:
--   * seconds must be 00-59: RFC 3339 allows a leap second 60, but TOML has
--     no way to validate it against a leap-second table and the toml-test
--     expectations are produced by a parser that rejects it;
--   * years 0000-9999 are all accepted (RFC 3339 date-fullyear = 4DIGIT);
--   * fractional seconds of any length are accepted; `nanos` keeps the first
--     nine digits (truncated), `frac` keeps every digit as written;
--   * CRLF inside multi-line strings is decoded as LF;
--   * a UTF-8 byte order mark at the very start of the text is skipped;
--   * arrays and inline tables may nest at most 1000 deep (a guard against
--     running out of Lua stack on hostile input, far beyond real documents);
--   * floats too large for a double become +/-inf, as strtod does.

local byte, sub, find, match, gsub, format =
  string.byte, string.sub, string.find, string.match, string.gsub, string.format
local concat = table.concat
local tonumber, tointeger = tonumber, math.tointeger
local setmetatable, getmetatable, type, error, pcall =
  setmetatable, getmetatable, type, error, pcall
local utf8_char, utf8_len = utf8.char, utf8.len
local huge = math.huge

local toml = {}

local array_mt = { __name = "toml.array" }
local table_mt = { __name = "toml.table" }
local datetime_mt = { __name = "toml.datetime" }
toml.array_mt, toml.table_mt, toml.datetime_mt = array_mt, table_mt, datetime_mt

local MAX_DEPTH = 1000

-- Locations live outside the documents so that a document is nothing but
-- plain tables; weak keys let them go away with the document. A location is
-- packed into one integer (line in the high 32 bits) so that recording one
-- per key costs no table allocation.
local key_locations = setmetatable({}, { __mode = "k" })
local self_locations = setmetatable({}, { __mode = "k" })

local function pack_location(line, col)
  return (line << 32) | col
end

local function unpack_location(packed)
  return packed >> 32, packed & 0xFFFFFFFF
end

local function format_time(dt)
  local text = format("%02d:%02d:%02d", dt.hour, dt.min, dt.sec)
  if dt.frac then
    text = text .. "." .. dt.frac
  end
  return text
end

function datetime_mt.__tostring(dt)
  local kind = dt.kind
  if kind == "local-time" then
    return format_time(dt)
  end
  local text = format("%04d-%02d-%02d", dt.year, dt.month, dt.day)
  if kind == "local-date" then
    return text
  end
  text = text .. "T" .. format_time(dt)
  if kind == "local-datetime" then
    return text
  end
  local offset = dt.offset
  if offset == 0 then
    return text .. "Z"
  end
  local sign = "+"
  if offset < 0 then
    sign, offset = "-", -offset
  end
  return format("%s%s%02d:%02d", text, sign, offset // 60, offset % 60)
end

local DAYS_IN_MONTH = { 31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31 }

local function days_in_month(year, month)
  if month == 2 and year % 4 == 0 and (year % 100 ~= 0 or year % 400 == 0) then
    return 29
  end
  return DAYS_IN_MONTH[month]
end

local ESCAPES = {
  [98] = "\b", [116] = "\t", [110] = "\n", [102] = "\f",
  [114] = "\r", [34] = "\"", [92] = "\\",
}

local RADIXES = {
  x = { base = 16, name = "hexadecimal", pattern = "^%x[%x_]*$", max_digits = 16 },
  o = { base = 8, name = "octal", pattern = "^[0-7][0-7_]*$", max_digits = 21 },
  b = { base = 2, name = "binary", pattern = "^[01][01_]*$", max_digits = 63 },
}

-- Long tokens would drown the message that quotes them.
local function shorten(text)
  if #text > 40 then
    return sub(text, 1, 37) .. "..."
  end
  return text
end

-- TOML only allows an underscore between two digits.
local function digits_ok(digits)
  return find(digits, "^%d[%d_]*$") ~= nil
    and not find(digits, "__", 1, true)
    and byte(digits, -1) ~= 95
end

local function radix_integer(tok, body, radix)
  local digits = sub(body, 3)
  if digits == "" then
    return nil, format("incomplete %s integer '%s'", radix.name, tok)
  end
  if not find(digits, radix.pattern) or find(digits, "__", 1, true) or byte(digits, -1) == 95 then
    return nil, format("invalid %s integer '%s'", radix.name, shorten(tok))
  end
  digits = gsub(gsub(digits, "_", ""), "^0+", "")
  -- TOML integers are signed 64-bit and these forms carry no sign, so the
  -- top bit must stay clear.
  if #digits > radix.max_digits or (radix.base == 16 and #digits == 16 and find(digits, "^[89a-fA-F]")) then
    return nil, format("integer '%s' does not fit in 64 bits", shorten(tok))
  end
  if digits == "" then
    return 0
  end
  return tonumber(digits, radix.base)
end

local function decimal_integer(tok, sign, body)
  if not digits_ok(body) then
    return nil, format("invalid integer '%s': '_' is only allowed between digits", shorten(tok))
  end
  local digits = gsub(body, "_", "")
  if #digits > 1 and byte(digits) == 48 then
    return nil, format("invalid integer '%s': leading zeros are not allowed", shorten(tok))
  end
  -- Same-length digit strings compare like the numbers they spell.
  local limit = sign == "-" and "9223372036854775808" or "9223372036854775807"
  if #digits > 19 or (#digits == 19 and digits > limit) then
    return nil, format("integer '%s' does not fit in 64 bits", shorten(tok))
  end
  return tointeger(tonumber(sign .. digits))
end

local function float_from(tok, body)
  local int_part, rest = match(body, "^([%d_]*)(.*)$")
  if int_part == "" then
    return nil, format("invalid float '%s': a digit must come before the decimal point", shorten(tok))
  end
  if not digits_ok(int_part) then
    return nil, format("invalid float '%s': '_' is only allowed between digits", shorten(tok))
  end
  if #int_part > 1 and byte(int_part) == 48 then
    return nil, format("invalid float '%s': leading zeros are not allowed", shorten(tok))
  end
  if byte(rest) == 46 then
    local frac
    frac, rest = match(rest, "^%.([%d_]*)(.*)$")
    if frac == "" then
      return nil, format("invalid float '%s': a digit must follow the decimal point", shorten(tok))
    end
    if not digits_ok(frac) then
      return nil, format("invalid float '%s': '_' is only allowed between digits", shorten(tok))
    end
  end
  if rest ~= "" then
    local exponent = match(rest, "^[eE][+-]?([%d_]*)$")
    if not exponent then
      return nil, format("invalid float '%s'", shorten(tok))
    end
    if exponent == "" then
      return nil, format("invalid float '%s': the exponent has no digits", shorten(tok))
    end
    if not digits_ok(exponent) then
      return nil, format("invalid float '%s': '_' is only allowed between digits", shorten(tok))
    end
  end
  return tonumber((gsub(tok, "_", "")))
end

-- Turns a bare value token (anything but strings, arrays, inline tables and
-- date/times) into its value, or nil and the reason it is not one.
local function scalar_from_token(tok)
  if tok == "true" then
    return true
  elseif tok == "false" then
    return false
  end
  local sign, body = match(tok, "^([+-]?)(.*)$")
  if body == "inf" then
    return sign == "-" and -huge or huge
  elseif body == "nan" then
    return 0 / 0
  end
  local radix = match(body, "^0([xob])")
  if radix then
    if sign ~= "" then
      return nil, format("invalid integer '%s': %s integers cannot have a sign",
        shorten(tok), RADIXES[radix].name)
    end
    return radix_integer(tok, body, RADIXES[radix])
  end
  if find(body, "^[%d_]+$") then
    return decimal_integer(tok, sign, body)
  end
  if find(body, "^[%d_]+[.eE]") or byte(body) == 46 then
    return float_from(tok, body)
  end
  -- a bare word is most often a string whose quotes were forgotten
  if find(tok, "^[%a_][%w_%-%.]*$") then
    return nil, format("invalid value '%s' (a string needs quotes: \"%s\")", shorten(tok), shorten(tok))
  end
  return nil, format("invalid value '%s'", shorten(tok))
end

local BARE_KEY = "^[A-Za-z0-9_%-]+"

local function display_key(names, count)
  local parts = {}
  for i = 1, count do
    local name = names[i]
    if find(name, BARE_KEY .. "$") then
      parts[i] = name
    else
      parts[i] = '"' .. gsub(name, '[%c"\\]', function(c)
        return format("\\u%04X", byte(c))
      end) .. '"'
    end
  end
  return shorten(concat(parts, "."))
end

-- Kinds of tables, which decide what may still be added to them:
local IMPLICIT = 1 -- created on the way to a [header]; may get its own header once
local HEADER = 2   -- defined by [header] or [[header]], or the root
local DOTTED = 3   -- created by dotted keys; only its own section may extend it
local INLINE = 4   -- an inline table: closed once its `}` is read

local parse_error_mt = {}

local function parse_document(s)
  local start = 1
  if sub(s, 1, 3) == "\239\187\191" then
    start = 4
  end

  local line_starts = { start }
  local line_count = 1
  do
    local i = find(s, "\n", start, true)
    while i do
      line_count = line_count + 1
      line_starts[line_count] = i + 1
      i = find(s, "\n", i + 1, true)
    end
  end

  -- Parsing moves forward, so remembering the last answer makes locating
  -- every key linear overall even on one very long line.
  local cache_line, cache_pos, cache_col = 1, start, 1
  local function locate(pos)
    local line, col
    if pos >= cache_pos and (cache_line == line_count or line_starts[cache_line + 1] > pos) then
      line = cache_line
      col = cache_col + (utf8_len(s, cache_pos, pos - 1) or (pos - cache_pos))
    else
      local lo, hi = 1, line_count
      while lo < hi do
        local mid = (lo + hi + 1) // 2
        if line_starts[mid] <= pos then
          lo = mid
        else
          hi = mid - 1
        end
      end
      line = lo
      local from = line_starts[line]
      col = 1 + (utf8_len(s, from, pos - 1) or (pos - from))
    end
    cache_line, cache_pos, cache_col = line, pos, col
    return line, col
  end

  local function fail(pos, fmt, ...)
    local line, col = locate(pos)
    error(setmetatable({ line = line, col = col, message = format(fmt, ...) }, parse_error_mt), 0)
  end

  local function describe(pos)
    local c = byte(s, pos)
    if c == nil then
      return "end of input"
    elseif c == 10 or (c == 13 and byte(s, pos + 1) == 10) then
      return "end of line"
    elseif c < 32 or c == 127 then
      return format("control character U+%04X", c)
    end
    return "'" .. (match(s, "^" .. utf8.charpattern, pos) or sub(s, pos, pos)) .. "'"
  end

  local function location_text(packed)
    if not packed then
      return ""
    end
    local line, col = unpack_location(packed)
    return format(" (defined at line %d, column %d)", line, col)
  end

  local function set_key_location(tbl, key, packed)
    local locations = key_locations[tbl]
    if not locations then
      locations = {}
      key_locations[tbl] = locations
    end
    locations[key] = packed
  end

  local function key_location(tbl, key)
    local locations = key_locations[tbl]
    return locations and locations[key]
  end

  local function here(pos)
    return pack_location(locate(pos))
  end

  local bad_utf8 = select(2, utf8_len(s))
  if bad_utf8 then
    fail(bad_utf8, "invalid UTF-8 byte 0x%02X", byte(s, bad_utf8))
  end

  local kind = {}       -- table -> IMPLICIT | HEADER | DOTTED | INLINE
  local scope_of = {}   -- DOTTED table -> scope (section or inline table) that made it
  local of_tables = {}  -- arrays made by [[header]], the only ones headers may extend
  local scope_counter = 1

  local function new_table(k, packed)
    local t = setmetatable({}, table_mt)
    kind[t] = k
    self_locations[t] = packed
    return t
  end

  local function skip_ws(pos)
    local _, e = find(s, "^[ \t]*", pos)
    return e + 1
  end

  -- Returns the position of the newline (or end of input) ending the comment.
  local function skip_comment(pos)
    local _, e = find(s, "^#[^\0-\8\10-\31\127]*", pos)
    local c = byte(s, e + 1)
    if c == nil or c == 10 or (c == 13 and byte(s, e + 2) == 10) then
      return e + 1
    elseif c == 13 then
      fail(e + 1, "carriage return not followed by a line feed")
    end
    fail(e + 1, "control character U+%04X is not allowed in a comment", c)
  end

  -- Skips whitespace, comments and newlines, as allowed inside arrays.
  local function skip_blank(pos)
    while true do
      pos = skip_ws(pos)
      local c = byte(s, pos)
      if c == 35 then
        pos = skip_comment(pos)
      elseif c == 10 then
        pos = pos + 1
      elseif c == 13 then
        if byte(s, pos + 1) ~= 10 then
          fail(pos, "carriage return not followed by a line feed")
        end
        pos = pos + 2
      else
        return pos
      end
    end
  end

  -- Whatever follows a key/value pair or a header on its line.
  local function expect_line_end(pos, what)
    pos = skip_ws(pos)
    local c = byte(s, pos)
    if c == 35 then
      pos = skip_comment(pos)
      c = byte(s, pos)
    end
    if c == nil then
      return pos
    elseif c == 10 then
      return pos + 1
    elseif c == 13 and byte(s, pos + 1) == 10 then
      return pos + 2
    elseif c == 13 then
      fail(pos, "carriage return not followed by a line feed")
    end
    fail(pos, "expected end of line after %s, found %s", what, describe(pos))
  end

  local function read_escape(j, multiline)
    local e = byte(s, j + 1)
    local plain = ESCAPES[e]
    if plain then
      return plain, j + 2
    end
    if e == 117 or e == 85 then
      local len = e == 117 and 4 or 8
      local hex = sub(s, j + 2, j + 1 + len)
      if #hex < len or not find(hex, "^%x+$") then
        fail(j, "invalid escape: \\%c must be followed by %d hexadecimal digits", e, len)
      end
      local code = tonumber(hex, 16)
      if code > 0x10FFFF or (code >= 0xD800 and code <= 0xDFFF) then
        fail(j, "invalid escape \\%c%s: U+%s is not a Unicode scalar value", e, hex, hex)
      end
      return utf8_char(code), j + 2 + len
    end
    if e == nil then
      fail(j, "unterminated escape sequence")
    end
    if multiline and (e == 32 or e == 9 or e == 10 or e == 13) then
      fail(j, "a line-ending backslash must be followed by nothing but whitespace up to the end of line")
    end
    -- Quoting a line break or a control character would break the
    -- one-line message apart.
    if e == 10 or e == 13 then
      fail(j, 'a backslash cannot end a line of a single-line string: use a """multi-line"""'
        .. " string for a line-ending backslash")
    elseif e < 32 or e == 127 then
      fail(j, "invalid escape sequence: a backslash followed by control character U+%04X", e)
    end
    fail(j, "invalid escape sequence '\\%s'", match(s, "^" .. utf8.charpattern, j + 1) or "")
  end

  local function control_in_string(j, c)
    if c == 13 then
      fail(j, "carriage return not followed by a line feed")
    end
    fail(j, "control character U+%04X must be escaped in a string", c)
  end

  local function parse_basic_string(p)
    local parts, count = {}, 0
    local i = p + 1
    while true do
      local j = find(s, "[\"\\\0-\8\10-\31\127]", i)
      if not j then
        fail(p, "unterminated string")
      end
      if j > i then
        count = count + 1
        parts[count] = sub(s, i, j - 1)
      end
      local c = byte(s, j)
      if c == 34 then
        return concat(parts), j + 1
      elseif c == 92 then
        count = count + 1
        parts[count], i = read_escape(j, false)
      elseif c == 10 or c == 13 then
        fail(p, "unterminated string (a single-line string cannot contain a newline)")
      else
        control_in_string(j, c)
      end
    end
  end

  local function parse_literal_string(p)
    local j = find(s, "['\0-\8\10-\31\127]", p + 1)
    if not j then
      fail(p, "unterminated string")
    end
    local c = byte(s, j)
    if c == 39 then
      return sub(s, p + 1, j - 1), j + 1
    elseif c == 10 or c == 13 then
      fail(p, "unterminated string (a single-line string cannot contain a newline)")
    end
    control_in_string(j, c)
  end

  -- Both multi-line kinds: `stop` finds the next character needing care.
  local function parse_multiline(p, quote, stop, escapes)
    local i = p + 3
    if byte(s, i) == 10 then
      i = i + 1
    elseif byte(s, i) == 13 and byte(s, i + 1) == 10 then
      i = i + 2
    end
    local parts, count = {}, 0
    while true do
      local j = find(s, stop, i)
      if not j then
        fail(p, "unterminated multi-line string")
      end
      if j > i then
        count = count + 1
        parts[count] = sub(s, i, j - 1)
      end
      local c = byte(s, j)
      if c == quote then
        local _, last = find(s, quote == 34 and '^"+' or "^'+", j)
        local run = last - j + 1
        if run < 3 then
          count = count + 1
          parts[count] = sub(s, j, last)
          i = last + 1
        else
          -- Up to two quotes may sit just inside the closing delimiter;
          -- any more are left for the caller to reject.
          local extra = run - 3
          if extra > 2 then
            extra = 2
          end
          count = count + 1
          parts[count] = sub(s, j, j + extra - 1)
          return concat(parts), j + extra + 3
        end
      elseif c == 92 and escapes then
        local _, e = find(s, "^\\[ \t]*\r?\n", j)
        if e then
          -- Line-ending backslash: drop all whitespace and newlines up to
          -- the next visible character.
          i = e + 1
          while true do
            local _, e2 = find(s, "^[ \t]*\r?\n", i)
            if not e2 then
              break
            end
            i = e2 + 1
          end
          i = skip_ws(i)
        else
          count = count + 1
          parts[count], i = read_escape(j, true)
        end
      elseif c == 13 then
        if byte(s, j + 1) ~= 10 then
          fail(j, "carriage return not followed by a line feed")
        end
        count = count + 1
        parts[count] = "\n"
        i = j + 2
      else
        control_in_string(j, c)
      end
    end
  end

  local function parse_string_value(p)
    local c = byte(s, p)
    if c == 34 then
      if byte(s, p + 1) == 34 and byte(s, p + 2) == 34 then
        return parse_multiline(p, 34, "[\"\\\0-\8\11-\31\127]", true)
      end
      return parse_basic_string(p)
    end
    if byte(s, p + 1) == 39 and byte(s, p + 2) == 39 then
      return parse_multiline(p, 39, "['\0-\8\11-\31\127]", false)
    end
    return parse_literal_string(p)
  end

  -- Returns the key's parts, where each part starts, and the position after
  -- the key and any whitespace following it.
  local function parse_key(pos)
    local names, positions, count = {}, {}, 0
    while true do
      local c = byte(s, pos)
      local name, next_pos
      if c == 34 or c == 39 then
        if byte(s, pos + 1) == c and byte(s, pos + 2) == c then
          fail(pos, "a multi-line string cannot be used as a key")
        end
        if c == 34 then
          name, next_pos = parse_basic_string(pos)
        else
          name, next_pos = parse_literal_string(pos)
        end
      else
        local _, e = find(s, BARE_KEY, pos)
        if not e then
          fail(pos, "expected a key, found %s", describe(pos))
        end
        name, next_pos = sub(s, pos, e), e + 1
      end
      count = count + 1
      names[count], positions[count] = name, pos
      pos = skip_ws(next_pos)
      if byte(s, pos) ~= 46 then
        return names, positions, pos
      end
      pos = skip_ws(pos + 1)
    end
  end

  local parse_value

  local function parse_time(p, value_start)
    local hour, min, sec, r = match(s, "^(%d%d):(%d%d):(%d%d)()", p)
    if not hour then
      fail(value_start, "invalid time: expected HH:MM:SS")
    end
    hour, min, sec = tonumber(hour), tonumber(min), tonumber(sec)
    if hour > 23 then
      fail(value_start, "invalid time: hour %02d is not in 00-23", hour)
    elseif min > 59 then
      fail(value_start, "invalid time: minute %02d is not in 00-59", min)
    elseif sec > 59 then
      fail(value_start, "invalid time: second %02d is not in 00-59", sec)
    end
    local frac
    if byte(s, r) == 46 then
      frac = match(s, "^%d+", r + 1)
      if not frac then
        fail(r, "invalid time: expected digits after '.'")
      end
      r = r + 1 + #frac
    end
    return hour, min, sec, frac, r
  end

  local function fill_time(dt, hour, min, sec, frac)
    dt.hour, dt.min, dt.sec, dt.frac = hour, min, sec, frac
    dt.nanos = frac and tointeger(tonumber(sub(frac .. "000000000", 1, 9))) or 0
  end

  local function parse_datetime(p)
    if not find(s, "^%d%d%d%d%-", p) then
      local hour, min, sec, frac, r = parse_time(p, p)
      local dt = { kind = "local-time" }
      fill_time(dt, hour, min, sec, frac)
      return setmetatable(dt, datetime_mt), r
    end
    local year, month, day, q = match(s, "^(%d%d%d%d)%-(%d%d)%-(%d%d)()", p)
    if not year then
      fail(p, "invalid date: expected YYYY-MM-DD")
    end
    year, month, day = tonumber(year), tonumber(month), tonumber(day)
    if month < 1 or month > 12 then
      fail(p, "invalid date: month %02d is not in 01-12", month)
    elseif day < 1 or day > days_in_month(year, month) then
      fail(p, "invalid date: day %02d does not exist in %04d-%02d", day, year, month)
    end
    local dt = { year = year, month = month, day = day }
    local c = byte(s, q)
    -- A space only separates date and time when a time follows; otherwise
    -- the date ends there (and a comment, say, may follow).
    if c == 84 or c == 116 or (c == 32 and find(s, "^%d", q + 1)) then
      local hour, min, sec, frac, r = parse_time(q + 1, p)
      fill_time(dt, hour, min, sec, frac)
      c = byte(s, r)
      if c == 90 or c == 122 then
        dt.kind, dt.offset = "offset-datetime", 0
        r = r + 1
      elseif c == 43 or c == 45 then
        local oh, om, r2 = match(s, "^[+-](%d%d):(%d%d)()", r)
        if not oh then
          fail(r, "invalid UTC offset: expected +HH:MM or -HH:MM")
        end
        oh, om = tonumber(oh), tonumber(om)
        if oh > 23 or om > 59 then
          fail(r, "invalid UTC offset %s", sub(s, r, r2 - 1))
        end
        dt.kind, dt.offset = "offset-datetime", (c == 45 and -1 or 1) * (oh * 60 + om)
        r = r2
      else
        dt.kind = "local-datetime"
      end
      return setmetatable(dt, datetime_mt), r
    end
    dt.kind = "local-date"
    return setmetatable(dt, datetime_mt), q
  end

  local function parse_array(p, depth)
    local arr = setmetatable({}, array_mt)
    self_locations[arr] = here(p)
    local locations = {}
    key_locations[arr] = locations
    local count = 0
    local i = skip_blank(p + 1)
    while true do
      local c = byte(s, i)
      if c == 93 then
        return arr, i + 1
      elseif c == nil then
        fail(i, "unterminated array (opened at line %d, column %d)", unpack_location(self_locations[arr]))
      end
      count = count + 1
      locations[count] = here(i)
      arr[count], i = parse_value(i, depth)
      i = skip_blank(i)
      c = byte(s, i)
      if c == 44 then
        i = skip_blank(i + 1)
      elseif c ~= 93 then
        if c == nil then
          fail(i, "unterminated array (opened at line %d, column %d)", unpack_location(self_locations[arr]))
        end
        fail(i, "expected ',' or ']' after an array element, found %s", describe(i))
      end
    end
  end

  -- Dotted keys may only extend tables that they created themselves in the
  -- current section (or inline table): a table with its own header, one from
  -- another section, or an inline table is closed to them.
  local function descend_dotted(t, names, index, pos, scope)
    local name = names[index]
    local v = t[name]
    if v == nil then
      local packed = here(pos)
      local nt = new_table(DOTTED, packed)
      scope_of[nt] = scope
      t[name] = nt
      set_key_location(t, name, packed)
      return nt
    end
    local mt = getmetatable(v)
    if mt == table_mt then
      local k = kind[v]
      if k == DOTTED and scope_of[v] == scope then
        return v
      elseif k == IMPLICIT then
        -- Once dotted keys have put something in it, the table counts as
        -- defined, so no later [header] may define it again.
        kind[v], scope_of[v] = DOTTED, scope
        return v
      elseif k == INLINE then
        fail(pos, "cannot add keys to inline table '%s'%s: inline tables are closed once defined",
          display_key(names, index), location_text(key_location(t, name)))
      end
      if k == HEADER then
        fail(pos, "cannot add keys to table '%s' with dotted keys: it was defined by its own table header%s",
          display_key(names, index), location_text(key_location(t, name)))
      end
      fail(pos, "cannot add keys to table '%s' with dotted keys: it was defined in another section%s",
        display_key(names, index), location_text(key_location(t, name)))
    elseif mt == array_mt then
      fail(pos, "cannot use dotted keys to add to array '%s'%s",
        display_key(names, index), location_text(key_location(t, name)))
    end
    fail(pos, "key '%s' is already defined as a value%s",
      display_key(names, index), location_text(key_location(t, name)))
  end

  local function parse_keyval(t, scope, pos, depth)
    local names, positions, p = parse_key(pos)
    if byte(s, p) ~= 61 then
      fail(p, "expected '=' after key '%s', found %s", display_key(names, #names), describe(p))
    end
    p = skip_ws(p + 1)
    local last = #names
    for i = 1, last - 1 do
      t = descend_dotted(t, names, i, positions[i], scope)
    end
    local name = names[last]
    if t[name] ~= nil then
      fail(positions[last], "duplicate key '%s'%s", display_key(names, last),
        location_text(key_location(t, name)))
    end
    local packed = here(positions[last])
    t[name], p = parse_value(p, depth)
    set_key_location(t, name, packed)
    return p
  end

  local function parse_inline_table(p, depth)
    local t = new_table(INLINE, here(p))
    scope_counter = scope_counter + 1
    local scope = scope_counter
    local i = skip_ws(p + 1)
    if byte(s, i) == 125 then
      return t, i + 1
    end
    while true do
      local c = byte(s, i)
      if c == 10 or c == 13 then
        fail(i, "newlines are not allowed in an inline table")
      elseif c == nil then
        fail(i, "unterminated inline table")
      end
      i = skip_ws(parse_keyval(t, scope, i, depth))
      c = byte(s, i)
      if c == 125 then
        return t, i + 1
      elseif c == 44 then
        i = skip_ws(i + 1)
        if byte(s, i) == 125 then
          fail(i, "trailing comma is not allowed in an inline table")
        end
      elseif c == 10 or c == 13 then
        fail(i, "newlines are not allowed in an inline table")
      elseif c == nil then
        fail(i, "unterminated inline table")
      else
        fail(i, "expected ',' or '}' after an inline table entry, found %s", describe(i))
      end
    end
  end

  function parse_value(p, depth)
    local c = byte(s, p)
    if c == 34 or c == 39 then
      return parse_string_value(p)
    elseif c == 91 or c == 123 then
      if depth >= MAX_DEPTH then
        fail(p, "arrays and inline tables nest deeper than %d levels", MAX_DEPTH)
      end
      if c == 91 then
        return parse_array(p, depth + 1)
      end
      return parse_inline_table(p, depth + 1)
    end
    if find(s, "^%d%d%d%d%-", p) or find(s, "^%d%d:", p) then
      return parse_datetime(p)
    end
    local _, e = find(s, "^[A-Za-z0-9_.+%-]+", p)
    if not e then
      fail(p, "expected a value, found %s", describe(p))
    end
    local value, problem = scalar_from_token(sub(s, p, e))
    if value == nil then
      fail(p, "%s", problem)
    end
    return value, e + 1
  end

  local root = new_table(HEADER, pack_location(1, 1))
  key_locations[root] = {}

  -- A header path may pass through any table except an inline one; through
  -- an array of tables it continues in the latest element.
  local function descend_header(t, names, index, pos, header_packed)
    local name = names[index]
    local v = t[name]
    if v == nil then
      local nt = new_table(IMPLICIT, header_packed)
      t[name] = nt
      set_key_location(t, name, here(pos))
      return nt
    end
    local mt = getmetatable(v)
    if mt == table_mt then
      if kind[v] == INLINE then
        fail(pos, "cannot add to inline table '%s'%s: inline tables are closed once defined",
          display_key(names, index), location_text(key_location(t, name)))
      end
      return v
    elseif mt == array_mt then
      if of_tables[v] then
        return v[#v]
      end
      fail(pos, "cannot add to static array '%s'%s", display_key(names, index),
        location_text(key_location(t, name)))
    end
    fail(pos, "key '%s' is already defined as a value%s", display_key(names, index),
      location_text(key_location(t, name)))
  end

  local function parse_header(p)
    local array_of_tables = byte(s, p + 1) == 91
    local header_packed = here(p)
    local names, positions, q = parse_key(skip_ws(p + (array_of_tables and 2 or 1)))
    if array_of_tables then
      if byte(s, q) ~= 93 or byte(s, q + 1) ~= 93 then
        fail(q, "expected ']]' to close the array-of-tables header, found %s", describe(q))
      end
      q = q + 2
    else
      if byte(s, q) ~= 93 then
        fail(q, "expected ']' to close the table header, found %s", describe(q))
      end
      q = q + 1
    end
    local t = root
    local last = #names
    for i = 1, last - 1 do
      t = descend_header(t, names, i, positions[i], header_packed)
    end
    local name, pos = names[last], positions[last]
    local v = t[name]
    local mt = getmetatable(v)
    local target
    if array_of_tables then
      local arr
      if v == nil then
        arr = setmetatable({}, array_mt)
        of_tables[arr] = true
        self_locations[arr] = header_packed
        t[name] = arr
        set_key_location(t, name, here(pos))
      elseif mt == array_mt and of_tables[v] then
        arr = v
      elseif mt == array_mt then
        fail(pos, "cannot append to static array '%s'%s", display_key(names, last),
          location_text(key_location(t, name)))
      elseif mt == table_mt then
        fail(pos, "cannot define '%s' as an array of tables: it is already a table%s",
          display_key(names, last), location_text(key_location(t, name)))
      else
        fail(pos, "key '%s' is already defined as a value%s", display_key(names, last),
          location_text(key_location(t, name)))
      end
      target = new_table(HEADER, header_packed)
      arr[#arr + 1] = target
      set_key_location(arr, #arr, header_packed)
    else
      if v == nil then
        target = new_table(HEADER, header_packed)
        t[name] = target
        set_key_location(t, name, here(pos))
      elseif mt == table_mt and kind[v] == IMPLICIT then
        target = v
        kind[v] = HEADER
        self_locations[v] = header_packed
        set_key_location(t, name, here(pos))
      elseif mt == table_mt then
        local k = kind[v]
        if k == DOTTED then
          fail(pos, "cannot define table '%s' with a header: dotted keys already defined it%s",
            display_key(names, last), location_text(key_location(t, name)))
        elseif k == INLINE then
          fail(pos, "cannot define table '%s' with a header: it is an inline table%s",
            display_key(names, last), location_text(key_location(t, name)))
        end
        fail(pos, "table '%s' is defined twice%s", display_key(names, last),
          location_text(key_location(t, name)))
      elseif mt == array_mt then
        if of_tables[v] then
          fail(pos, "cannot define table '%s': it is an array of tables%s",
            display_key(names, last), location_text(key_location(t, name)))
        end
        fail(pos, "cannot define table '%s': it is already an array%s",
          display_key(names, last), location_text(key_location(t, name)))
      else
        fail(pos, "key '%s' is already defined as a value%s", display_key(names, last),
          location_text(key_location(t, name)))
      end
    end
    return target, q
  end

  local current = root
  scope_counter = scope_counter + 1
  local scope = scope_counter
  local pos = start
  while true do
    pos = skip_ws(pos)
    local c = byte(s, pos)
    if c == nil then
      break
    elseif c == 35 then
      pos = skip_comment(pos)
    elseif c == 10 then
      pos = pos + 1
    elseif c == 13 then
      if byte(s, pos + 1) ~= 10 then
        fail(pos, "carriage return not followed by a line feed")
      end
      pos = pos + 2
    elseif c == 91 then
      current, pos = parse_header(pos)
      scope_counter = scope_counter + 1
      scope = scope_counter
      pos = expect_line_end(pos, "table header")
    else
      pos = expect_line_end(parse_keyval(current, scope, pos, 0), "value")
    end
  end
  return root
end

function toml.parse(text, source)
  if type(text) ~= "string" then
    error("toml.parse: text must be a string, got " .. type(text), 2)
  end
  if source == nil then
    source = "<string>"
  end
  local ok, result = pcall(parse_document, text)
  if ok then
    return result
  end
  if getmetatable(result) == parse_error_mt then
    return nil, format("%s:%d:%d: %s", source, result.line, result.col, result.message)
  end
  error(result, 0)
end

function toml.where(tbl, key)
  local packed
  if key == nil then
    packed = self_locations[tbl]
  else
    local locations = key_locations[tbl]
    packed = locations and locations[key]
  end
  if packed == nil then
    return nil
  end
  return unpack_location(packed)
end

return toml
