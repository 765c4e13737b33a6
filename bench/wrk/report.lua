-- wrk script: prints the result as one JSON line (latencies in microseconds).
-- WRK_HOSTS="a.example,b.example" spreads requests over several Host headers.
-- luacheck: globals request done wrk
local hosts = {}
for h in (os.getenv("WRK_HOSTS") or ""):gmatch("[^,]+") do hosts[#hosts + 1] = h end
local i = 0
if #hosts > 0 then
  request = function()
    i = i % #hosts + 1
    return wrk.format("GET", nil, { Host = hosts[i] })
  end
end

done = function(summary, latency, _)
  local e = summary.errors
  io.write(string.format('WRKJSON {"requests":%d,"duration_us":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,'
    .. '"max_us":%d,"mean_us":%.1f,"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d}}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max, latency.mean, e.connect, e.read, e.write, e.status, e.timeout))
end
