-- wrk script for iokit.bench: the request to send, and one JSON line on stdout when the run ends, so nothing parses
-- wrk's prose.
--
-- The request comes from the script's arguments (after wrk's `--`), as http_load.py's HttpRequest writes them:
-- METHOD BODY_BYTES "Name: value"...  The path is the URL's. wrk formats the request once, after init (it stays
-- static: no `request` function, so no Lua call per request); it adds Host, and Content-Length when there is a body.
-- No arguments: wrk's own plain GET.
init = function(args)
  if #args == 0 then
    return
  end
  wrk.method = args[1]
  local body_bytes = tonumber(args[2])
  if body_bytes > 0 then
    wrk.body = string.rep("x", body_bytes)
  end
  for index = 3, #args do
    local name, value = args[index]:match("^([^:]+):%s*(.*)$")
    wrk.headers[name] = value
  end
end

-- Latencies are in microseconds (wrk's unit); errors add up every kind wrk counts, non-2xx/3xx statuses included.
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests": %d, "duration_us": %d, "bytes": %d, "errors": %d, "non_2xx": %d, ' ..
    '"p50_us": %.1f, "p90_us": %.1f, "p99_us": %.1f, "p999_us": %.1f, "max_us": %.1f}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect + e.read + e.write + e.status + e.timeout, e.status,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency:percentile(99.9),
    latency.max))
end
