-- core.http: the HTTP/1.1 server and client against real sockets, raw bytes
-- and the C test backend (spec/fixtures/backend.c).
local core = require "tenement.core"
local net, http, fs = core.net, core.http, core.fs
local support = require "support"

local BACKEND = require("backend").PATH

local function tmpdir()
  local base = os.getenv("TMPDIR") or "/tmp"
  local dir = string.format("%s/tn-http-%d-%d", base, math.floor(core.time() * 1000) % 1e9,
    math.random(1, 1e9))
  assert(fs.mkdir(dir, 448))
  return dir
end

-- Responses read the way a strict peer would: a body the server frames by
-- anything but Content-Length is not taken for one.
local function raw(port_or_path) return support.raw(port_or_path, { length_only = true }) end

-- A server on an ephemeral TCP port; calls counts handler calls.
local function serve(handler, opts)
  local l = assert(net.listen { port = 0 })
  local calls = { n = 0 }
  local srv = http.serve(l, function(req)
    calls.n = calls.n + 1
    return handler(req, calls)
  end, opts)
  return srv, l:port(), calls
end

local function hello(req)
  return 200, { ["content-type"] = "text/plain" }, "hello " .. req.path
end

local fixture = require "backend"
local function start_backend(dir, env, name, no_wait) return fixture.start(dir, name, env, no_wait) end
local exit_code, stop_backend = fixture.exit_code, fixture.stop

describe("core.http server", function()
  it("answers GET and POST, and gives the handler the parsed request", function()
    core.run(function()
      local seen
      local srv, port = serve(function(req)
        seen = {
          method = req.method, target = req.target, path = req.path, query = req.query,
          version = req.version, headers = req.headers, peer = req.peer, body = req:body(),
          one = req:header("X-Multi"),
        }
        return 201, { ["X-Reply"] = "yes", ["Set-Cookie"] = { "a=1", "b=2" } }, "created " .. seen.body
      end)
      local c = raw(port)
      c:send("POST /things?x=1&y=2 HTTP/1.1\r\nHost: example.test\r\nX-Multi: a\r\n" ..
        "x-multi: b\r\nCookie: c=1\r\nCookie: d=2\r\nSet-Cookie: s=1\r\nSet-Cookie: t=2\r\n" ..
        "Content-Length: 5\r\n\r\nhello")
      local res = assert(c:response())
      assert.are.equal(201, res.status)
      assert.are.equal("Created", res.reason)
      assert.are.equal("created hello", res.body)
      assert.are.equal("yes", res.headers["x-reply"])
      assert.are.equal("tenement", res.headers["server"])
      assert.matches("GMT$", res.headers["date"])
      assert.are.equal("13", res.headers["content-length"])
      assert.matches("Set%-Cookie: a=1\r\nSet%-Cookie: b=2", res.raw_head)
      assert.are.equal("POST", seen.method)
      assert.are.equal("/things?x=1&y=2", seen.target)
      assert.are.equal("/things", seen.path)
      assert.are.equal("x=1&y=2", seen.query)
      assert.are.equal("1.1", seen.version)
      assert.are.equal("example.test", seen.headers.host)
      assert.are.equal("a, b", seen.headers["x-multi"])
      assert.are.equal("a, b", seen.one)
      assert.are.equal("c=1; d=2", seen.headers.cookie)
      assert.are.same({ "s=1", "t=2" }, seen.headers["set-cookie"])
      assert.are.equal("hello", seen.body)
      assert.matches("^127%.0%.0%.1:%d+$", seen.peer)
      c:close()
      srv:close()
    end)
  end)

  it("reads chunked request bodies, with trailers dropped", function()
    core.run(function()
      local srv, port = serve(function(req)
        return 200, nil, "got " .. req:body() .. " te=" .. req.headers["transfer-encoding"]
      end)
      local c = raw(port)
      c:send("POST /up HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n" ..
        "5\r\nhello\r\n1;ext=1\r\n \r\n5\r\nworld\r\n0\r\nX-Trailer: t\r\n\r\n")
      local res = assert(c:response())
      assert.are.equal(200, res.status)
      assert.are.equal("got hello world te=chunked", res.body)
      c:close()
      srv:close()
    end)
  end)

  it("keeps a connection alive for a second request", function()
    core.run(function()
      local srv, port = serve(hello)
      local c = raw(port)
      c:send("GET /one HTTP/1.1\r\nHost: a\r\n\r\n")
      assert.are.equal("hello /one", assert(c:response()).body)
      c:send("GET /two HTTP/1.1\r\nHost: a\r\n\r\n")
      local res = assert(c:response())
      assert.are.equal("hello /two", res.body)
      assert.is_nil(res.headers.connection)
      local st = srv:stats()
      assert.are.equal(1, st.connections_accepted)
      assert.are.equal(2, st.requests)
      assert.are.equal(1, st.connections_open)
      c:close()
      srv:close()
    end)
  end)

  it("answers pipelined requests in order, one handler at a time", function()
    core.run(function()
      local order = {}
      local srv, port = serve(function(req)
        order[#order + 1] = "start " .. req.path
        if req.path == "/slow" then core.sleep(50) end
        order[#order + 1] = "end " .. req.path
        return 200, nil, req.path
      end)
      local c = raw(port)
      c:send("GET /slow HTTP/1.1\r\nHost: a\r\n\r\nGET /fast HTTP/1.1\r\nHost: a\r\n\r\n" ..
        "POST /third HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc")
      assert.are.equal("/slow", assert(c:response()).body)
      assert.are.equal("/fast", assert(c:response()).body)
      assert.are.equal("/third", assert(c:response()).body)
      assert.are.same({ "start /slow", "end /slow", "start /fast", "end /fast",
        "start /third", "end /third" }, order)
      c:close()
      srv:close()
    end)
  end)

  it("sends no body for HEAD but the length a GET would have", function()
    core.run(function()
      local srv, port = serve(function() return 200, nil, "twelve bytes" end)
      local c = raw(port)
      c:send("HEAD / HTTP/1.1\r\nHost: a\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n")
      local res = assert(c:response { head = true })
      assert.are.equal("12", res.headers["content-length"])
      assert.are.equal("", res.body)
      -- the next bytes are the GET's response, so nothing followed the HEAD's head
      local get = assert(c:response())
      assert.are.equal("twelve bytes", get.body)
      c:close()
      srv:close()
    end)
  end)

  it("turns a handler error into a logged 500 and keeps serving", function()
    core.run(function()
      local logged = {}
      local srv, port = serve(function(req)
        if req.path == "/boom" then error("kaboom") end
        if req.path == "/later" then core.sleep(1); error({ "a table error" }) end
        if req.path == "/nothing" then return end
        if req.path == "/badheader" then return 200, { ["bad name"] = "x" }, "" end
        return 404, { ["content-type"] = "text/plain" }, "no such thing"
      end, { on_error = function(msg) logged[#logged + 1] = msg end })
      local c = raw(port)
      c:send("GET /boom HTTP/1.1\r\nHost: a\r\n\r\n")
      local res = assert(c:response())
      assert.are.equal(500, res.status)
      c:send("GET /later HTTP/1.1\r\nHost: a\r\n\r\n")
      assert.are.equal(500, assert(c:response()).status)
      c:send("GET /nothing HTTP/1.1\r\nHost: a\r\n\r\n")
      assert.are.equal(500, assert(c:response()).status)
      c:send("GET /badheader HTTP/1.1\r\nHost: a\r\n\r\n")
      assert.are.equal(500, assert(c:response()).status)
      c:send("GET /missing HTTP/1.1\r\nHost: a\r\n\r\n")
      res = assert(c:response())
      assert.are.equal(404, res.status)
      assert.are.equal("Not Found", res.reason)
      assert.are.equal("no such thing", res.body)
      assert.are.equal(4, #logged)
      assert.matches("GET /boom: .*kaboom", logged[1])
      assert.matches("stack traceback", logged[1])
      assert.matches("GET /later", logged[2])
      assert.matches("no response", logged[3])
      assert.matches("invalid header name", logged[4])
      assert.are.equal(1, srv:stats().connections_accepted)
      c:close()
      srv:close()
    end)
  end)

  it("lets a handler respond with req:respond and go on working", function()
    core.run(function()
      local after, second
      local srv, port = serve(function(req)
        assert.is_true(req:respond(202, { { "X-A", "1" }, { "X-A", "2" } }, "accepted"))
        second = { pcall(req.respond, req, 200) }
        core.sleep(5)
        after = true
      end)
      local c = raw(port)
      c:send("GET / HTTP/1.1\r\nHost: a\r\n\r\n")
      local res = assert(c:response())
      assert.are.equal(202, res.status)
      assert.are.equal("accepted", res.body)
      assert.matches("X%-A: 1\r\nX%-A: 2\r\n", res.raw_head)
      core.sleep(20)
      assert.is_true(after)
      assert.is_false(second[1])
      assert.matches("already sent", second[2])
      c:close()
      srv:close()
    end)
  end)

  it("honours Connection: close and HTTP/1.0 keep-alive only when asked", function()
    core.run(function()
      local srv, port = serve(hello)
      local c = raw(port)
      c:send("GET /a HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
      local res = assert(c:response())
      assert.are.equal("close", res.headers.connection)
      assert.is_true(c:closed())
      c:close()

      c = raw(port)
      c:send("GET /b HTTP/1.0\r\n\r\n")
      res = assert(c:response())
      assert.are.equal("hello /b", res.body)
      assert.are.equal("close", res.headers.connection)
      assert.is_true(c:closed())
      c:close()

      c = raw(port)
      c:send("GET /c HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
      res = assert(c:response())
      assert.are.equal("keep-alive", res.headers.connection)
      c:send("GET /d HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
      assert.are.equal("hello /d", assert(c:response()).body)
      c:close()

      -- a handler can close too
      local srv2, port2 = serve(function() return 200, { Connection = "close" }, "bye" end)
      c = raw(port2)
      c:send("GET / HTTP/1.1\r\nHost: a\r\n\r\n")
      assert.are.equal("close", assert(c:response()).headers.connection)
      assert.is_true(c:closed())
      c:close()
      srv:close()
      srv2:close()
    end)
  end)

  it("answers Expect: 100-continue before reading the body", function()
    core.run(function()
      local srv, port = serve(function(req) return 200, nil, "len " .. #req:body() end)
      local c = raw(port)
      c:send("POST / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n")
      local interim = assert(c:response())
      assert.are.equal(100, interim.status)
      c:send("abcd")
      assert.are.equal("len 4", assert(c:response()).body)
      c:close()
      srv:close()
    end)
  end)

  it("sends and receives bodies of several MiB", function()
    core.run(function()
      local srv, port = serve(function(req)
        local body = req:body()
        if req.path == "/big" then return 200, nil, string.rep("r", 5 * 1024 * 1024) end
        return 200, nil, "got " .. #body .. " " .. body:sub(1, 3) .. body:sub(-3)
      end)
      local res = assert(http.request { port = port, target = "/big", timeout = 10000 })
      assert.are.equal(5 * 1024 * 1024, #res.body)
      local parts = {}
      for i = 1, 48 do parts[i] = string.rep(string.char(96 + (i % 26) + 1), 65536) end
      parts[1] = "abc" .. parts[1]:sub(4)
      parts[48] = parts[48]:sub(1, -4) .. "xyz"
      res = assert(http.request { port = port, method = "POST", target = "/up", body = parts, timeout = 10000 })
      assert.are.equal("got " .. 48 * 65536 .. " abcxyz", res.body)
      res = assert(http.request { port = port, method = "POST", target = "/up",
        body = table.concat(parts), timeout = 10000 })
      assert.are.equal("got " .. 48 * 65536 .. " abcxyz", res.body)
      srv:close()
    end)
  end)

  it("serves 200 concurrent clients", function()
    core.run(function()
      local srv, port = serve(function(req)
        core.sleep(math.random(0, 5))
        return 200, nil, "n=" .. req.query
      end)
      local tasks = {}
      for i = 1, 200 do
        tasks[i] = core.spawn(function()
          return http.request { port = port, target = "/?" .. i, timeout = 10000 }
        end)
      end
      for i = 1, 200 do
        local ok, res, err = tasks[i]:join(10000)
        assert.is_true(ok, tostring(res))
        assert(res, err)
        assert.are.equal("n=" .. i, res.body)
      end
      assert.are.equal(200, srv:stats().requests)
      srv:close()
    end)
  end)

  it("answers 100 pipelined requests sent in one write, in order", function()
    core.run(function()
      local srv, port = serve(function(req) return 200, nil, req.query end)
      local c = raw(port)
      local reqs = {}
      for i = 1, 100 do reqs[i] = "GET /?" .. i .. " HTTP/1.1\r\nHost: a\r\n\r\n" end
      c:send(table.concat(reqs))
      for i = 1, 100 do assert.are.equal(tostring(i), assert(c:response()).body) end
      c:close()
      srv:close()
    end)
  end)

  it("still answers a client that half-closed after its request", function()
    core.run(function()
      local srv, port = serve(function() core.sleep(10); return 200, nil, "late but here" end)
      local c = raw(port)
      c:send("GET / HTTP/1.1\r\nHost: a\r\n\r\n")
      assert(c.s:shutdown())
      assert.are.equal("late but here", assert(c:response()).body)
      assert.is_true(c:closed())
      c:close()
      srv:close()
    end)
  end)

  it("answers every request a client pipelined before half-closing", function()
    core.run(function()
      local srv, port = serve(function(req) core.sleep(5); return 200, nil, req.path end)
      local c = raw(port)
      c:send("GET /1 HTTP/1.1\r\nHost: a\r\n\r\nGET /2 HTTP/1.1\r\nHost: a\r\n\r\n" ..
        "POST /3 HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nok")
      assert(c.s:shutdown())
      for i = 1, 3 do assert.are.equal("/" .. i, assert(c:response()).body) end
      assert.is_true(c:closed())
      c:close()
      assert.is_true(srv:drain(1000))
    end)
  end)

  it("gives body() an error when the client half-closes before the body ends", function()
    core.run(function()
      local got
      local srv, port = serve(function(req)
        core.sleep(20)
        got = { req:body() }
        return 400, nil, "short"
      end, { lazy_body = true })
      local c = raw(port)
      c:send("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nabc")
      assert(c.s:shutdown())
      assert.are.equal(400, assert(c:response()).status)
      assert.is_nil(got[1])
      assert.matches("closed before the request body ended", got[2])
      assert.is_true(c:closed())
      c:close()
      srv:close()
    end)
  end)

  it("survives clients that vanish mid-request", function()
    core.run(function()
      local results = {}
      local srv, port = serve(function(req)
        core.sleep(20)
        results[#results + 1] = { req:respond(200, nil, string.rep("x", 1024 * 1024)) }
        return nil
      end)
      for _ = 1, 5 do
        local c = raw(port)
        c:send("GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        c:close()
      end
      -- a body the client stops sending halfway
      local c = raw(port)
      c:send("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\nabc")
      c:close()
      local deadline = core.now() + 3000
      while (#results < 5 or srv:stats().connections_open > 0) and core.now() < deadline do
        core.sleep(5)
      end
      assert.are.equal(5, #results)
      assert.are.equal(0, srv:stats().connections_open)
      -- and it still serves
      local res = assert(http.request { port = port })
      assert.are.equal(1024 * 1024, #res.body)
      -- a request object outlives its connection
      srv:close()
    end)
  end)

  it("keeps request fields after the connection is gone", function()
    core.run(function()
      local kept
      local srv, port = serve(function(req)
        kept = req
        req.note = "mine"
        return 200, nil, "ok"
      end)
      assert(http.request { port = port, target = "/p?q" })
      assert.are.equal("GET", kept.method)
      assert.are.equal("/p", kept.path)
      assert.are.equal("q", kept.query)
      assert.are.equal("mine", kept.note)
      assert.are.equal("", kept:body())
      assert.has_error(function() kept:respond(200) end, "a response was already sent for this request")
      assert.matches("GET /p%?q", tostring(kept))
      srv:close()
    end)
  end)

  describe("refuses malformed and ambiguous requests with 400 before any handler", function()
    local cases = {
      ["Content-Length with Transfer-Encoding"] =
        "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
      ["Transfer-Encoding with Content-Length"] =
        "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
      ["two different Content-Length"] =
        "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
      ["two equal Content-Length"] =
        "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
      ["Content-Length list"] = "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3, 3\r\n\r\nabc",
      ["bad Content-Length"] = "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3x\r\n\r\nabc",
      ["negative Content-Length"] = "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n",
      ["obsolete line folding"] = "GET / HTTP/1.1\r\nHost: a\r\nX-A: b\r\n c\r\n\r\n",
      ["obsolete folding with a tab"] = "GET / HTTP/1.1\r\nHost: a\r\nX-A: b\r\n\tc\r\n\r\n",
      ["bare LF everywhere"] = "GET / HTTP/1.1\nHost: a\n\n",
      ["bare LF after the request line"] = "GET / HTTP/1.1\nHost: a\r\n\r\n",
      ["bare LF after a header"] = "GET / HTTP/1.1\r\nHost: a\nX: y\r\n\r\n",
      ["bare CR"] = "GET / HTTP/1.1\r\nHost: a\rX: y\r\n\r\n",
      ["Transfer-Encoding: gzip"] = "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\nabc",
      ["Transfer-Encoding: chunked, gzip"] =
        "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n",
      ["Transfer-Encoding: gzip, chunked"] =
        "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
      ["Transfer-Encoding twice"] = "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n" ..
        "Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
      ["Transfer-Encoding: identity"] =
        "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: identity\r\n\r\n",
      ["bad chunk size"] =
        "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
      ["chunk size overflow"] = "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n" ..
        "fffffffffffffffff1\r\nabc\r\n0\r\n\r\n",
      ["bad chunk extension"] =
        "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3;\"x\r\nabc\r\n0\r\n\r\n",
      ["chunk without CRLF after the data"] =
        "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcX\r\n0\r\n\r\n",
      ["bare LF in chunk framing"] =
        "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\nabc\n0\n\n",
      ["NUL in a header value"] = "GET / HTTP/1.1\r\nHost: a\r\nX: a\0b\r\n\r\n",
      ["NUL in a header name"] = "GET / HTTP/1.1\r\nHost: a\r\nX\0Y: ab\r\n\r\n",
      ["space before the colon"] = "GET / HTTP/1.1\r\nHost : a\r\n\r\n",
      ["tab before the colon"] = "GET / HTTP/1.1\r\nHost\t: a\r\n\r\n",
      ["header without a colon"] = "GET / HTTP/1.1\r\nHost: a\r\nNoColon\r\n\r\n",
      ["invalid method"] = "G@T / HTTP/1.1\r\nHost: a\r\n\r\n",
      ["lower-case method"] = "get / HTTP/1.1\r\nHost: a\r\n\r\n",
      ["HTTP/2.0 request line"] = "GET / HTTP/2.0\r\nHost: a\r\n\r\n",
      ["HTTP/0.9 request line"] = "GET / HTTP/0.9\r\nHost: a\r\n\r\n",
      ["HTTP/1.2 request line"] = "GET / HTTP/1.2\r\nHost: a\r\n\r\n",
      ["space inside the target"] = "GET /a b HTTP/1.1\r\nHost: a\r\n\r\n",
      ["control character in the target"] = "GET /a\1b HTTP/1.1\r\nHost: a\r\n\r\n",
      ["missing Host in HTTP/1.1"] = "GET / HTTP/1.1\r\nX: y\r\n\r\n",
      ["two Host headers"] = "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
      ["CONNECT"] = "CONNECT example.test:443 HTTP/1.1\r\nHost: example.test:443\r\n\r\n",
      ["garbage"] = "\1\2\3\4 hello\r\n\r\n",
    }
    local names = {}
    for name in pairs(cases) do names[#names + 1] = name end
    table.sort(names)
    for _, name in ipairs(names) do
      it(name, function()
        core.run(function()
          local srv, port, calls = serve(hello)
          local c = raw(port)
          c:send(cases[name])
          local res = assert(c:response())
          assert.are.equal(400, res.status)
          assert.are.equal("close", res.headers.connection)
          assert.is_true(c:closed())
          assert.are.equal(0, calls.n)
          c:close()
          srv:close()
        end)
      end)
    end
  end)

  it("checks line endings and folding wherever the reads split the head", function()
    -- the raw head is scanned piece by piece as it arrives: a CR, LF or
    -- folding white space at the edge of a read must count like any other
    local heads = {
      { "GET / HTTP/1.1\r\nHost: a\r\nX-A: b\r\n c\r\n\r\n", 400 },
      { "GET / HTTP/1.1\r\nHost: a\r\nX-A: b\r\n\tc\r\n\r\n", 400 },
      { "GET / HTTP/1.1\r\nHost: a\nX: y\r\n\r\n", 400 },
      { "GET / HTTP/1.1\nHost: a\r\n\r\n", 400 },
      { "GET / HTTP/1.1\r\nHost: a\r\nX-A: b c\r\n\r\n", 200 },
    }
    core.run(function()
      local srv, port, calls = serve(hello)
      local want_calls = 0
      for _, h in ipairs(heads) do
        local text, status = h[1], h[2]
        for cut = 1, #text - 1 do
          local c = raw(port)
          c:send(text:sub(1, cut))
          core.sleep(2) -- its own read
          c:send(text:sub(cut + 1))
          local res = assert(c:response())
          assert.are.equal(status, res.status, string.format("%q cut after %d bytes", text, cut))
          if status == 200 then want_calls = want_calls + 1 end
          c:close()
        end
      end
      assert.are.equal(want_calls, calls.n)
      srv:close()
    end)
  end)

  it("does not let a smuggled request through after an ambiguous one", function()
    core.run(function()
      local srv, port, calls = serve(hello)
      local c = raw(port)
      c:send("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 44\r\nTransfer-Encoding: chunked\r\n\r\n" ..
        "0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n")
      assert.are.equal(400, assert(c:response()).status)
      assert.is_true(c:closed())
      assert.are.equal(0, calls.n)
      c:close()
      srv:close()
    end)
  end)

  describe("limits", function()
    it("answers 431 to a head that is too large or has too many fields", function()
      core.run(function()
        local srv, port, calls = serve(hello)
        local c = raw(port)
        c:send("GET / HTTP/1.1\r\nHost: a\r\nX-Big: " .. string.rep("b", 17 * 1024) .. "\r\n\r\n")
        assert.are.equal(431, assert(c:response()).status)
        assert.is_true(c:closed())
        c:close()
        -- a head that never ends is cut off at the limit too
        c = raw(port)
        c:send("GET / HTTP/1.1\r\nHost: a\r\n")
        local ok = true
        for _ = 1, 40 do
          ok = c.s:write("X-Pad: " .. string.rep("p", 1000) .. "\r\n")
          if not ok then break end
        end
        assert.are.equal(431, assert(c:response()).status)
        c:close()
        c = raw(port)
        local many = {}
        for i = 1, 101 do many[i] = "X-H" .. i .. ": v\r\n" end
        c:send("GET / HTTP/1.1\r\nHost: a\r\n" .. table.concat(many) .. "\r\n")
        assert.are.equal(431, assert(c:response()).status)
        c:close()
        -- exactly at the limits is fine
        c = raw(port)
        local ninety_nine = {}
        for i = 1, 99 do ninety_nine[i] = "X-H" .. i .. ": v\r\n" end
        c:send("GET / HTTP/1.1\r\nHost: a\r\n" .. table.concat(ninety_nine) .. "\r\n")
        assert.are.equal(200, assert(c:response()).status)
        c:close()
        assert.are.equal(1, calls.n)
        srv:close()
      end)
    end)

    it("answers 413 to a body over max_body, declared or chunked", function()
      core.run(function()
        local srv, port, calls = serve(function(req) return 200, nil, req:body() end, { max_body = 100 })
        local c = raw(port)
        c:send("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 101\r\n\r\n")
        assert.are.equal(413, assert(c:response()).status)
        assert.is_true(c:closed())
        c:close()
        c = raw(port)
        c:send("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n" ..
          "40\r\n" .. string.rep("a", 64) .. "\r\n40\r\n" .. string.rep("b", 64) .. "\r\n0\r\n\r\n")
        assert.are.equal(413, assert(c:response()).status)
        c:close()
        c = raw(port)
        c:send("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\n" .. string.rep("x", 100))
        local res = assert(c:response())
        assert.are.equal(200, res.status)
        assert.are.equal(100, #res.body)
        c:close()
        assert.are.equal(1, calls.n)
        srv:close()
      end)
    end)

    it("answers 408 to a head that does not arrive in time (slowloris)", function()
      core.run(function()
        local srv, port, calls = serve(hello, { header_timeout = 100 })
        local c = raw(port)
        local t0 = core.now()
        c:send("GET / HTTP/1.1\r\nHost: a\r\n")
        core.sleep(30)
        c:send("X-Slow: 1\r\n") -- trickling bytes does not extend the deadline
        local res = assert(c:response())
        assert.are.equal(408, res.status)
        assert.is_true(core.now() - t0 >= 90)
        assert.is_true(c:closed())
        c:close()
        -- a connection that sends nothing at all is closed without a word
        c = raw(port)
        assert.is_true(c:closed(1000))
        assert.are.equal("", c.buf)
        c:close()
        assert.are.equal(0, calls.n)
        srv:close()
      end)
    end)

    it("answers 408 to a body that does not arrive in time", function()
      core.run(function()
        local srv, port, calls = serve(hello, { body_timeout = 100 })
        local c = raw(port)
        c:send("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nabc")
        assert.are.equal(408, assert(c:response()).status)
        assert.are.equal(0, calls.n)
        c:close()
        srv:close()
      end)
    end)

    it("closes a keep-alive connection idle for longer than idle_timeout", function()
      core.run(function()
        local srv, port = serve(hello, { idle_timeout = 50 })
        local c = raw(port)
        c:send("GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        assert.are.equal(200, assert(c:response()).status)
        local t0 = core.now()
        assert.is_true(c:closed())
        assert.is_true(core.now() - t0 >= 40)
        assert.are.equal(0, srv:stats().connections_open)
        c:close()
        srv:close()
      end)
    end)

    it("cuts a client that does not read its response within send_timeout", function()
      core.run(function()
        local srv, port = serve(function() return 200, nil, string.rep("z", 32 * 1024 * 1024) end,
          { send_timeout = 100 })
        local c = raw(port)
        c:send("GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        local deadline = core.now() + 3000
        repeat core.sleep(10) until srv:stats().connections_open == 0 or core.now() > deadline
        assert.are.equal(0, srv:stats().connections_open)
        c:close()
        srv:close()
      end)
    end)

    it("at max_connections closes the longest idle connection for a new one, else waits", function()
      core.run(function()
        local srv, port = serve(hello, { max_connections = 2 })
        local a, b = raw(port), raw(port)
        for _, c in ipairs { a, b } do
          c:send("GET / HTTP/1.1\r\nHost: a\r\n\r\n")
          assert.are.equal(200, assert(c:response()).status)
        end
        -- both idle between requests: the older one, a, makes room
        local third = raw(port)
        third:send("GET /third HTTP/1.1\r\nHost: a\r\n\r\n")
        assert.are.equal("hello /third", assert(third:response()).body)
        assert.is_true(a:closed())
        assert.are.equal(1, srv:stats().connections_reclaimed)
        b:send("GET /b HTTP/1.1\r\nHost: a\r\n\r\n")
        assert.are.equal("hello /b", assert(b:response()).body)
        -- none idle (each has begun a request): a new one waits in the backlog
        b:send("GET /b2 HTTP/1.1\r\n")
        third:send("GET /t2 HTTP/1.1\r\n")
        core.sleep(20)
        local fourth = raw(port) -- the kernel completes the handshake (backlog)
        fourth:send("GET /fourth HTTP/1.1\r\nHost: a\r\n\r\n")
        local res, err = fourth:response { timeout = 150 }
        assert.is_nil(res)
        assert.are.equal("timeout", err)
        assert.are.equal(2, srv:stats().connections_open)
        -- b's request ends and b is idle again: it makes room, after its answer
        b:send("Host: a\r\n\r\n")
        assert.are.equal("hello /b2", assert(b:response()).body)
        assert.are.equal("hello /fourth", assert(fourth:response()).body)
        assert.is_true(b:closed())
        -- the request begun on third was never cut
        third:send("Host: a\r\n\r\n")
        assert.are.equal("hello /t2", assert(third:response()).body)
        assert.are.equal(4, srv:stats().connections_accepted)
        assert.are.equal(2, srv:stats().connections_reclaimed)
        third:close()
        fourth:close()
        srv:close()
      end)
    end)
  end)

  describe("lazy bodies", function()
    it("calls the handler at the head; body() reads with its own limit", function()
      core.run(function()
        local srv, port = serve(function(req)
          if req.path == "/small" then
            local body, err = req:body(4)
            return 413, nil, tostring(body) .. " " .. tostring(err)
          end
          if req.path == "/ignore" then return 200, nil, "ignored" end
          return 200, nil, "body " .. req:body()
        end, { lazy_body = true })
        local c = raw(port)
        -- the handler starts before the body arrives
        c:send("POST /read HTTP/1.1\r\nHost: a\r\nContent-Length: 6\r\n\r\nabc")
        core.sleep(20)
        c:send("def")
        assert.are.equal("body abcdef", assert(c:response()).body)
        -- an unread body is dropped and the connection goes on
        c:send("POST /ignore HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nxyz")
        assert.are.equal("ignored", assert(c:response()).body)
        c:send("POST /read HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nok")
        assert.are.equal("body ok", assert(c:response()).body)
        -- over the handler's own limit: nil, err, then the connection closes
        c:send("POST /small HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\n0123456789")
        local res = assert(c:response())
        assert.are.equal(413, res.status)
        assert.matches("nil request body too large", res.body)
        assert.are.equal("close", res.headers.connection)
        assert.is_true(c:closed())
        c:close()
        srv:close()
      end)
    end)

    it("gives body() nil, err for a malformed chunked body", function()
      core.run(function()
        local got
        local srv, port = serve(function(req)
          got = { req:body() }
          return 400, nil, "bad"
        end, { lazy_body = true })
        local c = raw(port)
        c:send("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")
        assert.are.equal(400, assert(c:response()).status)
        assert.is_true(c:closed())
        assert.is_nil(got[1])
        assert.matches("malformed", got[2])
        c:close()
        srv:close()
      end)
    end)

    it("times out body() and closes after the response", function()
      core.run(function()
        local got
        local srv, port = serve(function(req)
          got = { req:body(nil, 50) }
          return 408, nil, "slow"
        end, { lazy_body = true })
        local c = raw(port)
        c:send("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nabc")
        assert.are.equal(408, assert(c:response()).status)
        assert.is_true(c:closed())
        assert.are.same({ nil, "timeout" }, got)
        c:close()
        srv:close()
      end)
    end)
  end)

  it("serves over a Unix socket", function()
    local dir = tmpdir()
    core.run(function()
      local path = dir .. "/http.sock"
      local l = assert(net.listen { path = path })
      local srv = http.serve(l, function(req) return 200, nil, "unix " .. req.peer end)
      local res = assert(http.request { path = path, target = "/x" })
      assert.are.equal(200, res.status)
      assert.are.equal("unix unix:" .. path, res.body)
      srv:close()
    end)
    fs.rmtree(dir)
  end)

  it("closes: stops accepting, closes idle connections, finishes busy ones", function()
    core.run(function()
      local srv, port = serve(function()
        core.sleep(50)
        return 200, nil, "finished"
      end)
      local idle = raw(port)
      local busy = raw(port)
      core.sleep(5)
      busy:send("GET / HTTP/1.1\r\nHost: a\r\n\r\n")
      core.sleep(5)
      srv:close()
      srv:close()
      assert.is_true(idle:closed())
      local res = assert(busy:response())
      assert.are.equal("finished", res.body)
      assert.are.equal("close", res.headers.connection)
      assert.is_true(busy:closed())
      local s, _, code = net.connect { port = port }
      assert.is_nil(s)
      assert.are.equal("ECONNREFUSED", code)
      idle:close()
      busy:close()
    end)
  end)

  it("drains: waits for in-flight requests, or cuts them at the deadline", function()
    core.run(function()
      local srv, port = serve(function(req)
        core.sleep(req.path == "/slow" and 5000 or 50)
        return 200, nil, "done"
      end)
      local c = raw(port)
      c:send("GET / HTTP/1.1\r\nHost: a\r\n\r\n")
      core.sleep(5)
      local t0 = core.now()
      assert.is_true(srv:drain(2000))
      assert.is_true(core.now() - t0 >= 30)
      local res = assert(c:response())
      assert.are.equal("done", res.body)
      assert.are.equal("close", res.headers.connection)
      assert.is_true(c:closed())
      c:close()
      -- the server closes its side once the client hung up
      local deadline = core.now() + 2000
      while srv:stats().connections_open > 0 and core.now() < deadline do core.sleep(1) end
      assert.are.equal(0, srv:stats().connections_open)

      local srv2, port2 = serve(function(req)
        core.sleep(req.path == "/slow" and 5000 or 50)
        return 200, nil, "done"
      end)
      c = raw(port2)
      c:send("GET /slow HTTP/1.1\r\nHost: a\r\n\r\n")
      core.sleep(5)
      local ok, err = srv2:drain(50)
      assert.is_nil(ok)
      assert.are.equal("timeout", err)
      assert.is_true(c:closed())
      assert.are.equal(0, srv2:stats().connections_open)
      c:close()
    end)
  end)

  it("tells a waiting handler that its client closed, so a long poll need not wait it out", function()
    core.run(function()
      local saw = require("tenement.sync").event()
      local srv, port = serve(function(req)
        local deadline = core.now() + 60000
        while not req.client_closed and core.now() < deadline do core.sleep(10) end
        saw:set(req.client_closed)
        return 200, nil, "too late"
      end)
      local c = raw(port)
      c:send("GET /poll HTTP/1.1\r\nHost: a\r\n\r\n")
      core.sleep(50)
      c:close()
      assert.is_true(saw:wait(5000))
      local deadline = core.now() + 2000
      while srv:stats().connections_open > 0 and core.now() < deadline do core.sleep(5) end
      assert.are.equal(0, srv:stats().connections_open)
      srv:close()
    end)
  end)

  it("cuts: closes every connection at once, ending a drain under way", function()
    core.run(function()
      local srv, port = serve(function()
        core.sleep(5000)
        return 200, nil, "done"
      end)
      local c = raw(port)
      c:send("GET /slow HTTP/1.1\r\nHost: a\r\n\r\n")
      core.sleep(5)
      local drained = require("tenement.sync").event()
      core.spawn(function() drained:set(srv:drain(60000)) end)
      core.sleep(20)
      assert.is_false(drained:is_set()) -- the request holds it
      srv:cut()
      assert.is_true(drained:wait(2000))
      assert.is_true(c:closed())
      assert.are.equal(0, srv:stats().connections_open)
      -- and it stopped accepting
      local s = net.connect { port = port }
      assert.is_nil(s)
      c:close()
    end)
  end)

  it("refuses misuse", function()
    core.run(function()
      local l = assert(net.listen { port = 0 })
      assert.has_error(function() http.serve(l) end)
      assert.has_error(function() http.serve(l, hello, { max_body = -1 }) end)
      assert.has_error(function() http.serve(l, hello, { header_timeout = "soon" }) end)
      local srv = http.serve(l, hello)
      assert.has_error(function() http.serve(l, hello) end, "http.serve: the listener already has a server")
      assert.has_error(function() l:accept() end)
      srv:close()
      assert.has_error(function() http.serve(l, hello) end, "listener is closed")
      assert.has_error(function() http.request { port = 1, target = "/a b" } end)
      assert.has_error(function() http.request { port = 1, headers = { ["a b"] = "x" } } end)
      assert.has_error(function() http.request { port = 1, headers = { x = "a\r\nb" } } end)
      assert.has_error(function() http.request { port = 1, method = "G T" } end)
    end)
    assert.has_error(function() http.request { port = 1 } end)
  end)

  it("leaves no task behind", function()
    -- (a handler cut off by an earlier drain may still be sleeping: count from here)
    local before = core.tasks()
    core.run(function()
      local srv, port = serve(hello)
      for _ = 1, 20 do
        local res = assert(http.request { port = port, target = "/t" })
        assert.are.equal("hello /t", res.body)
      end
      assert.is_true(srv:drain(1000))
    end)
    collectgarbage()
    assert.are.equal(before, core.tasks())
  end)

  describe("streamed responses", function()
    it("send the body chunked as it is written, and end it on finish", function()
      core.run(function()
        local srv, port = serve(function(req)
          local out = assert(req:stream(200, { ["content-type"] = "text/plain" }))
          out:write("one ")
          core.sleep(5)
          out:write("two")
          out:finish()
        end)
        local c = support.raw(port)
        c:send("GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        local res = assert(c:response())
        assert.are.equal("chunked", res.framing)
        assert.are.equal("one two", res.body)
        assert.is_true(c:closed())
        c:close()
        srv:close()
      end)
    end)

    it("answer HEAD with the head alone, and tell the producer nobody takes the body", function()
      core.run(function()
        local wrote
        local srv, port = serve(function(req)
          local out = assert(req:stream(200, { ["content-type"] = "text/plain" }))
          wrote = table.pack(out:write("never sent"))
          assert(out:finish())
        end)
        local c = support.raw(port)
        c:send("HEAD / HTTP/1.1\r\nHost: a\r\n\r\n")
        local res = assert(c:response { head = true })
        assert.are.equal(200, res.status)
        assert.are.equal("chunked", res.headers["transfer-encoding"])
        assert.is_true(c:closed())
        assert.are.equal("", c.buf)
        assert.are.same({ n = 2, nil, "closed" }, wrote)
        c:close()
        srv:close()
      end)
    end)

    it("close the connection without the last chunk when the handler ends or fails before finish", function()
      local failures = {}
      core.run(function()
        local srv, port = serve(function(req)
          local out = assert(req:stream(200))
          out:write("partial")
          if req.path == "/fail" then error("broke mid-stream") end
        end, { on_error = function(msg) failures[#failures + 1] = msg end })
        for _, path in ipairs { "/return", "/fail" } do
          local c = support.raw(port)
          c:send("GET " .. path .. " HTTP/1.1\r\nHost: a\r\n\r\n")
          local head = assert(c:response { head = true })
          assert.are.equal(200, head.status)
          -- the one chunk, then the end of the connection and no "0" chunk
          assert.are.equal("7\r\npartial\r\n", c:take(12))
          assert.is_true(c:closed())
          assert.are.equal("", c.buf)
          c:close()
        end
        assert.are.equal(1, #failures)
        assert.matches("GET /fail: .*broke mid%-stream", failures[1])
        srv:close()
      end)
    end)

    it("reset an HTTP/1.0 client when the handler ends before finish: its body ends at the close", function()
      core.run(function()
        local srv, port = serve(function(req)
          local out = assert(req:stream(200))
          out:write("partial")
          if req.path == "/finish" then out:finish() end
        end)
        -- a FIN would end the body here and pass "partial" as all of it
        local got, ending = support.read_to_end(port, "GET /return HTTP/1.0\r\n\r\n")
        assert.matches("^HTTP/1%.1 200 ", got)
        assert.are.equal("Connection reset by peer", ending)
        -- a finished one ends with the close, as always
        local c = support.raw(port)
        c:send("GET /finish HTTP/1.0\r\n\r\n")
        local res = assert(c:response())
        assert.are.equal("eof", res.framing)
        assert.are.equal("partial", res.body)
        c:close()
        srv:close()
      end)
    end)
  end)
end)

describe("core.http client", function()
  local dir, backend
  setup(function()
    dir = tmpdir()
    core.run(function()
      backend = start_backend(dir, { INSTANCE_ID = "b-1", BACKEND_TCP = "1", PORT = "0" })
    end)
  end)
  teardown(function()
    stop_backend(backend)
    fs.rmtree(dir)
  end)

  it("gets from the backend over a Unix socket and over TCP", function()
    core.run(function()
      local res = assert(http.request { path = backend.path, target = "/health", timeout = 2000 })
      assert.are.equal(200, res.status)
      assert.are.equal("OK", res.reason)
      assert.are.equal("ok", res.body)
      assert.are.equal("b-1", res.headers["x-backend"])
      assert.are.equal("1.1", res.version)
      res = assert(http.request { host = "127.0.0.1", port = backend.port, target = "/" })
      assert.are.equal("hello from b-1\n", res.body)
      res = assert(http.request { path = backend.path, target = "/nope" })
      assert.are.equal(404, res.status)
    end)
  end)

  it("sends bodies with a length or chunked, and headers as given", function()
    core.run(function()
      local res = assert(http.request {
        path = backend.path, method = "POST", target = "/echo?q=1",
        headers = { ["X-Test"] = "one", ["Content-Type"] = "text/plain" }, body = "payload",
      })
      assert.are.equal(200, res.status)
      assert.matches("^POST /echo%?q=1 HTTP/1%.1\r\n", res.body)
      assert.matches("\r\nX%-Test: one\r\n", res.body)
      assert.matches("\r\nHost: localhost\r\n", res.body)
      assert.matches("\r\nContent%-Length: 7\r\n", res.body)
      assert.matches("\r\nConnection: close\r\n", res.body)
      assert.matches("\r\n\r\npayload$", res.body)

      res = assert(http.request {
        path = backend.path, method = "PUT", target = "/echo", body = { "chunk one, ", "chunk two" },
        headers = { { "X-Dup", "1" }, { "X-Dup", "2" } },
      })
      assert.matches("\r\nTransfer%-Encoding: chunked\r\n", res.body)
      assert.matches("\r\nX%-Dup: 1\r\nX%-Dup: 2\r\n", res.body)
      assert.matches("\r\n\r\nchunk one, chunk two$", res.body)

      res = assert(http.request {
        port = backend.port, method = "POST", target = "/echo", body = "as chunks",
        headers = { ["Transfer-Encoding"] = "chunked", Host = "custom.test" },
      })
      assert.matches("\r\nHost: custom.test\r\n", res.body)
      assert.matches("\r\n\r\nas chunks$", res.body)
    end)
  end)

  it("reads chunked response bodies", function()
    core.run(function()
      local res = assert(http.request { path = backend.path, target = "/chunked?n=3" })
      assert.are.equal("chunked", res.headers["transfer-encoding"])
      assert.are.equal("chunk 1\nchunk 2\nchunk 3\n", res.body)
    end)
  end)

  it("times out against a server that never answers", function()
    core.run(function()
      local t0 = core.now()
      local res, err = http.request { path = backend.path, target = "/hang", timeout = 100 }
      assert.is_nil(res)
      assert.are.equal("timeout", err)
      assert.is_true(core.now() - t0 >= 90)
      -- the backend is still fine
      assert.are.equal(200, assert(http.request { path = backend.path, target = "/health" }).status)
      res = assert(http.request { path = backend.path, target = "/sleep?ms=30", timeout = 2000 })
      assert.are.equal("slept 30 ms\n", res.body)
    end)
  end)

  it("fails clearly on a missing socket or a refused port", function()
    core.run(function()
      local path = dir .. "/nobody.sock"
      local res, err, code = http.request { path = path }
      assert.is_nil(res)
      assert.are.equal("ENOENT", code)
      assert.are.equal("connect " .. path .. ": ENOENT: no such file or directory", err)
      local l = assert(net.listen { port = 0 })
      local port = l:port()
      l:close()
      res, err, code = http.request { port = port }
      assert.is_nil(res)
      assert.are.equal("ECONNREFUSED", code)
      assert.matches("connect 127%.0%.0%.1:" .. port, err)
    end)
  end)

  it("limits the response body", function()
    core.run(function()
      local res, err, code = http.request { path = backend.path, target = "/chunked?n=100", max_body = 50 }
      assert.is_nil(res)
      assert.are.equal("E2BIG", code)
      assert.matches("too large", err)
    end)
  end)
end)

describe("core.http client against raw peers", function()
  -- A one-shot peer that answers any request with `reply` and then closes.
  local function peer(reply)
    local l = assert(net.listen { port = 0 })
    core.spawn(function()
      local s = l:accept(2000)
      if not s then return end
      local got = ""
      while not got:find("\r\n\r\n", 1, true) do
        local chunk = s:read(2000)
        if not chunk then break end
        got = got .. chunk
      end
      s:write(reply)
      s:close()
      l:close()
    end)
    return l:port()
  end

  it("reads a body delimited by the end of the connection", function()
    core.run(function()
      local port = peer("HTTP/1.1 200 OK\r\nX-Kind: eof\r\n\r\nuntil the very end")
      local res = assert(http.request { port = port })
      assert.are.equal("until the very end", res.body)
      assert.are.equal("eof", res.headers["x-kind"])
    end)
  end)

  it("skips interim responses", function()
    core.run(function()
      local port = peer("HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" ..
        "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
      local res = assert(http.request { port = port })
      assert.are.equal(200, res.status)
      assert.are.equal("ok", res.body)
    end)
  end)

  it("fails on a truncated body or a malformed response", function()
    core.run(function()
      local port = peer("HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort")
      local res, err, code = http.request { port = port }
      assert.is_nil(res)
      assert.are.equal("ECONNRESET", code)
      assert.matches("closed before the response ended", err)

      port = peer("HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab")
      res, err, code = http.request { port = port }
      assert.is_nil(res)
      assert.are.equal("EPROTO", code)
      assert.matches("Content%-Length", err)

      port = peer("SMTP ready\r\n\r\n")
      res, err, code = http.request { port = port }
      assert.is_nil(res)
      assert.are.equal("EPROTO", code)
    end)
  end)

  it("gets no body for HEAD, against our own server", function()
    core.run(function()
      local srv, port = serve(function() return 200, nil, "a body of 20 bytes!!" end)
      local res = assert(http.request { port = port, method = "HEAD" })
      assert.are.equal("20", res.headers["content-length"])
      assert.are.equal("", res.body)
      res = assert(http.request { port = port, method = "POST", body = { "a", "b", "c" } })
      assert.are.equal("a body of 20 bytes!!", res.body)
      srv:close()
    end)
  end)
end)

describe("the backend fixture", function()
  local dir
  before_each(function() dir = tmpdir() end)
  after_each(function() fs.rmtree(dir) end)

  it("exits 3 on /crash and 0 on SIGTERM, removing its socket", function()
    core.run(function()
      local b = start_backend(dir, {}, "crash")
      assert.are.equal("listening on " .. b.path, b.line)
      local res, _, code = http.request { path = b.path, target = "/crash" }
      assert.is_nil(res)
      assert.are.equal("ECONNRESET", code)
      assert.are.equal(3, exit_code(b))

      local t = start_backend(dir, { INSTANCE_ID = "t" }, "term")
      assert(fs.stat(t.path))
      os.execute("kill -TERM " .. t.pid)
      assert.are.equal(0, exit_code(t))
      assert.is_nil(fs.stat(t.path))
    end)
  end)

  it("follows its knobs", function()
    core.run(function()
      local b = start_backend(dir, { BACKEND_FAIL_HEALTH_AFTER = "1", INSTANCE_ID = "knobs" }, "health")
      assert.are.equal(200, assert(http.request { path = b.path, target = "/health" }).status)
      assert.are.equal(500, assert(http.request { path = b.path, target = "/health" }).status)
      local env = assert(http.request { path = b.path, target = "/env" }).body
      assert.matches("INSTANCE_ID=knobs\n", env)
      assert.are.equal("leaked 4 MB\n", assert(http.request { path = b.path, target = "/leak?mb=4" }).body)
      assert.are.equal("flooded 3 lines\n", assert(http.request { path = b.path, target = "/flood?lines=3" }).body)
      assert.matches("flood knobs line 3\n", fs.read(b.out))
      stop_backend(b)

      local h = start_backend(dir, { BACKEND_HEALTH_STATUS = "503" }, "status")
      assert.are.equal(503, assert(http.request { path = h.path, target = "/health" }).status)
      stop_backend(h)

      assert.are.equal(7, select(3, os.execute("env BACKEND_EXIT_AT_ONCE=7 " .. BACKEND)))

      local t0 = core.now()
      local d = start_backend(dir, { BACKEND_START_DELAY_MS = "100" }, "delay")
      assert.is_true(core.now() - t0 >= 90)
      stop_backend(d)

      local n = start_backend(dir, { BACKEND_NO_SOCKET = "1" }, "nosock", true)
      core.sleep(50)
      assert.is_nil(fs.stat(n.path))
      assert.is_nil(exit_code(n, 10))
      stop_backend(n)

      local i = start_backend(dir, { BACKEND_IGNORE_TERM = "1" }, "stubborn")
      os.execute("kill -TERM " .. i.pid)
      assert.is_nil(exit_code(i, 100))
      assert.are.equal(200, assert(http.request { path = i.path, target = "/health" }).status)
      stop_backend(i)
      assert.are.equal(137, exit_code(i))
    end)
  end)

  it("keeps connections alive and answers pipelined requests", function()
    core.run(function()
      local b = start_backend(dir, {}, "keep")
      local c = raw(b.path)
      c:send("GET /health HTTP/1.1\r\nHost: a\r\n\r\nGET /sleep?ms=20 HTTP/1.1\r\nHost: a\r\n\r\n" ..
        "GET / HTTP/1.1\r\nHost: a\r\n\r\n")
      assert.are.equal("ok", assert(c:response()).body)
      assert.are.equal("slept 20 ms\n", assert(c:response()).body)
      assert.are.equal("hello from backend\n", assert(c:response()).body)
      c:close()
      stop_backend(b)
    end)
  end)
end)

-- Plain heads are read by the lean parser (c/head.c), every other one by
-- llhttp; nothing a handler or a client sees may tell which.
describe("core.http's two head parsers", function()
  it("agree: the lean one takes only heads llhttp reads the same way (spec/fixtures/headcheck.c)", function()
    local seed = os.time()
    local code, out, err = support.run(support.fixture("headcheck") .. " 2000000 " .. seed)
    assert.are.equal(0, code, "seed " .. seed .. ": " .. err)
    local plain, took, left = out:match("(%d+) plain heads taken; of 2000000 mutated ones the lean parser took (%d+), " ..
      "llhttp agreeing on each, and left (%d+) to llhttp")
    assert.is_truthy(plain, out)
    -- both sides of the comparison are exercised
    assert.is_true(tonumber(took) > 100000, out)
    assert.is_true(tonumber(left) > 100000, out)
  end)

  it("give a handler the same request whichever read the head", function()
    core.run(function()
      local srv, port = serve(function(req)
        local names = {}
        for k in pairs(req.headers) do names[#names + 1] = k end
        table.sort(names)
        local shown = {}
        for _, k in ipairs(names) do shown[#shown + 1] = k .. "=[" .. req.headers[k] .. "]" end
        return 200, { ["Content-Type"] = "text/plain" },
          table.concat({ req.method, req.target, req.version, table.concat(shown, " ") }, "|")
      end)
      local heads = {
        "GET /a/b?c=d%20e HTTP/1.1\r\nHost: h\r\nX-Dup: 1\r\nx-dup: 2\r\nX-Sp:  \t v w \t\r\nX-Empty:\r\n\r\n",
        "OPTIONS /o HTTP/1.1\r\nHost: h\r\nCookie: a=1\r\nCookie: b=2\r\nContent-Length: 0\r\n\r\n",
        "DELETE /d HTTP/1.1\r\nHost: h\r\nConnection: keep-alive\r\n\r\n",
        "PUT /h HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n",
        "PATCH /p HTTP/1.1\r\nHost: h\r\nCONNECTION: close\r\n\r\n",
      }
      local seen = {}
      for _, split in ipairs { false, true } do
        local c = raw(port)
        for i, head in ipairs(heads) do
          if split then
            -- the first read ends inside the head: llhttp reads it
            local cut = #head // 2
            c:send(head:sub(1, cut))
            core.sleep(20)
            c:send(head:sub(cut + 1))
          else
            c:send(head)
          end
          local res = assert(c:response())
          assert.are.equal(200, res.status)
          if split then assert.are.equal(seen[i], res.body) else seen[i] = res.body end
        end
        -- the last one asked to close: the connection ends after it
        assert.is_nil(c:response())
        c:close()
      end
      assert.are.equal("GET|/a/b?c=d%20e|1.1|host=[h] x-dup=[1, 2] x-empty=[] x-sp=[v w]", seen[1])
      assert.are.equal("OPTIONS|/o|1.1|content-length=[0] cookie=[a=1; b=2] host=[h]", seen[2])
      assert.are.equal("PUT|/h|1.0|connection=[Keep-Alive]", seen[4])
      srv:close()
    end)
  end)
end)
