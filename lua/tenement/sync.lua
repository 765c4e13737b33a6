-- Coordination between tasks, built on core.park / core.wake.
local core = require "tenement.core"

local sync = {}

-- A mailbox: any task may put; one owner task takes, waiting while empty.
-- Messages are kept in order and never dropped (callers bound what they put).
local Mailbox = {}
Mailbox.__index = Mailbox

function sync.mailbox()
  return setmetatable({ head = 1, tail = 0, items = {}, waiter = nil }, Mailbox)
end

function Mailbox:put(msg)
  self.tail = self.tail + 1
  self.items[self.tail] = msg
  local w = self.waiter
  if w then
    self.waiter = nil
    core.wake(w)
  end
end

-- take([timeout_ms]) -> msg | nil, "timeout"
function Mailbox:take(timeout_ms)
  local deadline = timeout_ms and core.now() + timeout_ms
  while self.head > self.tail do
    local left
    if deadline then
      left = deadline - core.now()
      if left <= 0 then return nil, "timeout" end
    end
    self.waiter = core.current()
    local _, err = core.park(left and math.ceil(left))
    self.waiter = nil
    if err == "timeout" and self.head > self.tail then return nil, "timeout" end
  end
  local msg = self.items[self.head]
  self.items[self.head] = nil
  self.head = self.head + 1
  return msg
end

function Mailbox:size() return self.tail - self.head + 1 end

-- An event: tasks wait until it is set; setting it releases them all, with a
-- value. It stays set (later waiters return at once), like a promise.
local Event = {}
Event.__index = Event

function sync.event()
  return setmetatable({ set_ = false, waiters = {} }, Event)
end

function Event:set(...)
  if self.set_ then return end
  self.set_ = true
  self.value = table.pack(...)
  local waiters = self.waiters
  self.waiters = {}
  for _, t in ipairs(waiters) do core.wake(t) end
end

function Event:is_set() return self.set_ end

-- wait([timeout_ms]) -> the values given to set | nil, "timeout"
function Event:wait(timeout_ms)
  local deadline = timeout_ms and core.now() + timeout_ms
  while not self.set_ do
    local left
    if deadline then
      left = deadline - core.now()
      if left <= 0 then return nil, "timeout" end
    end
    local me = core.current()
    self.waiters[#self.waiters + 1] = me
    core.park(left and math.ceil(left))
    for i, t in ipairs(self.waiters) do
      if t == me then table.remove(self.waiters, i) break end
    end
  end
  return table.unpack(self.value, 1, self.value.n)
end

return sync
