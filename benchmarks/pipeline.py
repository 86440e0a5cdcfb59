"""The pipelined step (mesh.stage > 1) against the plain step at the same shape, on 8 fake CPU devices.

  python benchmarks/pipeline.py [--steps 5] [--layers 8] [--depths 4 8 16] [--out FILE.json]

What it measures, and what to expect on a CPU host: the 8 fake devices share the host's cores, so a
step costs the sum of every device's work, not the slowest device's. A pipelined step runs all S
stages in each of its R M + S - 1 iterations, the (S - 1) bubble iterations included, so its
predicted cost is (R M + S - 1) / (R M) x the plain step's (1 / (1 - bubble)); `overhead` is the
measured ratio over that prediction (the schedule's own cost: the shift, the inbox, selects). On
GPUs the bubble costs time instead of work, the same factor.

Compile time vs depth: the layers are one scan inside the iteration scan, so compiling the pipelined
step should not grow with num_layers (`compile_s` per depth).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from mai_jax import config as C  # noqa: E402
from mai_jax import sharding as S  # noqa: E402
from mai_jax.model import pipeline  # noqa: E402
from mai_jax.train.trainer import build_trainer  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_step import save_result  # noqa: E402

MODEL = C.ModelConfig(num_layers=8, d_model=128, num_heads=4, num_kv_heads=4, head_dim=32,
                      d_ff=512, vocab_size=512, compute_dtype="float32", remat="full")
ROWS, SEQ = 16, 64


def _config(layers: int, mesh: C.MeshConfig, repeats=1, micro=0) -> C.Config:
  cfg = C.Config(model=dataclasses.replace(MODEL, num_layers=layers, pipeline_repeats=repeats,
                                           pipeline_microbatches=micro),
                 mesh=mesh, data=C.DataConfig(seq_len=SEQ),
                 train=C.TrainConfig(global_batch_size=ROWS))
  C.validate(cfg, jax.device_count())
  return cfg


def time_step(cfg: C.Config, steps: int) -> dict:
  """Compile time and median/min wall time of the jitted train step (after one warm-up)."""
  mesh = S.make_mesh(cfg.mesh)
  trainer = build_trainer(cfg, mesh, num_steps=steps + 1)
  state = trainer.init_state()
  rng = np.random.default_rng(0)
  tokens = rng.integers(1, MODEL.vocab_size, (ROWS, SEQ + 1)).astype(np.int32)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
           "segment_ids": np.ones((ROWS, SEQ), np.int32),
           "positions": np.tile(np.arange(SEQ, dtype=np.int32), (ROWS, 1))}
  batch = {k: jax.device_put(v, trainer.batch_sharding) for k, v in batch.items()}
  with S.activate(mesh, cfg.mesh.rules):
    t0 = time.perf_counter()
    compiled = trainer.jit_train_step().lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(steps):
      t0 = time.perf_counter()
      state, metrics = compiled(state, batch)
      jax.block_until_ready(metrics)
      times.append(time.perf_counter() - t0)
  return {"compile_s": compile_s, "median_s": statistics.median(times), "min_s": min(times)}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--layers", type=int, default=8)
  parser.add_argument("--depths", type=int, nargs="+", default=[4, 8, 16])
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  plain = time_step(_config(args.layers, C.MeshConfig(fsdp=-1)), args.steps)
  print(f"plain fsdp=8: {plain}", flush=True)
  rows = []
  for stages, repeats, micro in ((2, 1, 4), (2, 2, 4), (4, 1, 8)):
    mesh = C.MeshConfig(stage=stages, fsdp=-1)
    got = time_step(_config(args.layers, mesh, repeats, micro), args.steps)
    bubble = pipeline.bubble_fraction(stages, repeats, micro)
    ratio = got["median_s"] / plain["median_s"]
    rows.append({"stage": stages, "repeats": repeats, "microbatches": micro, **got,
                 "bubble": bubble, "ratio_to_plain": ratio, "predicted_ratio": 1 / (1 - bubble),
                 "overhead": ratio * (1 - bubble)})
    print(rows[-1], flush=True)
  depth = []
  for layers in args.depths:
    cfg = _config(layers, C.MeshConfig(stage=2, fsdp=-1), 1, 4)
    depth.append({"num_layers": layers, **time_step(cfg, 1)})
    print(depth[-1], flush=True)
  path = save_result("pipeline", list(sys.argv[1:] if argv is None else argv), {
      "shape": {"model": dataclasses.asdict(MODEL) | {"num_layers": args.layers},
                "global_batch_size": ROWS, "seq_len": SEQ, "devices": jax.device_count()},
      "timing": "median of --steps jitted train steps (AdamW) after one warm-up; compile_s is "
                "lower+compile of the step",
      "plain": plain, "pipelined": rows, "compile_vs_depth": depth,
      "load_average_1_5_15": os.getloadavg()}, args.out)
  print(f"wrote {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
