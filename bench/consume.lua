-- wrk script: POST /v1/usage/consume for one of N accounts (bench-0 .. bench-N-1).
-- Env: TG_KEY (service key), TG_ACCOUNTS (how many accounts; 1 = one hot account).
-- The requests are formatted once at start so that wrk spends its share of the two
-- cores sending them, not building them.
local key = os.getenv("TG_KEY")
local accounts = tonumber(os.getenv("TG_ACCOUNTS") or "1")
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. key
local requests = {}
for i = 0, accounts - 1 do
  requests[i] = wrk.format(nil, nil, nil, '{"account":"ext:bench-' .. i .. '","meter":"requests"}')
end
local counter = 0
request = function()
  counter = (counter + 1) % accounts
  return requests[counter]
end
