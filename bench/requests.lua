-- wrk script of `make bench`: rotate through prepared requests, print a JSON summary.
--
--   wrk -t2 -c16 -d10s -s bench/requests.lua http://127.0.0.1:PORT -- requests.tsv 2 [close]
--
-- Each line of the file is METHOD<TAB>PATH<TAB>AUTHORIZATION<TAB>BODY (AUTHORIZATION
-- may be empty). Thread i of n sends lines i, i+n, i+2n, ... and wraps around, so
-- the threads never send the same line at the same time (the second argument is the
-- number of threads). With "close", every request asks for `Connection: close`: each one
-- is a new connection, so the server's worker processes share the load request by
-- request instead of keeping the connections they happened to accept.

local threads = {}
local counter = 0

function setup(thread)
  thread:set("tid", counter)
  counter = counter + 1
  table.insert(threads, thread)
end

function init(args)
  close_ = args[3] == "close"
  local lines = {}
  for line in io.lines(args[1]) do
    local method, path, auth, body = line:match("^([^\t]*)\t([^\t]*)\t([^\t]*)\t(.*)$")
    local headers = {["Content-Type"] = "application/json"}
    if close_ then headers["Connection"] = "close" end
    if auth ~= "" then headers["Authorization"] = auth end
    if body == "" then body = nil end
    lines[#lines + 1] = wrk.format(method, path, headers, body)
  end
  requests_ = lines
  nthreads_ = tonumber(args[2] or "1")
  index_ = tid + 1
end

function request()
  local r = requests_[index_]
  index_ = index_ + nthreads_
  if index_ > #requests_ then index_ = (index_ - 1) % nthreads_ + 1 end
  return r
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests": %d, "duration_us": %d, "bytes": %d, "connect_errors": %d, "read_errors": %d, ' ..
    '"write_errors": %d, "status_errors": %d, "timeouts": %d, "p50_us": %d, "p90_us": %d, ' ..
    '"p99_us": %d, "max_us": %d, "mean_us": %.1f}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status,
    e.timeout, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max, latency.mean))
end
