-- Changing what serves a service without dropping requests: weights, a
-- blue-green switch, a deploy of a new version, a rolling replacement.
local core = require "tenement.core"
local supervisor = require "tenement.supervisor"
local log = require "tenement.log"

local deploy = {}

-- The weights of one service. -> { service, instances = { {id, instance, weight, state} } }
function deploy.weights(sup, service)
  local out = { service = service, instances = {} }
  for _, inst in ipairs(sup:of_service(service)) do
    out.instances[#out.instances + 1] = { id = inst.id, instance = inst.key, weight = inst.weight,
      state = inst.state, health = inst.health }
  end
  return out
end

-- deploy.shift(sup, service, from_id, to_id) -> result | nil, err, code
-- All weight moves from A to B at once (blue-green), after B answers a
-- health check; B is woken first if it sleeps.
function deploy.shift(sup, service, from_id, to_id)
  if from_id == to_id then return nil, "--from and --to name the same instance", "bad_request" end
  local from = sup:get(service, from_id)
  if not from then return nil, "no instance " .. supervisor.key(service, from_id), "not_found" end
  local to = sup:get(service, to_id)
  if not to then return nil, "no instance " .. supervisor.key(service, to_id), "not_found" end
  if to.state ~= "running" then
    local ok, err = sup:spawn(service, to_id, { why = "for a route" })
    if not ok then return nil, "cannot route to " .. to.key .. ": " .. err, "conflict" end
  end
  local ok, why = to:check(5000)
  if not ok then
    return nil, string.format("%s failed its health check (%s): weights unchanged", to.key, why), "conflict"
  end
  -- B first: each weight is written to the store before the next is set,
  -- and that write yields; with A at 0 first, a B at 0 (blue-green) left
  -- the service with no weight at all meanwhile, and its requests a 503
  local b, berr = sup:set_weight(service, to_id, 100)
  if not b then return nil, berr, "internal" end
  local a, aerr = sup:set_weight(service, from_id, 0)
  if not a then return nil, aerr, "internal" end
  log.info("route %s: %s's traffic to %s (weight 0 and 100)", service, from.key, to.key)
  return { from_instance = from.key, to_instance = to.key, from_weight = 0, to_weight = 100 }
end

local LIVE = { running = true, starting = true, unhealthy = true, backoff = true }

-- deploy.deploy(sup, service, version, weight, timeout_s) -> result | nil, err, code
-- Starts SERVICE:VERSION with no traffic, waits until it is healthy, and
-- only then gives it `weight`. On failure or timeout nothing changes: an
-- instance the deploy made is removed, one that existed gets its weight back.
function deploy.deploy(sup, service, version, weight, timeout_s)
  local existing = sup:get(service, version)
  -- unhealthy and backoff are alive too: a spawn returns them as they are
  -- (the ready event of their earlier start is still set), and the deploy
  -- would weigh and report as healthy what is not
  if existing and LIVE[existing.state] then
    return nil, existing.key .. " exists already (" .. existing.state
      .. "): deploy a new version id, or `ten restart` it", "conflict"
  end
  local before = existing and { weight = existing.weight, asleep = existing.state == "sleeping" }
  local w, werr = sup:set_weight(service, version, 0)
  if not w then return nil, werr, "bad_request" end
  -- recorded to run after a restart of the server only once healthy: a
  -- server killed meanwhile brought back a version nobody promoted
  local task = core.spawn(sup.spawn, sup, service, version, { persist = false })
  local joined, inst, err = task:join(timeout_s * 1000)
  if not joined or not inst then
    local why, output = joined and err, ""
    if not why then
      -- a crash inside the wait is the likelier story than slowness: say so,
      -- with what its health check answered and what it wrote (the instance
      -- goes with the deploy: this is where the operator reads it)
      local now = sup:get(service, version)
      local last = now and now.last_exit and now.last_exit:match("^[^\n]*")
      local answer = now and (now.refused_answer or now.last_answer)
      why = string.format("not healthy within %d s%s", timeout_s, now and (" (it is " .. now.state
        .. (last and ("; last exit: " .. last) or "") .. (answer and ("; the last check: " .. answer) or "") .. ")")
        or "")
      output = now and now:last_output() or ""
    end
    -- one that existed (stopped, failed or asleep) stays, as it was: only
    -- what the deploy itself made may go
    sup:stop(service, version, { reason = "deploy failed", persist = not (before and before.asleep) })
    if before then
      sup:set_weight(service, version, before.weight)
      local asleep = before.asleep and sup:remember_asleep(service, version)
      if asleep then asleep.last_exit = "asleep (a deploy of this id failed)" end
    else
      sup:forget(service, version)
    end
    return nil, string.format("deploy of %s:%s failed: %s; nothing changed%s", service, version, why, output),
      "start_failed"
  end
  local ok, set_err = sup:set_weight(service, version, weight)
  if not ok then
    -- healthy, but not weighed as asked: nothing changes, as for any failure
    sup:stop(service, version, { reason = "deploy failed", persist = false })
    if not existing then sup:forget(service, version) end
    return nil, string.format("deploy of %s:%s failed: %s; nothing changed", service, version, set_err), "internal"
  end
  if sup.store then sup:save_desired(inst, true) end
  log.info("deploy %s: healthy, weight %d", inst.key, weight)
  return { instance = inst.key, socket = inst.socket, weight = weight, status = "healthy" }
end

return deploy
