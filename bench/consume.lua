-- wrk script: POST /v1/usage/consume for one of N accounts (bench-0 .. bench-N-1).
-- Env: TG_KEY (service key), TG_ACCOUNTS (how many accounts; 1 = one hot account).
local key = os.getenv("TG_KEY")
local accounts = tonumber(os.getenv("TG_ACCOUNTS") or "1")
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. key
local counter = 0
request = function()
  counter = counter + 1
  local account = counter % accounts
  local body = '{"account":"ext:bench-' .. account .. '","meter":"requests"}'
  return wrk.format(nil, nil, nil, body)
end
