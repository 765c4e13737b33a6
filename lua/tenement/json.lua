-- JSON for the CLI and the API. Decoding is lua-cjson's (C, fast, strict).
-- Encoding is ours: stable key order (so output diffs and reads well),
-- empty arrays that stay arrays (json.array), and exact escaping.
local cjson = require "cjson"

local json = {}

json.null = cjson.null
json.array_mt = { __name = "json.array" }

-- Marks t as an array, so an empty one encodes as [] rather than {}.
function json.array(t)
  return setmetatable(t or {}, json.array_mt)
end

local escapes = {
  ['"'] = '\\"', ["\\"] = "\\\\", ["\b"] = "\\b", ["\f"] = "\\f",
  ["\n"] = "\\n", ["\r"] = "\\r", ["\t"] = "\\t",
}

local function escape_char(c)
  return escapes[c] or string.format("\\u%04x", c:byte())
end

-- Invalid UTF-8 would make the whole document invalid: each byte that does
-- not belong to a valid sequence becomes U+FFFD, the rest stays as it was
-- (an instance's "café" next to one stray byte is still "café").
local function valid_utf8(s)
  local len, bad = utf8.len(s)
  if len then return s end
  local parts, i = {}, 1
  while not len do
    parts[#parts + 1] = s:sub(i, bad - 1)
    parts[#parts + 1] = "\u{FFFD}"
    i = bad + 1
    len, bad = utf8.len(s, i)
  end
  parts[#parts + 1] = s:sub(i)
  return table.concat(parts)
end

local function encode_string(s)
  s = valid_utf8(s)
  return '"' .. s:gsub('[%c"\\]', escape_char) .. '"'
end

local function is_array(t)
  if getmetatable(t) == json.array_mt then return true end
  local n = #t
  if n == 0 then return false end
  local count = 0
  for k in pairs(t) do
    if math.type(k) ~= "integer" or k < 1 or k > n then return false end
    count = count + 1
  end
  return count == n
end

local encode_value

local function encode_table(t, out, depth, indent)
  if depth > 100 then error("json.encode: nesting deeper than 100 (a cycle?)", 0) end
  local nl, pad, pad_in, colon = "", "", "", ":"
  if indent then
    nl = "\n"
    pad = string.rep(indent, depth)
    pad_in = string.rep(indent, depth + 1)
    colon = ": "
  end
  if is_array(t) then
    if #t == 0 then out[#out + 1] = "[]" return end
    out[#out + 1] = "[" .. nl
    for i = 1, #t do
      out[#out + 1] = pad_in
      encode_value(t[i], out, depth + 1, indent)
      out[#out + 1] = (i < #t and "," or "") .. nl
    end
    out[#out + 1] = pad .. "]"
    return
  end
  local keys = {}
  for k in pairs(t) do
    local kt = type(k)
    if kt ~= "string" and kt ~= "number" then
      error("json.encode: cannot encode a key of type " .. kt, 0)
    end
    keys[#keys + 1] = k
  end
  if #keys == 0 then out[#out + 1] = "{}" return end
  table.sort(keys, function(a, b) return tostring(a) < tostring(b) end)
  out[#out + 1] = "{" .. nl
  for i, k in ipairs(keys) do
    out[#out + 1] = pad_in .. encode_string(tostring(k)) .. colon
    encode_value(t[k], out, depth + 1, indent)
    out[#out + 1] = (i < #keys and "," or "") .. nl
  end
  out[#out + 1] = pad .. "}"
end

function encode_value(v, out, depth, indent)
  local vt = type(v)
  if vt == "string" then
    out[#out + 1] = encode_string(v)
  elseif vt == "number" then
    if v ~= v or v == math.huge or v == -math.huge then
      out[#out + 1] = "null" -- JSON has no NaN or infinities
    elseif math.type(v) == "integer" then
      out[#out + 1] = string.format("%d", v)
    else
      -- the shortest form that reads back as the same double: 0.1 is
      -- "0.1", not "0.10000000000000001"
      local text = string.format("%.15g", v)
      if tonumber(text) ~= v then
        text = string.format("%.16g", v)
        if tonumber(text) ~= v then text = string.format("%.17g", v) end
      end
      out[#out + 1] = text
    end
  elseif vt == "boolean" then
    out[#out + 1] = v and "true" or "false"
  elseif v == nil or v == cjson.null then
    out[#out + 1] = "null"
  elseif vt == "table" then
    encode_table(v, out, depth, indent)
  else
    error("json.encode: cannot encode a " .. vt, 0)
  end
end

-- json.encode(value [, indent]) -> string. indent (e.g. "  ") pretty-prints.
function json.encode(v, indent)
  local out = {}
  encode_value(v, out, 0, indent)
  return table.concat(out)
end

-- cjson gives every number as a float; whole ones become integers, so 42
-- prints as 42 and math.type tells what the sender meant.
local function integers(v, depth)
  if type(v) == "number" then return math.tointeger(v) or v end
  if type(v) == "table" and depth < 100 then
    for k, x in pairs(v) do v[k] = integers(x, depth + 1) end
  end
  return v
end

-- json.decode(text) -> value | nil, err
function json.decode(text)
  local ok, v = pcall(cjson.decode, text)
  if not ok then return nil, (tostring(v):gsub("^Expected", "expected")) end
  return integers(v, 0)
end

return json
