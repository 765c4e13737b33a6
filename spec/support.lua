-- Helpers shared by the specs: temp dirs, running the ten binary, a raw
-- HTTP client.
local support = {}

-- What a config file names or another directory runs must not depend on
-- the directory the specs run from.
function support.abs(p)
  if p:sub(1, 1) == "/" then return p end
  return os.getenv("PWD") .. "/" .. p
end

local build = os.getenv("TEN_BUILD") or "build"
support.ten = support.abs(os.getenv("TEN") or (build .. "/ten"))
support.build = build

-- A program of spec/fixtures/ as built.
function support.fixture(name) return support.abs(build .. "/fixtures/" .. name) end

-- The effective uid is 0: what mounts, cgroups and namespaces need.
function support.is_root()
  local f = io.open("/proc/self/status")
  local s = f and f:read("a") or ""
  if f then f:close() end
  return s:match("\nUid:%s+%d+%s+(%d+)") == "0"
end

local function sh_quote(s)
  return "'" .. tostring(s):gsub("'", "'\\''") .. "'"
end
support.quote = sh_quote

-- A fresh directory, removed by support.cleanup().
local made = {}
function support.tmpdir()
  local p = io.popen("mktemp -d " .. sh_quote((os.getenv("TMPDIR") or "/tmp") .. "/tenement-spec.XXXXXX"))
  local dir = p:read("l")
  p:close()
  made[#made + 1] = dir
  return dir
end

function support.cleanup()
  for _, d in ipairs(made) do os.execute("rm -rf " .. sh_quote(d)) end
  made = {}
end

function support.write(path, text)
  local f = assert(io.open(path, "w"))
  f:write(text)
  f:close()
  return path
end

-- Runs a shell command; -> exit code, stdout, stderr
-- The file's text, or nil when there is none.
function support.read(path)
  local f = io.open(path)
  if not f then return nil end
  local text = f:read("a")
  f:close()
  return text
end

function support.run(cmd)
  local dir = support.tmpdir()
  local code = select(3, os.execute(cmd .. " >" .. dir .. "/out 2>" .. dir .. "/err"))
  local function slurp(p) local f = io.open(p) local s = f:read("a") f:close() return s end
  return code, slurp(dir .. "/out"), slurp(dir .. "/err")
end

-- "env -i PATH=..." for running ten as a user would, with an empty
-- environment, but keeping the sanitizers' settings under `make asan`.
function support.clean_env()
  local parts = { "env -i PATH=/usr/local/bin:/usr/bin:/bin" }
  for _, name in ipairs { "ASAN_OPTIONS", "UBSAN_OPTIONS", "LSAN_OPTIONS" } do
    local v = os.getenv(name)
    if v then parts[#parts + 1] = name .. "=" .. sh_quote(v) end
  end
  return table.concat(parts, " ")
end

-- Runs the ten binary with args (a list) and an optional environment prefix.
function support.ten_run(args, env)
  local parts = { support.clean_env() }
  for k, v in pairs(env or {}) do parts[#parts + 1] = k .. "=" .. sh_quote(v) end
  parts[#parts + 1] = sh_quote(support.ten)
  for _, a in ipairs(args) do parts[#parts + 1] = sh_quote(a) end
  return support.run(table.concat(parts, " "))
end

-- Starts `ten serve --config cfg` in the background, its output written to
-- log (added to it when append). -> its pid
function support.ten_serve(cfg, log, append)
  local p = io.popen(string.format("%s %s serve --config %s %s%s 2>&1 & echo $!",
    support.clean_env(), sh_quote(support.ten), sh_quote(cfg), append and ">>" or ">", sh_quote(log)))
  local pid = tonumber(p:read("l"))
  p:close()
  return pid
end

-- Blocks the whole process, event loop included (core.sleep yields its task).
function support.sleep(s) os.execute("sleep " .. s) end

-- Pids of live (not zombie) processes in process group pgid. Zombies are
-- dead already; whoever they were reparented to reaps them in its own time.
function support.live_in_group(pgid)
  local live = {}
  local p = io.popen("ls /proc")
  for name in p:lines() do
    if name:match("^%d+$") then
      local f = io.open("/proc/" .. name .. "/stat")
      local stat = f and f:read("a")
      if f then f:close() end
      -- pid (comm) state ppid pgrp ...; comm may hold spaces and parentheses
      local state, pgrp
      if stat then state, pgrp = stat:match("%) (%S) %d+ (%d+)") end
      if state and state ~= "Z" and tonumber(pgrp) == pgid then live[#live + 1] = tonumber(name) end
    end
  end
  p:close()
  return live
end

-- A TCP port free right now on 127.0.0.1 (for a server a spec starts).
function support.free_port()
  local core = require "tenement.core"
  local l = assert(core.net.listen { host = "127.0.0.1", port = 0 })
  local port = l:port()
  l:close()
  return port
end

-- A raw client connection to a port or a Unix socket path, for the specs
-- that need to see the very bytes a server sends. opts: timeout, how long a
-- read waits by default (ms, 2000); length_only, read bodies as a peer that
-- knows only Content-Length: a response without one has no body, and what
-- follows its head stays in c.buf (so a chunked or close-delimited reply
-- shows up as garbage before the next response).
local Raw = {}
Raw.__index = Raw

function support.raw(port_or_path, opts)
  local net = require("tenement.core").net
  opts = opts or {}
  local s, err
  if type(port_or_path) == "number" then
    s, err = net.connect { port = port_or_path, timeout = 2000 }
  else
    s, err = net.connect { path = port_or_path, timeout = 2000 }
  end
  assert(s, err)
  return setmetatable({ s = s, buf = "", timeout = opts.timeout or 2000, length_only = opts.length_only }, Raw)
end

function Raw:send(bytes) assert(self.s:write(bytes)) end

-- More bytes into the buffer; false at EOF, nil, err on error or timeout.
function Raw:fill(timeout)
  local chunk, err = self.s:read(timeout or self.timeout)
  if chunk then
    self.buf = self.buf .. chunk
    return true
  end
  if err then return nil, err end
  return false
end

-- n bytes, or everything up to EOF when n is nil
function Raw:take(n, timeout)
  while n == nil or #self.buf < n do
    local ok, err = self:fill(timeout)
    if ok == false and n == nil then break end
    if not ok then return nil, err or "eof" end
  end
  n = n or #self.buf
  local out = self.buf:sub(1, n)
  self.buf = self.buf:sub(n + 1)
  return out
end

function Raw:line(timeout)
  while not self.buf:find("\r\n", 1, true) do
    local ok, err = self:fill(timeout)
    if not ok then return nil, err or "eof" end
  end
  local i = self.buf:find("\r\n", 1, true)
  local l = self.buf:sub(1, i - 1)
  self.buf = self.buf:sub(i + 2)
  return l
end

-- The next response: { status, reason, headers (lower case), body, raw_head,
-- framing = "length" | "chunked" | "eof" | "none" }.
function Raw:response(opts)
  opts = opts or {}
  while not self.buf:find("\r\n\r\n", 1, true) do
    local ok, err = self:fill(opts.timeout)
    if not ok then return nil, err or "eof" end
  end
  local head_end = self.buf:find("\r\n\r\n", 1, true)
  local head = self.buf:sub(1, head_end + 1)
  self.buf = self.buf:sub(head_end + 4)
  local status, reason = head:match("^HTTP/1%.1 (%d%d%d) ([^\r]*)\r\n")
  assert(status, "bad status line in " .. head)
  local res = { status = tonumber(status), reason = reason, headers = {}, raw_head = head }
  for name, value in head:gmatch("\r\n([^:\r\n]+): ([^\r\n]*)") do
    res.headers[name:lower()] = value
  end
  local err
  if opts.head or res.status == 204 or res.status == 304 or res.status < 200
    or (self.length_only and not res.headers["content-length"]) then
    res.framing, res.body = "none", ""
  elseif res.headers["transfer-encoding"] == "chunked" and not self.length_only then
    res.framing = "chunked"
    -- busted's assert: a module does not see the one the specs are given
    local check = require "luassert"
    local parts = {}
    while true do
      local size_line
      size_line, err = self:line(opts.timeout)
      if not size_line then return nil, err end
      local size = tonumber(size_line:match("^%x+"), 16)
      if size == 0 then
        check.are.equal("", self:line(opts.timeout))
        break
      end
      parts[#parts + 1], err = self:take(size, opts.timeout)
      if not parts[#parts] then return nil, err end
      check.are.equal("", self:line(opts.timeout))
    end
    res.body = table.concat(parts)
  elseif res.headers["content-length"] then
    res.framing = "length"
    res.body, err = self:take(tonumber(res.headers["content-length"]), opts.timeout)
    if not res.body then return nil, err end
  else
    res.framing = "eof"
    res.body = self:take(nil, opts.timeout)
  end
  return res
end

-- True when the server closed the connection (after any bytes left).
function Raw:closed(timeout)
  while true do
    local ok, err = self:fill(timeout or 2000)
    if ok == false then return true end
    if ok == nil then return err ~= "timeout" end
  end
end

function Raw:close() self.s:close() end

-- Sends request to 127.0.0.1:port and reads to the end with plain blocking
-- reads, from a process of its own (perl, which every Debian has): a libuv
-- client stream reports a reset that comes with the last bytes as the end
-- of the stream, which is what a reset is there to tell apart. In a task;
-- wait_s: seconds before the first read (a client that is slow to read).
-- -> bytes, how the reading ended: "eof" or the read's error text
local READ_TO_END = [[
use IO::Socket::INET;
my $s = IO::Socket::INET->new(PeerAddr => "127.0.0.1", PeerPort => $ARGV[0]) or die "connect: $!";
syswrite($s, $ARGV[1]) or die "write: $!";
select(undef, undef, undef, $ARGV[2]);
alarm 20;
my ($all, $buf, $end) = ("");
while (1) {
  my $n = sysread($s, $buf, 65536);
  if (!defined $n) { $end = "$!"; last }
  if ($n == 0) { $end = "eof"; last }
  $all .= $buf;
}
print STDERR $end;
print $all;
]]
function support.read_to_end(port, request, wait_s)
  local core = require "tenement.core"
  local p = assert(core.proc.spawn { argv = { "perl", "-e", READ_TO_END, tostring(port), request,
    tostring(wait_s or 0) }, env = { "PATH=/usr/bin:/bin" } })
  local function all(pipe)
    local parts = {}
    while true do
      local chunk, err = pipe:read(30000)
      if not chunk then
        assert(not err, "the reader said nothing for 30 s")
        return table.concat(parts)
      end
      parts[#parts + 1] = chunk
    end
  end
  local out = all(p.stdout)
  local ending = all(p.stderr)
  -- perl ends itself (alarm) if the server never does
  local st = assert(p:wait(30000))
  assert(st.code == 0, ending)
  return out, ending
end

return support
