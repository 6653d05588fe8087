-- wrk script: POST /v1/ratelimit/check for one of 1000 keys on the default plan.
local key = os.getenv("TG_KEY")
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. key
local counter = 0
request = function()
  counter = counter + 1
  local body = '{"scope":"api","key":"k' .. (counter % 1000) .. '"}'
  return wrk.format(nil, nil, nil, body)
end
