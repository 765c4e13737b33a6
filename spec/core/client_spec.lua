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
