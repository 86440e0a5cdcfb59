"""Steady-state train-step benchmark: step time, tokens/s and MFU on the current backend.

  python benchmarks/train_step.py --config experiments/tiny.py[:VARIANT] [--steps 20] [--warmup 3]
      [--config.SECTION.KEY=VALUE ...] [--out benchmarks/results/NAME.json]

Batches are random tokens already on the devices, so this measures the jitted step (forward,
backward, optimizer) and not the input pipeline (see benchmarks/data_pipeline.py for that).

MFU formula (mai_jax/metrics.py): training FLOPs per token = 6 * N_matmul + 6 * L * T * H * K
(6N with N the parameters in matmuls that a token uses (the active ones for MoE), i.e. without the untied input embedding table, plus causal
attention, halved), times tokens/s, over (devices x dense bf16 peak). On CPU there is no meaningful
peak; MFU is null unless MAI_JAX_PEAK_FLOPS is set.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import jax
import numpy as np

from mai_jax import cli, config as config_lib, metrics, sharding as sharding_lib
from mai_jax.model import count_active_params, count_params
from mai_jax.train.trainer import build_trainer


def machine_info() -> dict:
  info = {"platform": platform.platform(), "python": platform.python_version(),
          "cpu_count": os.cpu_count(), "backend": jax.default_backend(),
          "devices": [d.device_kind for d in jax.devices()][:8], "device_count": jax.device_count()}
  try:
    with open("/proc/cpuinfo") as f:
      info["cpu_model"] = next(line.split(":", 1)[1].strip() for line in f
                               if line.startswith("model name"))
  except (OSError, StopIteration):
    pass
  return info


def versions() -> dict:
  import flax
  import optax
  import orbax.checkpoint
  return {"jax": jax.__version__, "jaxlib": jax.lib.__version__ if hasattr(jax.lib, "__version__")
          else None, "flax": flax.__version__, "optax": optax.__version__,
          "orbax_checkpoint": orbax.checkpoint.__version__, "numpy": np.__version__}


def git_commit() -> str | None:
  try:
    return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return None


def random_batch(cfg: config_lib.Config, batch_sharding, mean_doc_len: int = 0) -> dict:
  """A global batch of random tokens, already on the devices: one document per row, or, with
  `mean_doc_len` > 0, rows packed with documents of random (geometric) lengths of that mean, with
  the segment ids and restarting positions the data pipeline gives packed rows."""
  rows, seq = cfg.train.global_batch_size, cfg.data.seq_len
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, cfg.model.vocab_size, (rows, seq + 1), np.int32)
  segment_ids = np.ones((rows, seq), np.int32)
  positions = np.broadcast_to(np.arange(seq, dtype=np.int32), (rows, seq)).copy()
  if mean_doc_len > 0:
    for r in range(rows):
      starts = np.cumsum(rng.geometric(1.0 / mean_doc_len, size=seq))
      starts = np.concatenate([[0], starts[starts < seq]])
      segment_ids[r] = np.searchsorted(starts, np.arange(seq), side="right")
      positions[r] = np.arange(seq) - starts[segment_ids[r] - 1]
  host_batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": segment_ids,
                "positions": positions}
  return {k: jax.device_put(v, batch_sharding) for k, v in host_batch.items()}


def time_steps(step_fn, state, batch, steps: int):
  """Runs `steps` steps, each timed to its metrics being ready -> (state, metrics, seconds)."""
  times, m = [], None
  for _ in range(steps):
    t0 = time.perf_counter()
    state, m = step_fn(state, batch)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t0)
  return state, m, times


def run(cfg: config_lib.Config, steps: int, warmup: int, mean_doc_len: int = 0) -> dict:
  mesh = sharding_lib.make_mesh(cfg.mesh)
  config_lib.validate(cfg, jax.device_count())
  trainer = build_trainer(cfg, mesh, max(cfg.train.num_steps, steps + warmup))
  state = trainer.init_state()
  rows, seq = cfg.train.global_batch_size, cfg.data.seq_len
  batch = random_batch(cfg, trainer.batch_sharding, mean_doc_len)
  with sharding_lib.activate(mesh, cfg.mesh.rules):
    step_fn = trainer.jit_train_step()
    t0 = time.perf_counter()
    compiled = step_fn.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    state, m, _ = time_steps(compiled, state, batch, warmup)
    state, m, times = time_steps(compiled, state, batch, steps)
  step_s = statistics.median(times)
  n = count_params(cfg.model)
  # MoE: FLOPs follow the parameters a token uses (equal to n for dense models).
  fpt = metrics.train_flops_per_token(cfg.model, count_active_params(cfg.model), seq)
  tps = rows * seq / step_s
  peak = metrics.device_peak_flops()
  memory = None
  try:
    stats = jax.devices()[0].memory_stats()
    memory = stats.get("peak_bytes_in_use") if stats else None
  except Exception:  # noqa: BLE001  (CPU backends may not implement memory_stats)
    memory = None
  return {"params": n, "flops_per_token": fpt, "tokens_per_step": rows * seq,
          "step_time_s_median": step_s, "step_time_s_min": min(times),
          "step_time_s_all": times, "tokens_per_sec": tps,
          "mfu": metrics.mfu(tps, fpt, jax.device_count(), peak), "peak_flops_per_device": peak,
          "compile_s": compile_s, "final_loss": float(m["loss"]), "peak_bytes_in_use": memory}


def save_result(benchmark: str, argv, fields: dict, out=None) -> str:
  """Writes `fields` under the common header (benchmark, date, exact command, commit, machine,
  versions) to `out` (default benchmarks/results/{benchmark}_{backend}.json); returns the path."""
  record = {
      "benchmark": benchmark,
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "command": " ".join(["python", f"benchmarks/{benchmark}.py"] + list(argv)),
      "git_commit": git_commit(), "machine": machine_info(), "versions": versions(), **fields}
  out = out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                            f"{benchmark}_{jax.default_backend()}.json")
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, "w") as f:
    json.dump(record, f, indent=2)
  return out


def write_record(benchmark: str, config_spec: str, argv, cfg: config_lib.Config, result: dict,
                 out=None, **extra) -> str:
  """save_result with the resolved config, by default to
  benchmarks/results/{benchmark}_{experiment}[_{variant}]_{backend}.json."""
  name = os.path.splitext(os.path.basename(config_spec.split(":")[0]))[0]
  variant = config_spec.partition(":")[2]
  out = out or os.path.join(
      os.path.dirname(os.path.abspath(__file__)), "results",
      f"{benchmark}_{name}{'_' + variant if variant else ''}_{jax.default_backend()}.json")
  return save_result(benchmark, argv, {**extra, "config": config_lib.to_dict(cfg),
                                       "result": result}, out)


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  rest, overrides = cli.split_overrides(argv)
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", required=True)
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--out", default=None)
  parser.add_argument("--label", default=None, help="tag stored in the result (e.g. 'maxtext-peer')")
  args = parser.parse_args(rest)
  try:
    cfg = cli.resolve_config(args.config, None, overrides)
    result = run(cfg, args.steps, args.warmup)
  except config_lib.ConfigError as e:
    print(f"train_step.py: error: {e}", file=sys.stderr)
    return 2
  out = write_record("train_step", args.config, argv, cfg, result, args.out, label=args.label,
                     mfu_formula="(6*N_matmul + 6*L*T*H*K) * tokens/s / (devices * dense bf16 "
                                 "peak)")
  name = os.path.splitext(os.path.basename(args.config.split(":")[0]))[0]
  print(f"{name}: step {result['step_time_s_median'] * 1e3:.1f} ms, "
        f"{result['tokens_per_sec']:,.0f} tokens/s, MFU "
        f"{'n/a' if result['mfu'] is None else format(result['mfu'], '.1%')} -> {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
