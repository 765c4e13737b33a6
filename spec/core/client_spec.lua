-- The client `ten` commands use, against real sockets.
local support = require "support"
local core = require "tenement.core"
local client = require "tenement.client"

describe("client", function()
  after_each(support.cleanup)

  it("says of a server that does not answer in time that it goes on, and where to look", function()
    local path = support.tmpdir() .. "/ten.sock"
    core.run(function()
      -- accepts, reads, never answers: a server busy with a long stop
      local l = assert(core.net.listen { path = path })
      local held = {}
      core.spawn(function()
        local conn = l:accept()
        held[#held + 1] = conn
        conn:read(5000)
      end)
      local c = assert(client.new { socket = path })
      local status, err, why = c:request("DELETE", "/api/instances/api:x", nil, 1000)
      assert.is_nil(status)
      assert.are.equal("timeout", why)
      assert.are.equal("no answer within 1 s; the server goes on with it, and `ten ps` shows how it stands", err)
      for _, conn in ipairs(held) do conn:close() end
      l:close()
    end)
  end)

  it("takes a server's address or localhost, and says names are not looked up", function()
    assert.is_table(client.new { server = "http://127.0.0.1:8080" })
    assert.is_table(client.new { server = "http://[::1]:8080" })
    assert.is_table(client.new { server = "http://localhost:8080" })
    local c, err = client.new { server = "http://example.test:8080" }
    assert.is_nil(c)
    assert.are.equal("--server http://example.test:8080: give the server's IP address (http://203.0.113.5:8080) or "
      .. "localhost: names are not looked up", err)
  end)

  -- what answered was not the API (a site, a proxy in front): say what it said
  it("gives the status and first line of an answer that is not JSON", function()
    core.run(function()
      local l = assert(core.net.listen { port = 0 })
      local srv = core.http.serve(l, function()
        return 404, { ["content-type"] = "text/plain" }, "no site localhost here\nmore\n"
      end)
      local c = assert(client.new { server = "http://127.0.0.1:" .. l:port() })
      local status, err = c:request("GET", "/api/instances")
      assert.is_nil(status)
      assert.are.equal("the server answered 404 with something that is not JSON (expected value but found invalid "
        .. "token at character 1): no site localhost here", err)
      srv:close()
    end)
  end)

  it("tells a missing server apart", function()
    local path = support.tmpdir() .. "/ten.sock"
    core.run(function()
      local c = assert(client.new { socket = path })
      local status, err, why = c:request("GET", "/api/instances")
      assert.is_nil(status)
      assert.are.equal("unreachable", why)
      assert.matches("no ten server is running for this data directory", err, 1, true)
    end)
  end)
end)
