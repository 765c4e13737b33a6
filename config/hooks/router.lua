-- An example router hook ([hooks] router = "hooks/router.lua").
--
-- route(request, view, default) is called once per request, before the
-- default routing. request = { method, host, path, headers, hostname,
-- normal_path } (hostname and normal_path as the default router compares
-- them: no case, port or trailing dot; escapes of letters decoded); view = {
-- domain, routing, services }; default(request) returns what the built-in
-- router would do. Return a target, or nil to let the default decide:
--   "service"            weighted choice among the service's instances
--   "service:id"         that instance
--   { kind = "status", status = 403, reason = "..." }   an answer of our own
return {
  route = function(request, _view, default)
    -- canary: requests that carry "x-canary: 1" go to the canary instance
    if request.headers["x-canary"] == "1" then
      local target = default(request)
      if target.kind == "service" then return target.service .. ":canary" end
    end
    -- keep crawlers off the staging instances
    if (request.hostname or ""):match("^staging%.") and (request.headers["user-agent"] or ""):find("bot") then
      return { kind = "status", status = 403, reason = "no crawling of staging" }
    end
    return nil
  end,
}
