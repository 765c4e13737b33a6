local router = require "tenement.router"

local view = {
  domain = "example.com",
  services = { api = true, web = true, admin = true },
  routing = { subdomain = { console = "admin" }, path = {} },
}

local function route(host, path, v)
  return router.route({ method = "GET", host = host, path = path or "/", headers = {} }, v or view)
end

describe("router.route", function()
  it("sends id.service.domain to that instance", function()
    assert.are.same({ kind = "instance", service = "api", id = "user123", by_host = true }, route("user123.api.example.com"))
  end)

  it("sends service.domain to the service", function()
    assert.are.same({ kind = "service", service = "api", by_host = true }, route("api.example.com"))
  end)

  it("sends the bare domain to the server's own pages", function()
    assert.are.same({ kind = "self" }, route("example.com", "/"))
    assert.are.same({ kind = "self" }, route("example.com", "/api/instances"))
  end)

  it("sends an IP address host, or localhost, to the server's own pages", function()
    assert.are.same({ kind = "self" }, route("127.0.0.1:8080", "/api/instances"))
    assert.are.same({ kind = "self" }, route("[::1]:8080", "/health"))
    -- ten --server http://localhost:PORT (an SSH tunnel, say)
    assert.are.same({ kind = "self" }, route("localhost:8080", "/api/instances"))
  end)

  it("ignores case and the port, and a trailing dot", function()
    assert.are.same({ kind = "instance", service = "api", id = "prod", by_host = true }, route("PROD.Api.Example.COM:8080"))
    assert.are.same({ kind = "service", service = "web", by_host = true }, route("web.example.com."))
  end)

  it("rejects hosts that are not valid names with 400", function()
    for _, h in ipairs { "", "exa mple.com", "a..example.com", "-a.example.com", "a_b.example.com",
      "x.example.com:99999", "x.example.com:abc", ("a"):rep(64) .. ".example.com" } do
      local t = route(h)
      assert.are.equal("status", t.kind, h)
      assert.are.equal(400, t.status, h)
    end
    assert.are.equal(400, router.route({ path = "/" }, view).status)
  end)

  it("rejects an IPv6 literal with anything but a port after it", function()
    for _, h in ipairs { "[::1]junk", "[::1].example.com", "[::1]:", "[::1]:99999", "[::1]:80x", "[::1]]" } do
      local t = route(h)
      assert.are.equal("status", t.kind, h)
      assert.are.equal(400, t.status, h)
    end
    assert.are.same({ kind = "self" }, route("[2001:DB8::1]:8080", "/health"))
  end)

  it("answers 404 for other domains, unknown services and deeper names", function()
    assert.are.equal(404, route("evil.com").status)
    assert.are.equal(404, route("notexample.com").status)
    assert.are.equal(404, route("nope.example.com").status)
    assert.are.equal(404, route("a.nope.example.com").status)
    assert.are.equal(404, route("a.b.api.example.com").status)
  end)

  it("maps subdomains", function()
    assert.are.same({ kind = "service", service = "admin", by_host = true }, route("console.example.com"))
    assert.are.same({ kind = "instance", service = "admin", id = "x", by_host = true }, route("x.console.example.com"))
  end)

  it("maps path prefixes on the bare domain, longest first, on segment boundaries", function()
    local v = { domain = "example.com", services = view.services, routing = {
      subdomain = {}, path = { { prefix = "/api/v2", service = "web" }, { prefix = "/api", service = "api" } } } }
    assert.are.same({ kind = "service", service = "web" }, route("example.com", "/api/v2/x", v))
    assert.are.same({ kind = "service", service = "api" }, route("example.com", "/api/v1", v))
    assert.are.same({ kind = "service", service = "api" }, route("example.com", "/api", v))
    assert.are.same({ kind = "self" }, route("example.com", "/apix", v))
  end)

  it("matches path prefixes on the path as the instance will read it: unreserved escapes decoded, dot segments gone", function()
    local v = { domain = "example.com", services = view.services, routing = {
      subdomain = {}, path = { { prefix = "/shop", service = "web" }, { prefix = "/api", service = "api" } } } }
    assert.are.same({ kind = "service", service = "web" }, route("example.com", "/%73hop/cart", v))
    assert.are.same({ kind = "service", service = "web" }, route("example.com", "/sh%6Fp", v))
    assert.are.same({ kind = "service", service = "api" }, route("example.com", "/shop/../api/x", v))
    assert.are.same({ kind = "service", service = "web" }, route("example.com", "/api/../shop", v))
    assert.are.same({ kind = "service", service = "api" }, route("example.com", "/shop/%2e%2E/api", v))
    assert.are.same({ kind = "service", service = "web" }, route("example.com", "/x/../../shop", v))
    assert.are.same({ kind = "service", service = "web" }, route("example.com", "/./shop", v))
    -- an escaped "/" is data, not a separator
    assert.are.same({ kind = "self" }, route("example.com", "/%2Fshop", v))
    assert.are.same({ kind = "self" }, route("example.com", "/shopx/../x", v))
    -- a prefix written with escapes is read the same way
    local escaped = { domain = "example.com", services = view.services, routing = {
      subdomain = {}, path = { { prefix = "/%73hop", service = "web" }, { prefix = "/.well-known", service = "api" } } } }
    assert.are.same({ kind = "service", service = "web" }, route("example.com", "/shop/x", escaped))
    assert.are.same({ kind = "service", service = "web" }, route("example.com", "/%73hop/x", escaped))
    assert.are.same({ kind = "service", service = "api" }, route("example.com", "/.well-known/acme", escaped))
  end)

  it("sends the bare domain to the default service, but keeps the server's own paths", function()
    local v = { domain = "example.com", services = view.services, routing = { default = "web", subdomain = {}, path = {} } }
    assert.are.same({ kind = "service", service = "web" }, route("example.com", "/", v))
    assert.are.same({ kind = "service", service = "web" }, route("example.com", "/about", v))
    assert.are.same({ kind = "self" }, route("example.com", "/api/instances", v))
    assert.are.same({ kind = "self" }, route("example.com", "/health", v))
    assert.are.same({ kind = "self" }, route("example.com", "/metrics", v))
    assert.are.same({ kind = "service", service = "web" }, route("example.com", "/healthy", v))
    -- the server's own pages read the path as sent: an escaped one is not theirs
    assert.are.same({ kind = "service", service = "web" }, route("example.com", "/%61pi/instances", v))
  end)
end)

describe("router.pick", function()
  local function seq(values)
    local i = 0
    return function(n) i = i + 1 assert(values[i] <= n) return values[i] end
  end

  -- draws: { {n, key} }: the random number n picks key
  local function assert_draws(c, draws)
    for _, d in ipairs(draws) do assert.are.equal(d[2], router.pick(c, seq { d[1] }).key, "draw " .. d[1]) end
  end

  it("chooses among running instances by weight", function()
    local c = { { key = "a", state = "running", weight = 90 }, { key = "b", state = "running", weight = 10 } }
    assert_draws(c, { { 1, "a" }, { 90, "a" }, { 91, "b" }, { 100, "b" } })
  end)

  it("gives weight 0 and unhealthy instances no traffic", function()
    local c = { { key = "a", state = "running", weight = 0 }, { key = "b", state = "unhealthy", weight = 50 },
      { key = "c", state = "running", weight = 5 } }
    for i = 1, 5 do assert.are.equal("c", router.pick(c, seq { i }).key) end
  end)

  it("draws by weight among running, starting and sleeping instances: weights hold while some sleep", function()
    local c = { { key = "prod", state = "sleeping", weight = 100 }, { key = "canary", state = "running", weight = 10 },
      { key = "next", state = "starting", weight = 20 }, { key = "broken", state = "failed", weight = 100 },
      { key = "off", state = "stopped", weight = 100 } }
    assert_draws(c, { { 1, "prod" }, { 100, "prod" }, { 101, "canary" }, { 110, "canary" }, { 130, "next" } })
  end)

  it("draws one going to sleep or restarting when none runs, starts or sleeps, never one an operator stops", function()
    local c = { { key = "a", state = "stopping", weight = 10 }, { key = "b", state = "backoff", weight = 30 },
      { key = "c", state = "stopped", weight = 100 }, { key = "d", state = "failed", weight = 100 } }
    assert_draws(c, { { 1, "a" }, { 10, "a" }, { 11, "b" }, { 40, "b" } })
    c[2].held = true -- ten stop: stopping too, but for good
    assert_draws(c, { { 1, "a" }, { 10, "a" } })
    -- one that takes requests now comes first
    c[3].state = "sleeping"
    assert_draws(c, { { 1, "c" }, { 100, "c" } })
  end)

  it("starts the stopped instance with the highest weight when nothing else can serve, unless an operator holds it", function()
    local c = { { key = "a", state = "stopped", weight = 10 }, { key = "b", state = "stopped", weight = 60 },
      { key = "c", state = "failed", weight = 100 } }
    assert.are.equal("b", router.pick(c, seq {}).key)
    c[2].held = true
    assert.are.equal("a", router.pick(c, seq {}).key)
    c[1].held = true
    assert.is_nil(router.pick(c, seq {}))
  end)

  it("returns nothing when nothing can serve", function()
    assert.is_nil(router.pick({ { key = "a", state = "failed", weight = 100 } }, seq {}))
    assert.is_nil(router.pick({}, seq {}))
  end)

  it("spreads traffic in proportion to weights", function()
    local c = { { key = "a", state = "running", weight = 75 }, { key = "b", state = "running", weight = 25 } }
    local counts = { a = 0, b = 0 }
    math.randomseed(42)
    for _ = 1, 10000 do
      local p = router.pick(c, function(n) return math.random(n) end)
      counts[p.key] = counts[p.key] + 1
    end
    assert.is_true(counts.a > 7200 and counts.a < 7800, tostring(counts.a))
  end)
end)
