-- bench/latency.lua — wrk reporting hook.
-- Prints one machine-readable summary line (BENCH ...) and one line with the
-- latency distribution (BENCHPCT pct:us,...) that dataplane.sh turns into CSV.
-- Latencies are in microseconds, as wrk records them.

local pcts = { 1, 5, 10, 25, 50, 75, 90, 95, 99, 99.5, 99.9, 99.95, 99.99 }

done = function(summary, latency, requests)
   local e = summary.errors
   io.write(string.format(
      "BENCH requests=%d duration_us=%d status_errors=%d connect_errors=%d read_errors=%d " ..
      "write_errors=%d timeouts=%d p50=%d p75=%d p90=%d p99=%d p999=%d max=%d mean=%.1f\n",
      summary.requests, summary.duration, e.status, e.connect, e.read, e.write, e.timeout,
      latency:percentile(50), latency:percentile(75), latency:percentile(90),
      latency:percentile(99), latency:percentile(99.9), latency.max, latency.mean))
   local parts = {}
   for _, p in ipairs(pcts) do
      parts[#parts + 1] = string.format("%s:%d", tostring(p), latency:percentile(p))
   end
   io.write("BENCHPCT " .. table.concat(parts, ",") .. "\n")
end
