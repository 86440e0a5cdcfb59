#!/usr/bin/env bash
# Runs the MaxText peer (../shared/tools/maxtext_tiny.sh: MaxText 0.2.5, same tiny Llama shape) and
# then mai_jax's train_step benchmark on experiments/tiny.py right after it, so both step times come
# from the same machine state. Writes benchmarks/results/maxtext_peer_cpu.json and
# benchmarks/results/train_step_tiny_cpu.json.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
peer_line=$(bash ../shared/tools/maxtext_tiny.sh | tail -1)
echo "$peer_line"
JAX_PLATFORMS=cpu "$PY" benchmarks/train_step.py --config experiments/tiny.py --steps 20 --warmup 3
"$PY" - "$peer_line" <<'PY'
import datetime, json, platform, os, re, sys
m = re.search(r"step_s=([\d.]+) tokens_per_s=([\d.]+)", sys.argv[1])
ours = json.load(open("benchmarks/results/train_step_tiny_cpu.json"))
record = {"benchmark": "maxtext_peer", "date": datetime.datetime.now(datetime.timezone.utc)
          .isoformat(timespec="seconds"), "command": "bash benchmarks/maxtext_peer.sh",
          "peer": {"tool": "../shared/tools/maxtext_tiny.sh", "maxtext_version": "0.2.5",
                   "step_time_s_median": float(m.group(1)), "tokens_per_sec": float(m.group(2))},
          "mai_jax": {"step_time_s_median": ours["result"]["step_time_s_median"],
                      "tokens_per_sec": ours["result"]["tokens_per_sec"]},
          "shape": "4 layers, d_model 256, 4 heads (4 kv) x 64, d_ff 1024, vocab 4096, seq 256, "
                   "batch 8, bf16 compute, 1 CPU device",
          "machine": ours["machine"]}
record["mai_jax_over_peer_step_time"] = (record["mai_jax"]["step_time_s_median"]
                                         / record["peer"]["step_time_s_median"])
json.dump(record, open("benchmarks/results/maxtext_peer_cpu.json", "w"), indent=2)
print(json.dumps({k: record[k] for k in ("peer", "mai_jax", "mai_jax_over_peer_step_time")}))
PY
