#!/usr/bin/env bash
# Reproduces every figure of the README's Performance section: the criterion benches (offline
# decode, plan and ledger), then the load generator through the local RabbitMQ, each run
# REPEAT times (default 3) keeping the best, since the machine is shared.
#
#   benches/run-all.sh            # everything (about 10 minutes)
#   REPEAT=1 benches/run-all.sh   # one run each
#   SECTIONS="broker sweep" benches/run-all.sh   # some of: offline side broker sweep
#   SECTIONS=side benches/run-all.sh   # the service against a bare consumer, in one run
#   KILLBILL_URL=http://127.0.0.1:18080 benches/run-all.sh   # also against a real KillBill
#   SECTIONS="flood memory" benches/run-all.sh   # a /metrics flood; memory over two 5-minute runs
#
# Needs RabbitMQ at 127.0.0.1:5672 (guest/guest). Every run uses its own queue prefix and
# deletes its topology afterwards. The JSON lines of every run are kept in
# target/perf/loadgen.jsonl.
set -euo pipefail
cd "$(dirname "$0")/.."
REPEAT="${REPEAT:-3}"
SECTIONS="${SECTIONS:-offline side broker sweep}"
out=target/perf
mkdir -p "$out"
: >"$out/loadgen.jsonl"

echo "== machine"
echo "cores: $(nproc); CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')"
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"

if [[ $SECTIONS == *offline* ]]; then
  echo "== offline: decode, plan, ledger (criterion, one core)"
  cargo bench --bench pipeline -- --warm-up-time 1 --measurement-time 3 2>/dev/null |
    grep -E '^(fixtures|kind)/|thrpt:' | grep -v '%' || true
fi

cargo build --release --example loadgen 2>/dev/null
loadgen=target/release/examples/loadgen

# best NAME KEY ORDER ARGS...: runs the load generator REPEAT times and prints the run whose
# KEY is best (ORDER max or min), then its table.
best() {
  local name=$1 key=$2 order=$3
  shift 3
  local best_line="" best_value="" line
  for ((i = 1; i <= REPEAT; i++)); do
    if ! line=$("$loadgen" "$@" | tail -n 1) || [[ $line != "{"* ]]; then
      echo "$name: run $i failed" >&2
      continue
    fi
    echo "{\"run\":\"$name\",\"result\":$line}" >>"$out/loadgen.jsonl"
    local value
    value=$(grep -o "\"$key\":[0-9.]*" <<<"$line" | cut -d: -f2)
    if [[ -z "$best_value" ]] ||
      { [[ $order == max ]] && awk "BEGIN{exit !($value > $best_value)}"; } ||
      { [[ $order == min ]] && awk "BEGIN{exit !($value < $best_value)}"; }; then
      best_value=$value
      best_line=$line
    fi
  done
  printf '%-34s %s = %s (best of %s)\n  %s\n' "$name" "$key" "$best_value" "$REPEAT" "$best_line"
}

if [[ $SECTIONS == *side* ]]; then
echo "== side by side: a bare lapin consumer acking every 64th, the service's ignored and usage backlogs, a steady 1,000/s (one run)"
line=$("$loadgen" --side-by-side --messages 100000 2>/dev/null | tee /dev/stderr | tail -n 1)
echo "{\"run\":\"side by side\",\"result\":$line}" >>"$out/loadgen.jsonl"
fi

if [[ $SECTIONS == *broker* ]]; then
echo "== through RabbitMQ (loadgen $loadgen; service defaults unless given)"
best "ignored, backlog" consume_per_s max --messages 20000 --mix ignored
best "usage, ledger, backlog" consume_per_s max --messages 20000 --mix usage
best "usage, killbill 2 ms, backlog" consume_per_s max --messages 20000 --backend killbill --latency-ms 2
best "lifecycle, killbill 2 ms, backlog" consume_per_s max --messages 5000 --mix lifecycle --backend killbill --latency-ms 2
best "usage, ledger, 1000/s" lag_ms_p99 min --messages 20000 --rate 1000
best "usage, killbill 2 ms, 1000/s" lag_ms_p99 min --messages 20000 --rate 1000 --backend killbill --latency-ms 2
best "ignored, prefetch 1000, 100k" peak_rss_mib min --messages 100000 --prefetch 1000 --mix ignored
best "usage, ledger, prefetch 1000, 100k" peak_rss_mib min --messages 100000 --prefetch 1000
best "ignored, sharded (4), backlog" consume_per_s max --messages 30000 --mix ignored --shards 4
fi

if [[ $SECTIONS == *flood* ]]; then
echo "== a /metrics flood (8 clients) against none"
best "ignored, /metrics served" consume_per_s max --messages 200000 --mix ignored --metrics on
best "ignored, /metrics flooded" consume_per_s max --messages 200000 --mix ignored --metrics on --scrapers 8
fi

if [[ $SECTIONS == *memory* ]]; then
echo "== memory over a long unscraped run (RSS samples every 30 s; one run each, 5 minutes)"
for metrics in no-upkeep on; do
  line=$("$loadgen" --messages 2400000 --rate 8000 --mix project --metrics "$metrics" --rss-every-s 30 2>/dev/null | tail -n 1)
  echo "{\"run\":\"memory, $metrics\",\"result\":$line}" >>"$out/loadgen.jsonl"
  echo "metrics $metrics: RSS (MiB) $(grep -o '"rss_samples_mib":\[[^]]*\]' <<<"$line")"
done
fi

# Against a real KillBill: deploy/dev/killbill.sh start, then KILLBILL_URL=$(deploy/dev/killbill.sh url).
if [[ -n "${KILLBILL_URL:-}" ]]; then
echo "== against the real KillBill at $KILLBILL_URL"
best "usage, real killbill, backlog" consume_per_s max --messages 5000 --backend killbill --killbill-url "$KILLBILL_URL"
best "usage, real killbill, 100/s" lag_ms_p99 min --messages 3000 --rate 100 --backend killbill --killbill-url "$KILLBILL_URL"
best "lifecycle, real killbill, backlog" consume_per_s max --messages 1000 --mix lifecycle --backend killbill --killbill-url "$KILLBILL_URL"
fi

if [[ $SECTIONS == *sweep* ]]; then

echo "== lanes and prefetch (usage, killbill 2 ms, backlog of 10,000)"
for lanes in 8 16 32 64; do
  best "lanes $lanes, prefetch 256" consume_per_s max --messages 10000 --backend killbill --lanes "$lanes" --prefetch 256
done
for prefetch in 64 256 1000; do
  best "ignored, prefetch $prefetch" consume_per_s max --messages 20000 --mix ignored --prefetch "$prefetch"
done
fi
