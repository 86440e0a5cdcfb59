"""Every single-GPU measurement in one command, sized for a short lease (< 8 minutes on one H100/H200).

  python benchmarks/gpu_suite.py --out DIR [--budget-s 420] [--only NAME[,NAME...]] [--steps 10]
  python benchmarks/gpu_suite.py --dry-run --out DIR      # the same code path on CPU at toy size

Writes one JSON per measurement, DIR/NAME.json (the common header of benchmarks/train_step.py:
date, exact command, commit, machine, versions; plus the GPU, driver, XLA flags and config), and
DIR/summary.json; prints a table last. Each measurement runs in its own process, so peak memory
(`memory_stats()['peak_bytes_in_use']`) is that measurement's alone and an out-of-memory failure
costs only its own row; a failure is recorded in its JSON with the error, never dropped.
Measurements run in the order below (most wanted first) until --budget-s is spent; the rest are
recorded as skipped.

  ceilings            bf16 8192^3 matmul TFLOP/s and device-to-device copy GB/s (read + write):
                      the two rates every other figure is read against (METHOD.md)
  dense_{attn}_{remat}  experiments/gpu_bench.py:dense (1.14B, seq 4096, 32K tokens/step):
                      step time, tokens/s, MFU, peak memory, and the planner's predicted memory
                      and step time for the same config on one GPU
  torch_peer_dense    the peer: the same model, batch, AdamW and remat (full) trained by PyTorch +
                      transformers with torch.compile on the same GPU (benchmarks/torch_peer.py;
                      MaxText itself is not in the GPU image and too big to carry)
  dense_cudnn_qkv_proj  remat 'qkv_proj' (mai_jax/model/remat.py: saves q/k/v only), between
                      'full' and 'dots' in memory
  dense_cudnn_full_fp8  dense_cudnn_full with model.fp8=current (fp8 projection matmuls,
                      mai_jax/model/fp8_matmul.py): bf16 vs fp8 step time; needs qwix (the [fp8]
                      extra, a pure-Python wheel: carry it and `pip install --no-deps` it), else
                      its JSON records the one-line config error
  dense_cudnn_packed  the same with rows packed with documents of mean length 512 (segment ids):
                      the cost of document masking on cuDNN (the [B,1,T,S] bias path)
  attention_packed    one attention layer of that model, forward + backward on those packed
                      rows: XLA vs cuDNN with the bias vs cuDNN's packed mode
                      (model.attention_impl='cudnn_packed'): time, compiled temp memory, and
                      each one's error against an XLA float32 reference
  dense_cudnn_offsets dense_cudnn_packed with model.attention_impl='cudnn_packed' (not in the
                      default dry run: dense_cudnn_packed's step with attention_packed's path)
  moe_cudnn_full      experiments/gpu_bench.py:moe (8 experts top-2)

MFU: (6 * N_active_matmul + 6 * L * T * H * K) * tokens/s / dense bf16 peak (causal attention
halved; mai_jax/metrics.py), the same formula as every result in benchmarks/results/.

The GPU image has no grain: nothing here imports mai_jax.data (the batch is random tokens on the
device), so the suite needs no grain wheels; only qwix for the fp8 row. The dry run leaves out
dense_xla_full (with 'cudnn' turned into 'xla' it would be dense_cudnn_full's program again), the
other remat policies (the same code path with another model.remat) and dense_cudnn_offsets.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENT = os.path.join(REPO, "experiments", "gpu_bench.py")


@dataclasses.dataclass(frozen=True)
class Measurement:
  name: str
  variant: str = ""  # experiments/gpu_bench.py variant; empty for the ceilings
  overrides: tuple[tuple[str, str], ...] = ()
  mean_doc_len: int = 0  # > 0: packed rows with segment ids
  kind: str = "train"  # 'train' (variant set), 'ceilings', 'attention' or 'torch_peer'
  # False: left out of the default --dry-run list, as another measurement's dry run covers the
  # same code path (a whole training step costs CI ~20 s; --only still runs it).
  in_dry_run: bool = True


MFU_FORMULA = ("(6*N_active_matmul + 6*L*T*H*K) * tokens/s / (devices * dense bf16 peak); causal "
               "attention halved")


def _train(name, variant, attention, remat, mean_doc_len=0, fp8="off") -> Measurement:
  fp8_override = (("model.fp8", fp8),) if fp8 != "off" else ()
  return Measurement(name, variant, (("model.attention_impl", attention), ("model.remat", remat))
                     + fp8_override, mean_doc_len)


MEASUREMENTS = (
    Measurement("ceilings", kind="ceilings"),
    _train("dense_cudnn_full", "dense", "cudnn", "full"),
    # the peer on the same GPU, model, batch and optimizer (benchmarks/torch_peer.py)
    Measurement("torch_peer_dense", "dense", (("model.remat", "full"),), kind="torch_peer"),
    _train("dense_cudnn_full_fp8", "dense", "cudnn", "full", fp8="current"),
    _train("moe_cudnn_full", "moe", "cudnn", "full"),
    # The remat policies differ only in model.remat (tests/test_model.py covers each policy):
    # dense_cudnn_full's dry run stands for them in CI.
    dataclasses.replace(_train("dense_cudnn_dots", "dense", "cudnn", "dots"), in_dry_run=False),
    dataclasses.replace(_train("dense_cudnn_qkv_proj", "dense", "cudnn", "qkv_proj"),
                        in_dry_run=False),
    Measurement("attention_packed", "dense", mean_doc_len=512, kind="attention"),
    _train("dense_cudnn_packed", "dense", "cudnn", "full", mean_doc_len=512),
    dataclasses.replace(_train("dense_cudnn_offsets", "dense", "cudnn_packed", "full",
                               mean_doc_len=512), in_dry_run=False),
    dataclasses.replace(_train("dense_cudnn_none", "dense", "cudnn", "none"), in_dry_run=False),
    # On CPU the dry run turns 'cudnn' into 'xla': this is dense_cudnn_full's program there.
    dataclasses.replace(_train("dense_xla_full", "dense", "xla", "full"), in_dry_run=False),
)
BY_NAME = {m.name: m for m in MEASUREMENTS}


def dry_run_measurement(m: Measurement) -> Measurement:
  """The same measurement at toy size on CPU: the toy variant, XLA attention for 'cudnn' (no
  cuDNN there); 'cudnn_packed' stays, as off GPU it runs its XLA emulation from the same offsets."""
  if not m.variant:
    return m
  dry_impl = lambda v: "xla" if v == "cudnn" else v
  overrides = tuple((k, dry_impl(v) if k == "model.attention_impl" else v)
                    for k, v in m.overrides)
  return dataclasses.replace(m, variant="moe_dry" if m.variant == "moe" else "dry",
                             overrides=overrides, mean_doc_len=min(m.mean_doc_len, 16))


# ----------------------------------------------------------------------------------------------
# One measurement (child process)


def gpu_info() -> dict:
  """GPU name, driver and memory from nvidia-smi (empty on a machine without one)."""
  try:
    out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                          "--format=csv,noheader"], capture_output=True, text=True, timeout=30,
                         check=True).stdout.strip().splitlines()
  except (OSError, subprocess.SubprocessError):
    return {}
  name, driver, memory = (x.strip() for x in out[0].split(","))
  return {"gpu": name, "driver": driver, "memory_total": memory, "gpu_count": len(out)}


def median_seconds(fn, *args, repeats: int) -> float:
  import jax
  import statistics
  jax.block_until_ready(fn(*args))  # compile and warm up
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def measure_ceilings(dry: bool) -> dict:
  """bf16 matmul rate and device-to-device copy bandwidth, on fresh random inputs (never zeros:
  they can run faster than real data)."""
  import jax
  import jax.numpy as jnp
  n, copy_mb, repeats = (256, 8, 3) if dry else (8192, 2048, 20)
  ka, kb, kc = jax.random.split(jax.random.key(0), 3)
  a = jax.random.normal(ka, (n, n), jnp.bfloat16)
  b = jax.random.normal(kb, (n, n), jnp.bfloat16)
  matmul = jax.jit(lambda x, y: x @ y)
  matmul_s = median_seconds(matmul, a, b, repeats=repeats)
  # Check the product against float32 on a corner (bf16 operands: ~1e-2 relative at most).
  corner = jnp.asarray(matmul(a, b)[:64, :64], jnp.float32)
  ref = a[:64].astype(jnp.float32) @ b[:, :64].astype(jnp.float32)
  rel = float(jnp.linalg.norm(corner - ref) / jnp.linalg.norm(ref))
  x = jax.random.normal(kc, (copy_mb * 2**20 // 4,), jnp.float32)
  copy = jax.jit(lambda v: v * 1.0000001)  # one read + one write per element; not a no-op copy
  copy_s = median_seconds(copy, x, repeats=repeats)
  return {"matmul_n": n, "matmul_s": matmul_s, "matmul_tflops": 2 * n**3 / matmul_s / 1e12,
          "matmul_rel_error_vs_f32": rel, "copy_bytes": 2 * x.nbytes, "copy_s": copy_s,
          "copy_gb_per_s": 2 * x.nbytes / copy_s / 1e9}


def measure_attention(m: Measurement, dry: bool) -> tuple[dict, dict]:
  """(result, config dict): one attention layer of the variant's model, forward + backward, on the
  packed rows train_step.py builds, through each document-masking path: 'xla' and 'cudnn' (the
  boolean mask; cuDNN gets it as a [B,1,T,S] bias) and 'cudnn_packed' (cuDNN's packing mode; off
  GPU its XLA emulation). Each path's output and gradients are compared with the XLA path on
  float32 operands; errors are max |got - ref| / max |ref| over out, dq, dk, dv."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import train_step  # pylint: disable=import-outside-toplevel
  from mai_jax import cli, config as config_lib
  from mai_jax.model import layers, packed_attention

  cfg = cli.resolve_config(f"{EXPERIMENT}:{m.variant}", None, dict(m.overrides))
  mc = cfg.model
  device = jax.devices()[0]
  seg_BT = train_step.random_batch(cfg, jax.sharding.SingleDeviceSharding(device),
                                   m.mean_doc_len)["segment_ids"]
  B, T = seg_BT.shape
  dtype = layers.compute_dtype(mc)
  rng = np.random.default_rng(0)  # NumPy: XLA:CPU takes seconds to compile jax.random.normal
  shapes = ((B, T, mc.num_heads, mc.head_dim), (B, T, mc.num_kv_heads, mc.head_dim),
            (B, T, mc.num_kv_heads, mc.head_dim), (B, T, mc.num_heads, mc.head_dim))
  q, k, v, dout = (jax.device_put(rng.standard_normal(s, np.float32).astype(dtype), device)
                   for s in shapes)

  def masked(implementation, q, k, v):
    mask_B1TS = seg_BT[:, None, :, None] == seg_BT[:, None, None, :]
    return layers.dot_product_attention(q, k, v, mask_B1TS, is_causal=True,
                                        implementation=implementation)

  paths = {"xla": lambda *a: masked("xla", *a), "cudnn": lambda *a: masked("cudnn", *a),
           "cudnn_packed": lambda *a: packed_attention.packed_attention(
               *a, seg_BT, max_segments=mc.attention_max_segments)}

  def train(fn):
    def run(q, k, v, dout):
      out, vjp = jax.vjp(fn, q, k, v)
      return (out, *vjp(dout.astype(out.dtype)))
    return jax.jit(run)

  f32 = lambda a: a.astype(jnp.float32)
  ref = train(paths["xla"])(f32(q), f32(k), f32(v), f32(dout))
  rows = {"reference": "xla on float32 operands"}
  for name, fn in paths.items():
    if name == "cudnn" and jax.default_backend() != "gpu":
      rows[name] = {"status": "skipped (no cuDNN off GPU)"}
      continue
    step = train(fn).lower(q, k, v, dout).compile()  # compiled once, timed as is
    memory = step.memory_analysis()
    got = step(q, k, v, dout)
    error = max(float(jnp.max(jnp.abs(f32(g) - r)) / jnp.max(jnp.abs(r)))
                for g, r in zip(got, ref))
    rows[name] = {"fwd_bwd_s_median": median_seconds(step, q, k, v, dout,
                                                     repeats=2 if dry else 10),
                  "max_rel_error_vs_f32": error,
                  "temp_bytes": getattr(memory, "temp_size_in_bytes", None)}
  segments_B = jax.jit(packed_attention.segment_offsets, static_argnums=1)(
      seg_BT, mc.attention_max_segments)[2]
  result = {"batch": B, "seq_len": T, "heads": mc.num_heads, "kv_heads": mc.num_kv_heads,
            "head_dim": mc.head_dim, "dtype": str(jnp.dtype(dtype)),
            "attention_max_segments": mc.attention_max_segments,
            "segments_per_row_max": int(segments_B.max()), "segments": int(segments_B.sum()),
            "paths": rows}
  timed = {n: r["fwd_bwd_s_median"] for n, r in rows.items() if isinstance(r, dict) and
           "fwd_bwd_s_median" in r}
  if "cudnn" in timed:
    result["speedup_packed_over_bias"] = timed["cudnn"] / timed["cudnn_packed"]
  result["speedup_packed_over_xla"] = timed["xla"] / timed["cudnn_packed"]
  return result, config_lib.to_dict(cfg)


def planner_gpu(device_kind: str) -> str:
  """The planner's GPU key for a jax device kind ('NVIDIA H100 80GB HBM3' -> 'h100'); h100 when
  unknown (e.g. CPU), so the dry run exercises the same comparison."""
  from mai_jax import config as config_lib
  kind = device_kind.lower()
  return next((g for g in config_lib.GPU_TYPES if g in kind), "h100")


def measure_train(m: Measurement, steps: int, warmup: int) -> tuple[dict, dict]:
  """(result, config dict): benchmarks/train_step.py's measured step, and the planner's
  prediction for the same config on one GPU next to it."""
  import jax
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import train_step  # pylint: disable=import-outside-toplevel
  from mai_jax import cli, config as config_lib, plan as plan_lib

  cfg = cli.resolve_config(f"{EXPERIMENT}:{m.variant}", None, dict(m.overrides))
  result = train_step.run(cfg, steps, warmup, m.mean_doc_len)
  gpu = planner_gpu(jax.devices()[0].device_kind)
  predicted = plan_lib.plan(cfg, gpu, jax.device_count())
  measured_peak = result.get("peak_bytes_in_use")
  result["planner"] = {
      "gpu": gpu, "memory_per_device_bytes": predicted.memory,
      "step_time_s": predicted.step_time_s, "mfu": predicted.mfu,
      "memory_ratio_measured_over_planned": (measured_peak / predicted.memory["total"]
                                             if measured_peak else None),
      "step_time_ratio_measured_over_planned": (result["step_time_s_median"]
                                                / predicted.step_time_s),
  }
  return result, config_lib.to_dict(cfg)


def measure_torch_peer(m: Measurement, steps: int, warmup: int, dry: bool) -> tuple[dict, dict]:
  """(result, config dict): the same model trained by PyTorch + transformers (torch_peer.py);
  eager on CPU (the dry run), torch.compile on a GPU."""
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import torch_peer  # pylint: disable=import-outside-toplevel
  from mai_jax import cli, config as config_lib

  cfg = cli.resolve_config(f"{EXPERIMENT}:{m.variant}", None, dict(m.overrides))
  return torch_peer.run(cfg, steps, warmup, compile_model=not dry), config_lib.to_dict(cfg)


def run_one(m: Measurement, out_dir: str, steps: int, warmup: int, dry: bool, argv) -> dict:
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import train_step  # pylint: disable=import-outside-toplevel

  fields = {"measurement": m.name, "dry_run": dry, "gpu_info": gpu_info(),
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "env": {k: os.environ[k] for k in ("XLA_PYTHON_CLIENT_MEM_FRACTION",
                                               "CUDA_DEVICE_MAX_CONNECTIONS") if k in os.environ}}
  if m.kind == "attention":
    fields["mean_doc_len"] = m.mean_doc_len
    fields["result"], fields["config"] = measure_attention(m, dry)
  elif m.kind == "torch_peer":
    fields["mfu_formula"] = MFU_FORMULA
    fields["result"], fields["config"] = measure_torch_peer(m, steps, warmup, dry)
  elif m.variant:
    fields["mfu_formula"] = MFU_FORMULA
    fields["mean_doc_len"] = m.mean_doc_len
    fields["result"], fields["config"] = measure_train(m, steps, warmup)
  else:
    fields["result"] = measure_ceilings(dry)
  path = train_step.save_result("gpu_suite", argv, fields, os.path.join(out_dir, f"{m.name}.json"))
  return {"name": m.name, "status": "ok", "path": path, **_row(fields["result"])}


def _row(result: dict) -> dict:
  keys = ("step_time_s_median", "tokens_per_sec", "mfu", "peak_bytes_in_use", "matmul_tflops",
          "copy_gb_per_s", "speedup_packed_over_bias", "speedup_packed_over_xla")
  row = {k: result[k] for k in keys if k in result}
  if "planner" in result:
    row["planned_total_bytes"] = result["planner"]["memory_per_device_bytes"]["total"]
    row["planned_step_time_s"] = result["planner"]["step_time_s"]
  return row


# ----------------------------------------------------------------------------------------------
# The suite (parent process)


def child_command(name: str, args) -> list[str]:
  cmd = [sys.executable, os.path.abspath(__file__), "--one", name, "--out", args.out,
         "--steps", str(args.steps), "--warmup", str(args.warmup)]
  return cmd + (["--dry-run"] if args.dry_run else [])


def run_suite(args) -> list[dict]:
  names = args.only.split(",") if args.only else [
      m.name for m in MEASUREMENTS if m.in_dry_run or not args.dry_run]
  unknown = [n for n in names if n not in BY_NAME]
  if unknown:
    raise SystemExit(f"gpu_suite.py: error: unknown measurement(s) {', '.join(unknown)}; "
                     f"choose from {', '.join(BY_NAME)}")
  os.makedirs(args.out, exist_ok=True)
  # The children import this checkout's mai_jax, installed or not (sys.path[0] is benchmarks/).
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, (REPO, os.environ.get(
      "PYTHONPATH")))))
  if args.dry_run:
    env.update(JAX_PLATFORMS="cpu")
  start, rows = time.monotonic(), []
  for name in names:
    left = args.budget_s - (time.monotonic() - start)
    if left < 20:
      rows.append({"name": name, "status": "skipped (budget spent)"})
      continue
    try:
      proc = subprocess.run(child_command(name, args), capture_output=True, text=True, env=env,
                            timeout=left, cwd=REPO)
      row = _last_json_line(proc.stdout) if proc.returncode == 0 else None
      status, output = f"failed (exit {proc.returncode})", proc.stderr or proc.stdout
    except subprocess.TimeoutExpired as e:
      row, status = None, f"failed (over the budget, killed after {left:.0f} s)"
      output = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
    if row is None:
      tail = output.strip().splitlines()[-8:]
      row = {"name": name, "status": status, "error": "\n".join(tail)}
      with open(os.path.join(args.out, f"{name}.json"), "w") as f:
        json.dump({"measurement": name, **row}, f, indent=2)
    rows.append(row)
    print(f"[{time.monotonic() - start:6.0f} s] {name}: {row['status']}", flush=True)
  with open(os.path.join(args.out, "summary.json"), "w") as f:
    json.dump({"dry_run": args.dry_run, "wall_s": time.monotonic() - start, "rows": rows}, f,
              indent=2)
  return rows


def _last_json_line(text: str):
  for line in reversed(text.strip().splitlines()):
    if line.startswith("{"):
      try:
        return json.loads(line)
      except json.JSONDecodeError:
        return None
  return None


def format_table(rows: list[dict]) -> str:
  fmt = lambda v, spec: "-" if v is None else format(v, spec)
  lines = [f"{'measurement':<20} {'status':<10} {'step s':>8} {'plan s':>8} {'tok/s':>10} "
           f"{'MFU':>6} {'peak GB':>8} {'plan GB':>8}  other"]
  for r in rows:
    other = ""
    if "matmul_tflops" in r:
      other = f"matmul {r['matmul_tflops']:.0f} TFLOP/s, copy {r['copy_gb_per_s']:.0f} GB/s"
    if "speedup_packed_over_xla" in r:
      other = (f"cudnn_packed fwd+bwd: {fmt(r.get('speedup_packed_over_bias'), '.2f')}x cudnn bias"
               f", {r['speedup_packed_over_xla']:.2f}x xla")
    lines.append(
        f"{r['name']:<20} {r['status'][:10]:<10} {fmt(r.get('step_time_s_median'), '8.3f')} "
        f"{fmt(r.get('planned_step_time_s'), '8.3f')} {fmt(r.get('tokens_per_sec'), '10,.0f')} "
        f"{fmt(r.get('mfu'), '6.1%')} "
        f"{fmt(r.get('peak_bytes_in_use') and r['peak_bytes_in_use'] / 1e9, '8.2f')} "
        f"{fmt(r.get('planned_total_bytes') and r['planned_total_bytes'] / 1e9, '8.2f')}  {other}")
  return "\n".join(lines)


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", required=True, help="folder for one JSON per measurement")
  parser.add_argument("--dry-run", action="store_true",
                      help="toy shapes on CPU: checks the suite's code path (CI)")
  parser.add_argument("--budget-s", type=float, default=420.0,
                      help="stop starting measurements after this many seconds")
  parser.add_argument("--only", default="", help="comma-separated measurement names")
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child process
  args = parser.parse_args(argv)
  if args.one:
    m = BY_NAME[args.one]
    row = run_one(dry_run_measurement(m) if args.dry_run else m, args.out, args.steps,
                  args.warmup, args.dry_run, argv)
    print(json.dumps(row))
    return 0
  rows = run_suite(args)
  print(format_table(rows))
  return 0 if not any(r["status"].startswith("failed") for r in rows) else 1


if __name__ == "__main__":
  sys.exit(main())
