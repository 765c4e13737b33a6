-- The example service of config/tenement.toml: a tiny HTTP app on the Unix
-- socket tenement gives it ($SOCKET_PATH), written with tenement's own core.
local core = require "tenement.core"

local socket = assert(os.getenv("SOCKET_PATH"), "SOCKET_PATH is not set: run me under ten serve")
local id = os.getenv("INSTANCE_ID") or "?"
local started = os.time()

core.run(function()
  local listener = assert(core.net.listen { path = socket })
  core.http.serve(listener, function(req)
    if req.path == "/health" then
      return 200, { ["content-type"] = "text/plain" }, "ok\n"
    end
    io.stdout:write(string.format("%s %s\n", req.method, req.target))
    io.stdout:flush()
    return 200, { ["content-type"] = "text/plain" },
      string.format("hello from %s (up %d s)\n", id, os.time() - started)
  end)
  print("listening on " .. socket)
  io.stdout:flush()
  local term = core.signal("SIGTERM")
  term:wait()
  os.remove(socket)
end)
