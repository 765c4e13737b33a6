-- Restart policy: what to do when an instance exits or fails its health
-- checks. A pure function of the instance's history, so a hook can replace it
-- and a spec can drive it with a fake clock.
local restart = {}

-- Whether an exit counts as a failure for restart = "on-failure": a non-zero
-- code, a signal, a failed health check or a failed start.
function restart.is_failure(exit)
  if exit.reason == "health" or exit.reason == "start" or exit.reason == "oom" then return true end
  if exit.signal then return true end
  return exit.code ~= 0
end

-- restart.decide(history, exit, settings, now) -> decision
--   history  : times (seconds, any monotonic origin) of earlier restarts
--   exit     : { code = n?, signal = "SIGKILL"?, reason = "exit"|"health"|"start"|"oom",
--                lasting = true? (a start that no retry can mend: the user is
--                missing, the isolation level cannot run, a template fails) }
--   settings : { restart = "always"|"on-failure"|"never", max_restarts, restart_window,
--                backoff_base_ms, backoff_max_ms }
--   now      : the current time, same clock as history
-- decision: { action = "restart", delay_ms = n, attempt = n }
--         | { action = "fail", reason = "..." }       (failed: no request starts it, `ten restart` does)
--         | { action = "stay_down", reason = "..." }  (stopped, not an error)
function restart.decide(history, exit, settings, now)
  if exit.lasting then
    -- backing off would only delay the verdict and fill the log
    return { action = "fail", reason = "not retried: no retry can mend this" }
  end
  local policy = settings.restart or "on-failure"
  if policy == "never" then
    -- a crash still reads as one: stopped would let the next request start
    -- it again, a restart by traffic with no backoff, which never forbids
    if restart.is_failure(exit) then return { action = "fail", reason = "not restarted (restart = \"never\")" } end
    return { action = "stay_down", reason = "exited cleanly (code 0) and restart = \"never\"" }
  end
  if policy == "on-failure" and not restart.is_failure(exit) then
    return { action = "stay_down", reason = "exited cleanly (code 0) and restart = \"on-failure\"" }
  end
  local window = settings.restart_window or 300
  local recent = 0
  for _, t in ipairs(history) do
    if now - t < window then recent = recent + 1 end
  end
  local max = settings.max_restarts or 3
  if recent >= max then
    return {
      action = "fail",
      reason = string.format("gave up: restarted %d time%s within %d s (max_restarts = %d)",
        recent, recent == 1 and "" or "s", window, max),
    }
  end
  local base = settings.backoff_base_ms or 1000
  local cap = settings.backoff_max_ms or 60000
  -- 2^recent overflows nothing here: recent is below max_restarts, and the
  -- shift is clamped before it could exceed the cap anyway.
  local delay = base
  for _ = 1, recent do
    delay = delay * 2
    if delay >= cap then break end
  end
  return { action = "restart", delay_ms = math.min(delay, cap), attempt = recent + 1 }
end

-- The history to keep: restarts still inside the window, so memory stays
-- bounded whatever an instance does.
function restart.prune(history, settings, now)
  local window = settings.restart_window or 300
  local kept = {}
  for _, t in ipairs(history) do
    if now - t < window then kept[#kept + 1] = t end
  end
  return kept
end

return restart
