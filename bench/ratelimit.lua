-- wrk script: POST /v1/ratelimit/check for one of 1000 keys on the default plan.
-- The requests are formatted once at start (see consume.lua).
local key = os.getenv("TG_KEY")
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. key
local requests = {}
for i = 0, 999 do
  requests[i] = wrk.format(nil, nil, nil, '{"scope":"api","key":"k' .. i .. '"}')
end
local counter = 0
request = function()
  counter = (counter + 1) % 1000
  return requests[counter]
end
