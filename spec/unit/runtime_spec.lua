local runtime = require "tenement.runtime"

describe("runtime.get", function()
  it("refuses the levels that are accepted in the file but not available yet, clearly", function()
    for _, level in ipairs { "firecracker", "qemu", "wasm" } do
      local driver, err = runtime.get(level)
      assert.is_nil(driver)
      assert.matches("not available yet", err, 1, true)
      assert.matches('isolation = "namespace" (or "sandbox")', err, 1, true)
    end
  end)

  it("names an unknown level", function()
    local driver, err = runtime.get("chroot")
    assert.is_nil(driver)
    assert.matches('unknown isolation level "chroot"', err, 1, true)
  end)

  it("gives the process driver, which spawns with the instance's credentials", function()
    local driver = assert(runtime.get("process"))
    local spec = driver.prepare { argv = { "/bin/true" }, env = {}, user = { uid = 65534, gid = 65534 },
      rlimits = { nofile = 1024 } }
    assert.are.same({ "/bin/true" }, spec.argv)
    assert.are.equal(65534, spec.uid)
    assert.are.equal(65534, spec.gid)
    assert.are.same({}, spec.groups)
    assert.is_true(spec.no_new_privs)
    assert.are.same({ nofile = 1024 }, spec.rlimits)
    assert.are.equal("SIGKILL", spec.pdeathsig)
  end)
end)
