local json = require "tenement.json"

describe("json.encode", function()
  it("writes a float in the shortest form that reads back as the same double", function()
    assert.are.equal("0.1", json.encode(0.1))
    assert.are.equal("1763859612.123", json.encode(1763859612.123))
    assert.are.equal("0.30000000000000004", json.encode(0.1 + 0.2))
    assert.are.equal("3", json.encode(3.0))
    assert.are.equal("-2.5e-07", json.encode(-2.5e-7))
    assert.are.equal("42", json.encode(42))
  end)

  it("reads back every float it writes as the same double", function()
    math.randomseed(7)
    for _ = 1, 20000 do
      local v = (math.random() - 0.5) * 10 ^ math.random(-30, 30)
      local text = json.encode(v)
      assert.are.equal(v, tonumber(text), text)
      assert.is_true(#text <= 24, text)
    end
  end)

  it("writes what JSON cannot hold as null", function()
    assert.are.equal("[null,null,null]", json.encode(json.array { 0 / 0, math.huge, -math.huge }))
  end)
end)
