-- wrk script: POST the benchmark body (file named by BENCH_BODY).
local f = assert(io.open(os.getenv("BENCH_BODY") or "bench/body.json", "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
wrk.headers["Content-Type"] = "application/json"
f:close()
