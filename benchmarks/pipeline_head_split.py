"""The split head and the stage checkpoint on the compiled pipelined step (8 fake CPU devices).

MAI-1 dense at reduced width (d_model 256, vocab 8,192, seq 128; float32) on stage 4 x fsdp 192 x
tensor 4 scaled to 8 devices, 1 repeat, 4 pipeline microbatches: per-device FLOPs and peak bytes of
the compiled train step (`mai-jax plan --compile --json`) for this checkout with the stage
checkpoint on and off, and, given --before DIR (a checkout of a commit before the split head,
e.g. cbb9928), for that code. Writes one JSON (machine, versions, commands, figures).

  python benchmarks/pipeline_head_split.py --before /tmp/base --out benchmarks/results/pipeline_head_split_cpu.json
"""

import argparse
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WIDTH = ["--config.model.d_model=256", "--config.model.num_heads=16", "--config.model.head_dim=16",
         "--config.model.d_ff=512", "--config.model.vocab_size=8192", "--config.data.seq_len=128",
         "--config.model.compute_dtype=float32", "--config.mesh.stage=4", "--config.mesh.fsdp=192",
         "--config.mesh.tensor=4", "--config.mesh.data=-1", "--config.model.pipeline_repeats=1",
         "--config.model.pipeline_microbatches=4", "--config.train.microbatches=1"]
# keys the code before this change does not have (their values there: these)
NEW_KEYS = ["--config.model.sequence_parallel=False"]


def compile_figures(repo: str, extra: list[str]) -> dict:
  cmd = [sys.executable, "-m", "mai_jax", "plan", "--config", "experiments/mai1_500b.py",
         "--compile", "--compile-layers", "4", "--json", *WIDTH, *extra]
  env = {**os.environ, "PYTHONPATH": repo}
  out = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, check=True).stdout
  c = json.loads(out)["compile"]
  return {"repo": repo, "command": " ".join(cmd[1:]), "mesh": c["mesh"],
          "num_layers": c["num_layers"], "flops_per_device": c["compiled"]["flops"],
          "peak_bytes_per_device": c["compiled"]["peak_bytes"],
          "planned_peak_bytes": c["planned"]["memory_per_device_bytes"]["total"]}


def main() -> int:
  parser = argparse.ArgumentParser()
  parser.add_argument("--before", help="checkout of the code before the split head")
  parser.add_argument("--out", required=True)
  args = parser.parse_args()
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import train_step  # pylint: disable=import-outside-toplevel  (imports jax)
  rows = {"stage_checkpoint": compile_figures(REPO, NEW_KEYS + ["--config.model.pipeline_stage_remat=True"]),
          "no_stage_checkpoint": compile_figures(REPO, NEW_KEYS + ["--config.model.pipeline_stage_remat=False"])}
  if args.before:
    rows["before_split_head"] = compile_figures(args.before, [])
  fields = {"note": "XLA's cost analysis counts loop bodies once; figures are per device",
            "results": rows}
  # the benchmarks' common header: date, exact command, commit, machine, versions
  train_step.save_result("pipeline_head_split", sys.argv[1:], fields, args.out)
  print(json.dumps(rows, indent=2))
  return 0


if __name__ == "__main__":
  sys.exit(main())
