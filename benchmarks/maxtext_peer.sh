#!/usr/bin/env bash
# Runs the MaxText peer (benchmarks/maxtext_tiny.sh: MaxText 0.2.5, same tiny Llama shape) and
# then mai_jax's train_step benchmark on experiments/tiny.py right after it, twice:
#   same_jax:  under the peer's own virtualenv (Python 3.12, the jax/jaxlib MaxText resolved), so
#              both step times come from the same XLA build;
#   install:   under the README install ($PY, default .venv: Python 3.11 here, jax 0.10.2).
# Writes benchmarks/results/maxtext_peer_cpu.json, train_step_tiny_cpu.json (install) and
# train_step_tiny_cpu_peer_jax.json (same_jax).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
PEER_PY=${MAXTEXT_ROOT:-/tmp/maxtext_peer}/venv/bin/python
peer_line=$(bash benchmarks/maxtext_tiny.sh | tail -1)
echo "$peer_line"
JAX_PLATFORMS=cpu PYTHONPATH=$PWD "$PEER_PY" benchmarks/train_step.py --config experiments/tiny.py \
  --steps 20 --warmup 3 --label maxtext-peer-jax --out benchmarks/results/train_step_tiny_cpu_peer_jax.json
JAX_PLATFORMS=cpu "$PY" benchmarks/train_step.py --config experiments/tiny.py --steps 20 --warmup 3
"$PY" - "$peer_line" <<'PY'
import datetime, json, re, sys
m = re.search(r"step_s=([\d.]+) tokens_per_s=([\d.]+)", sys.argv[1])
peer = {"tool": "benchmarks/maxtext_tiny.sh", "maxtext_version": "0.2.5",
        "step_time_s_median": float(m.group(1)), "tokens_per_sec": float(m.group(2))}
record = {"benchmark": "maxtext_peer", "date": datetime.datetime.now(datetime.timezone.utc)
          .isoformat(timespec="seconds"), "command": "bash benchmarks/maxtext_peer.sh",
          "shape": "4 layers, d_model 256, 4 heads (4 kv) x 64, d_ff 1024, vocab 4096, seq 256, "
                   "batch 8, bf16 compute, 1 CPU device",
          "peer": peer}
for key, path in (("mai_jax_same_jax", "benchmarks/results/train_step_tiny_cpu_peer_jax.json"),
                  ("mai_jax_install", "benchmarks/results/train_step_tiny_cpu.json")):
  ours = json.load(open(path))
  record[key] = {"result": path, "jax": ours["versions"]["jax"],
                 "python": ours["machine"]["python"], "remat": ours["config"]["model"]["remat"],
                 "step_time_s_median": ours["result"]["step_time_s_median"],
                 "tokens_per_sec": ours["result"]["tokens_per_sec"],
                 "over_peer_step_time": ours["result"]["step_time_s_median"]
                                        / peer["step_time_s_median"]}
  record["machine"] = ours["machine"]
json.dump(record, open("benchmarks/results/maxtext_peer_cpu.json", "w"), indent=2)
print(json.dumps({k: record[k] for k in ("peer", "mai_jax_same_jax", "mai_jax_install")}, indent=1))
PY
