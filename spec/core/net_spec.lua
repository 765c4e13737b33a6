-- core.net: TCP and Unix-socket streams against the real kernel.
local core = require "tenement.core"
local net, fs = core.net, core.fs

local function tmpdir()
  local base = os.getenv("TMPDIR") or "/tmp"
  local dir = string.format("%s/tn-net-%d-%d", base, math.floor(core.time() * 1000) % 1e9,
    math.random(1, 1e9))
  assert(fs.mkdir(dir, 448))
  return dir
end

-- An echo server on `listener`: every accepted stream gets its bytes back.
local function echo_server(listener)
  return core.spawn(function()
    while true do
      local ok, s = pcall(listener.accept, listener)
      if not ok or not s then return end
      core.spawn(function()
        while true do
          local chunk = s:read()
          if not chunk then break end
          s:write(chunk)
        end
        s:close()
      end)
    end
  end)
end

local function read_n(s, n, timeout)
  local parts, got = {}, 0
  while got < n do
    local chunk, err = s:read(timeout)
    if not chunk then return nil, err or "eof after " .. got end
    parts[#parts + 1] = chunk
    got = got + #chunk
  end
  return table.concat(parts)
end

describe("core.net", function()
  local dir
  before_each(function() dir = tmpdir() end)
  after_each(function() fs.rmtree(dir) end)

  it("echoes over TCP on an ephemeral port", function()
    core.run(function()
      local l = assert(net.listen { host = "127.0.0.1", port = 0 })
      local port = l:port()
      assert.is_true(port > 0)
      assert.are.equal("127.0.0.1:" .. port, l:address())
      echo_server(l)
      local s = assert(net.connect { host = "127.0.0.1", port = port })
      assert.are.equal("127.0.0.1:" .. port, s:peer())
      assert.is_true(s:write("hello, "))
      assert.is_true(s:write("world"))
      assert.are.equal("hello, world", read_n(s, 12, 2000))
      s:close()
      l:close()
    end)
  end)

  it("echoes over a Unix socket created with the requested mode", function()
    core.run(function()
      local path = dir .. "/echo.sock"
      local l = assert(net.listen { path = path, mode = tonumber("600", 8) })
      assert.is_nil(l:port())
      local st = assert(fs.stat(path))
      assert.are.equal("socket", st.type)
      assert.are.equal(tonumber("600", 8), st.mode)
      echo_server(l)
      local s = assert(net.connect { path = path, timeout = 2000 })
      assert.are.equal("unix:" .. path, s:peer())
      local big = string.rep("0123456789abcdef", 65536) -- 1 MiB, more than any buffer
      local reader = core.spawn(function() return read_n(s, #big, 5000) end)
      assert.is_true(s:write(big))
      local ok, back = reader:join()
      assert.is_true(ok)
      assert.are.equal(big, back)
      s:close()
      l:close()
    end)
  end)

  it("reports a Unix path already in use and leaves the file alone", function()
    core.run(function()
      local path = dir .. "/busy.sock"
      local l = assert(net.listen { path = path })
      local l2, err, code = net.listen { path = path }
      assert.is_nil(l2)
      assert.are.equal("EADDRINUSE", code)
      assert.matches("listen " .. path:gsub("%p", "%%%0") .. ": EADDRINUSE", err)
      assert.matches("stale", err)
      l:close()
      -- a listener removes its own socket file when it closes...
      assert.is_nil(fs.stat(path))
      -- ...but never a file it did not create, such as a stale socket
      assert(fs.write(path, "stale"))
      local l3, err3 = net.listen { path = path }
      assert.is_nil(l3)
      assert.matches("EADDRINUSE", err3)
      assert.are.equal("stale", fs.read(path))
      assert(fs.unlink(path))
      l3 = assert(net.listen { path = path })
      l3:close()
    end)
  end)

  it("returns nil with no error at EOF, and again on later reads", function()
    core.run(function()
      local l = assert(net.listen { port = 0 })
      core.spawn(function()
        local s = l:accept()
        s:write("last words")
        s:close()
      end)
      local s = assert(net.connect { port = l:port() })
      assert.are.equal("last words", read_n(s, 10, 2000))
      local r = table.pack(s:read(2000))
      assert.are.equal(1, r.n)
      assert.is_nil(r[1])
      assert.are.equal(1, select("#", s:read()))
      s:close()
      l:close()
    end)
  end)

  it("half-closes with shutdown: the peer sees EOF and can still answer", function()
    core.run(function()
      local l = assert(net.listen { port = 0 })
      core.spawn(function()
        local s = l:accept()
        local got = {}
        while true do
          local c = s:read()
          if not c then break end
          got[#got + 1] = c
        end
        s:write("got " .. table.concat(got))
        s:close()
      end)
      local s = assert(net.connect { port = l:port() })
      s:write("ping")
      assert.is_true(s:shutdown())
      assert.are.equal("got ping", read_n(s, 8, 2000))
      assert.is_nil(s:read(2000))
      s:close()
      l:close()
    end)
  end)

  it("fails to connect to a closed port or a missing path with a clear error", function()
    core.run(function()
      local l = assert(net.listen { port = 0 })
      local port = l:port()
      l:close()
      core.sleep(1)
      local s, err, code = net.connect { host = "127.0.0.1", port = port }
      assert.is_nil(s)
      assert.are.equal("ECONNREFUSED", code)
      assert.matches("connect 127.0.0.1:" .. port .. ": ECONNREFUSED", err)

      local path = dir .. "/missing.sock"
      s, err, code = net.connect { path = path }
      assert.is_nil(s)
      assert.are.equal("ENOENT", code)
      assert.are.equal("connect " .. path .. ": ENOENT: no such file or directory", err)
    end)
  end)

  it("refuses bad addresses: misuse raises, an unusable address fails", function()
    core.run(function()
      assert.has_error(function() net.listen {} end)
      assert.has_error(function() net.listen { port = "80" } end)
      assert.has_error(function() net.listen { port = 70000 } end)
      assert.has_error(function() net.listen { path = dir .. "/a", port = 1 } end)
      assert.has_error(function() net.listen { port = 0, mode = 384 } end)
      assert.has_error(function() net.connect "x" end)
      local l, err, code = net.listen { host = "example.invalid", port = 0 }
      assert.is_nil(l)
      assert.are.equal("EINVAL", code)
      assert.matches("numeric", err)
      local s, err2, code2 = net.connect { path = dir .. "/" .. string.rep("x", 120) }
      assert.is_nil(s)
      assert.are.equal("ENAMETOOLONG", code2)
      assert.matches("shorter than 108", err2)
    end)
    -- waiting operations need a task
    assert.has_error(function() net.connect { port = 1 } end, nil)
  end)

  it("times out a read, and a later read on the same stream still works", function()
    core.run(function()
      local l = assert(net.listen { port = 0 })
      local s = assert(net.connect { port = l:port() })
      local peer = assert(l:accept(2000))
      local t0 = core.now()
      local v, err = s:read(50)
      assert.is_nil(v)
      assert.are.equal("timeout", err)
      assert.is_true(core.now() - t0 >= 45)
      core.spawn(function() core.sleep(20); peer:write("late") end)
      assert.are.equal("late", s:read(2000))
      s:close()
      peer:close()
      l:close()
    end)
  end)

  it("gives EPIPE or ECONNRESET when writing to a closed peer, never SIGPIPE", function()
    core.run(function()
      local l = assert(net.listen { port = 0 })
      core.spawn(function()
        local s = l:accept()
        s:close()
      end)
      local s = assert(net.connect { port = l:port() })
      assert.is_nil(s:read(2000)) -- the peer closed
      local chunk = string.rep("x", 65536)
      local ok, err, code
      for _ = 1, 100 do
        ok, err, code = s:write(chunk)
        if not ok then break end
      end
      assert.is_nil(ok)
      assert.is_truthy(code == "EPIPE" or code == "ECONNRESET", tostring(err))
      assert.matches("^write: ", err)
      s:close()
      l:close()
    end)
  end)

  it("makes a writer wait while the peer does not read (bounded buffering)", function()
    core.run(function()
      local l = assert(net.listen { port = 0 })
      local server
      core.spawn(function() server = l:accept() end)
      local s = assert(net.connect { port = l:port() })
      while not server do core.sleep(1) end
      local big = string.rep("y", 32 * 1024 * 1024)
      local done = false
      local writer = core.spawn(function()
        local ok = s:write(big)
        done = true
        return ok
      end)
      core.sleep(150)
      -- 32 MiB cannot all sit in kernel buffers plus our bounded read buffer
      assert.is_false(done)
      local got = read_n(server, #big, 5000)
      assert.are.equal(#big, #got)
      local ok, res = writer:join(5000)
      assert.is_true(ok)
      assert.is_true(res)
      assert.is_true(done)
      s:close()
      server:close()
      l:close()
    end)
  end)

  it("serves 500 concurrent connections", function()
    core.run(function()
      local path = dir .. "/many.sock"
      local l = assert(net.listen { path = path, backlog = 1024 })
      echo_server(l)
      local tcp = assert(net.listen { port = 0, backlog = 1024 })
      echo_server(tcp)
      local tasks = {}
      for i = 1, 500 do
        tasks[i] = core.spawn(function()
          local s, err
          if i % 2 == 0 then
            s, err = net.connect { path = path, timeout = 5000 }
          else
            s, err = net.connect { port = tcp:port(), timeout = 5000 }
          end
          assert(s, err)
          local msg = "message " .. i
          assert(s:write(msg))
          local back = assert(read_n(s, #msg, 5000))
          s:close()
          return back
        end)
      end
      for i = 1, 500 do
        local ok, back = tasks[i]:join(10000)
        assert.is_true(ok, tostring(back))
        assert.are.equal("message " .. i, back)
      end
      l:close()
      tcp:close()
    end)
  end)

  it("closes idempotently; using a closed stream or listener raises", function()
    core.run(function()
      local l = assert(net.listen { port = 0 })
      echo_server(l)
      local s = assert(net.connect { port = l:port() })
      s:close()
      s:close()
      assert.has_error(function() s:read() end, "stream is closed")
      assert.has_error(function() s:write("x") end, "stream is closed")
      assert.has_error(function() s:peer() end, "stream is closed")
      assert.matches("closed", tostring(s))
      l:close()
      l:close()
      assert.has_error(function() l:accept() end, "listener is closed")
      assert.has_error(function() l:port() end, "listener is closed")
      do
        local s2 <close> = nil
        _ = s2
      end
    end)
  end)

  it("wakes a task reading a stream that another task closes", function()
    core.run(function()
      local l = assert(net.listen { port = 0 })
      core.spawn(function() l:accept() end)
      local s = assert(net.connect { port = l:port() })
      local reader = core.spawn(function() return s:read() end)
      core.sleep(10)
      s:close()
      local ok, v, err = reader:join(1000)
      assert.is_true(ok)
      assert.is_nil(v)
      assert.are.equal("closed", err)
      l:close()
    end)
  end)

  it("wakes a pending accept with nil, 'closed' when the listener closes", function()
    core.run(function()
      local l = assert(net.listen { port = 0 })
      local acceptor = core.spawn(function() return l:accept() end)
      core.sleep(10)
      assert.are.equal("waiting", acceptor:status())
      l:close()
      local ok, s, err = acceptor:join(1000)
      assert.is_true(ok)
      assert.is_nil(s)
      assert.are.equal("closed", err)
    end)
  end)

  it("times out an accept and accepts later", function()
    core.run(function()
      local l = assert(net.listen { port = 0 })
      local s, err = l:accept(20)
      assert.is_nil(s)
      assert.are.equal("timeout", err)
      local c = core.spawn(function() return net.connect { port = l:port() } end)
      s = assert(l:accept(2000))
      local ok, cs = c:join()
      assert.is_true(ok)
      cs:close()
      s:close()
      l:close()
    end)
  end)

  it("rejects two readers on one stream", function()
    core.run(function()
      local l = assert(net.listen { port = 0 })
      core.spawn(function() l:accept() end)
      local s = assert(net.connect { port = l:port() })
      local r1 = core.spawn(function() return s:read(100) end)
      core.sleep(5)
      assert.has_error(function() s:read(10) end, "another task is already reading this stream")
      assert.are.same({ true, nil, "timeout" }, { r1:join() })
      s:close()
      l:close()
    end)
  end)

  it("collects dropped streams and listeners without leaking tasks", function()
    local before = core.tasks()
    core.run(function()
      for _ = 1, 20 do
        local l = assert(net.listen { port = 0 })
        local s = assert(net.connect { port = l:port() })
        local a = assert(l:accept(1000))
        _ = a
        _ = s
      end
      collectgarbage()
      collectgarbage()
      core.sleep(5)
    end)
    assert.are.equal(before, core.tasks())
  end)
end)
