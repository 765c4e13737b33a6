-- core.crypto: hashes, MACs, randomness, constant-time compare, encodings.
local core = require "tenement.core"
local crypto = core.crypto

local hex, unhex = crypto.hex, crypto.unhex

local function bytes(from, to)
  local t = {}
  for i = from, to do t[#t + 1] = string.char(i) end
  return table.concat(t)
end

describe("core.crypto", function()
  describe("sha256", function()
    it("matches the FIPS 180-2 test vectors", function()
      assert.are.equal("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        hex(crypto.sha256("")))
      assert.are.equal("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
        hex(crypto.sha256("abc")))
      assert.are.equal("248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1",
        hex(crypto.sha256("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq")))
      assert.are.equal("cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0",
        hex(crypto.sha256(string.rep("a", 1000000))))
    end)

    it("returns 32 raw bytes and hashes embedded NULs", function()
      assert.are.equal(32, #crypto.sha256("x"))
      assert.are_not.equal(crypto.sha256("a\0b"), crypto.sha256("a\0c"))
      assert.has_error(function() crypto.sha256() end)
      assert.has_error(function() crypto.sha256({}) end)
    end)
  end)

  describe("hmac_sha256", function()
    -- RFC 4231, test cases 1-4, 6 and 7 (5 is a truncated output)
    local cases = {
      { string.rep("\x0b", 20), "Hi There",
        "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7" },
      { "Jefe", "what do ya want for nothing?",
        "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843" },
      { string.rep("\xaa", 20), string.rep("\xdd", 50),
        "773ea91e36800e46854db8ebd09181a72959098b3ef8c122d9635514ced565fe" },
      { bytes(1, 25), string.rep("\xcd", 50),
        "82558a389a443c0ea4cc819899f2083a85f0faa3e578f8077a2e3ff46729665b" },
      { string.rep("\xaa", 131), "Test Using Larger Than Block-Size Key - Hash Key First",
        "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54" },
      { string.rep("\xaa", 131), "This is a test using a larger than block-size key and a larger "
        .. "than block-size data. The key needs to be hashed before being used by the HMAC algorithm.",
        "9b09ffa71b942fcb27635fbcd5b0e944bfdc63644f0713938a7f51535c3a35e2" },
    }
    for i, c in ipairs(cases) do
      it("matches RFC 4231 test case " .. (i <= 4 and i or i + 1), function()
        local mac = crypto.hmac_sha256(c[1], c[2])
        assert.are.equal(32, #mac)
        assert.are.equal(c[3], hex(mac))
      end)
    end

    it("takes empty keys and data, and raises without them", function()
      assert.are.equal("b613679a0814d9ec772f95d778c35fc5ff1697c493715653c6c712144292c5ad",
        hex(crypto.hmac_sha256("", "")))
      assert.has_error(function() crypto.hmac_sha256("key") end)
      assert.has_error(function() crypto.hmac_sha256(nil, "data") end)
    end)
  end)

  describe("random", function()
    it("returns exactly n bytes", function()
      assert.are.equal("", crypto.random(0))
      for _, n in ipairs({ 1, 2, 16, 32, 33, 1000, 65536 }) do
        assert.are.equal(n, #crypto.random(n))
      end
    end)

    it("never repeats and covers every byte value", function()
      local seen = {}
      for _ = 1, 2000 do
        local r = crypto.random(16)
        assert.is_nil(seen[r])
        seen[r] = true
      end
      local counts = {}
      for byte in crypto.random(65536):gmatch(".") do counts[byte] = true end
      local distinct = 0
      for _ in pairs(counts) do distinct = distinct + 1 end
      assert.are.equal(256, distinct)
    end)

    it("raises on a bad length", function()
      assert.has_error(function() crypto.random(-1) end)
      assert.has_error(function() crypto.random(1.5) end)
      assert.has_error(function() crypto.random("many") end)
      assert.has_error(function() crypto.random() end)
    end)
  end)

  describe("equal", function()
    it("compares contents", function()
      assert.is_true(crypto.equal("", ""))
      assert.is_true(crypto.equal("secret-token", "secret-token"))
      assert.is_true(crypto.equal("a\0b", "a\0b"))
      assert.is_false(crypto.equal("secret-token", "secret-tokeN"))
      assert.is_false(crypto.equal("Secret-token", "secret-token"))
      assert.is_false(crypto.equal("a\0b", "a\0c"))
      local r = crypto.random(32)
      assert.is_true(crypto.equal(r, r .. ""))
      assert.is_false(crypto.equal(r, crypto.random(32)))
    end)

    it("is false for different lengths, prefixes included", function()
      assert.is_false(crypto.equal("abc", "abcd"))
      assert.is_false(crypto.equal("abcd", "abc"))
      assert.is_false(crypto.equal("", "a"))
      assert.is_false(crypto.equal("a\0", "a"))
    end)

    it("raises on non-strings", function()
      assert.has_error(function() crypto.equal(nil, "a") end)
      assert.has_error(function() crypto.equal("a") end)
      assert.has_error(function() crypto.equal({}, {}) end)
    end)
  end)

  describe("hex", function()
    it("encodes lowercase and decodes either case", function()
      assert.are.equal("", hex(""))
      assert.are.equal("00ff10ab", hex("\0\255\16\171"))
      local all = bytes(0, 255)
      assert.are.equal(512, #hex(all))
      assert.is_nil(hex(all):find("[^0-9a-f]"))
      assert.are.equal(all, unhex(hex(all)))
      assert.are.equal("\171\205\239", unhex("ABcdEF"))
      assert.are.equal("", unhex(""))
    end)

    it("returns nil, err on bad input", function()
      assert.are.same({ nil, "unhex: odd number of digits (3)" }, { unhex("abc") })
      assert.are.same({ nil, "unhex: invalid character at position 2" }, { unhex("0g") })
      assert.is_nil((unhex(" 00")))
      assert.is_nil((unhex("0x00")))
      assert.is_nil((unhex("00\0")))
    end)
  end)

  describe("base64url", function()
    it("round-trips every length from 0 to 64 and every byte value", function()
      for n = 0, 64 do
        local raw = crypto.random(n)
        local s = crypto.base64url(raw)
        assert.are.equal((4 * n + 2) // 3, #s, "length " .. n)
        assert.is_nil(s:find("[^A-Za-z0-9_-]"))
        assert.are.equal(raw, crypto.unbase64url(s))
      end
      local all = bytes(0, 255)
      assert.are.equal(all, crypto.unbase64url(crypto.base64url(all)))
      for i = 0, 255 do
        local b = string.char(i)
        assert.are.equal(b, crypto.unbase64url(crypto.base64url(b)))
        assert.are.equal(b .. "xy", crypto.unbase64url(crypto.base64url(b .. "xy")))
      end
    end)

    it("turns 32 random bytes into 43 characters, as API tokens", function()
      for _ = 1, 100 do
        local token = crypto.base64url(crypto.random(32))
        assert.are.equal(43, #token)
        assert.matches("^[A-Za-z0-9_-]+$", token)
      end
    end)

    it("matches RFC 4648 without padding, with the URL alphabet", function()
      local vectors = { [""] = "", f = "Zg", fo = "Zm8", foo = "Zm9v", foob = "Zm9vYg",
        fooba = "Zm9vYmE", foobar = "Zm9vYmFy", ["\251\255"] = "-_8", ["\255\254\253"] = "__79" }
      for raw, enc in pairs(vectors) do
        assert.are.equal(enc, crypto.base64url(raw))
        assert.are.equal(raw, crypto.unbase64url(enc))
      end
    end)

    it("rejects padding, foreign characters, impossible lengths and extra bits", function()
      local bad = { "Zg==", "Zm8=", "Zg=", "+_8", "/w", "Zm 9v", "Zm9v\n", "Zm9v\0", "é",
        "Z", "Zm9vY", "Zh", "Zm9", "Zm9vYmF" }
      for _, s in ipairs(bad) do
        local raw, err = crypto.unbase64url(s)
        assert.is_nil(raw, s)
        assert.matches("^unbase64url: ", err)
      end
      assert.are.same({ nil, "unbase64url: invalid character at position 3" },
        { crypto.unbase64url("Zg==") })
      assert.are.same({ nil, "unbase64url: invalid length 5" }, { crypto.unbase64url("Zm9vY") })
      assert.are.same({ nil, "unbase64url: non-canonical encoding (unused bits set)" },
        { crypto.unbase64url("Zh") })
      assert.has_error(function() crypto.unbase64url() end)
    end)
  end)

  describe("base64", function()
    it("matches RFC 4648 with padding and the standard alphabet", function()
      local vectors = { [""] = "", f = "Zg==", fo = "Zm8=", foo = "Zm9v", foob = "Zm9vYg==",
        fooba = "Zm9vYmE=", foobar = "Zm9vYmFy", ["\251\255"] = "+/8=",
        ["Aladdin:open sesame"] = "QWxhZGRpbjpvcGVuIHNlc2FtZQ==" }
      for raw, enc in pairs(vectors) do
        assert.are.equal(enc, crypto.base64(raw))
        assert.are.equal(raw, crypto.unbase64(enc))
      end
    end)

    it("round-trips every length from 0 to 64", function()
      for n = 0, 64 do
        local raw = crypto.random(n)
        local s = crypto.base64(raw)
        assert.are.equal(4 * ((n + 2) // 3), #s)
        assert.are.equal(raw, crypto.unbase64(s))
      end
    end)

    it("rejects missing padding and foreign characters on decode", function()
      for _, s in ipairs({ "Zg", "Zg=", "Zm8", "-_8=", "Zg=A", "====", "Z===", "Zh==", "Zm9v\n" }) do
        local raw, err = crypto.unbase64(s)
        assert.is_nil(raw, s)
        assert.matches("^unbase64: ", err)
      end
    end)
  end)
end)
