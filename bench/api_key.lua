-- wrk script: GET /v1/me authenticated by an account's API key (TG_API_KEY): the
-- key's verification (digest, cache) plus the user read every request makes.
wrk.method = "GET"
wrk.headers["Authorization"] = "Bearer " .. os.getenv("TG_API_KEY")
