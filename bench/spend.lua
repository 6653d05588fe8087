-- wrk script: POST /v1/accounts/ext:bench-N/credits/spend of 1 credit, for one of N
-- accounts (TG_ACCOUNTS, default 1). bench.sh grants each account enough credits
-- first. The requests are formatted once at start (see consume.lua).
local key = os.getenv("TG_KEY")
local accounts = tonumber(os.getenv("TG_ACCOUNTS") or "1")
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. key
local requests = {}
for i = 0, accounts - 1 do
  requests[i] = wrk.format(nil, "/v1/accounts/ext:bench-" .. i .. "/credits/spend", nil, '{"amount":1}')
end
local counter = 0
request = function()
  counter = (counter + 1) % accounts
  return requests[counter]
end
