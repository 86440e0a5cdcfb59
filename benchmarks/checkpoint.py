"""Checkpoint cost: how long the training loop is blocked per save, background write speed, and
restore time, for a config on the current backend.

  python benchmarks/checkpoint.py --config experiments/tiny.py [--saves 3] [--every 100]
      [--config.SECTION.KEY=VALUE ...] [--out benchmarks/results/NAME.json]

A save is async (checkpoint.async_save): the loop is blocked only while the state is copied off
the devices and the save is started; orbax writes in the background and process 0 then writes the
manifest (sizes + CRC32). The figure of merit is `blocked_fraction`: blocked seconds per save over
the training time between two saves (`--every` steps x the measured step time); the goal is < 5%.
Restore time includes verifying the manifest's checksums.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_step import random_batch, time_steps, write_record  # noqa: E402

from mai_jax import cli, config as config_lib, sharding as sharding_lib  # noqa: E402
from mai_jax.checkpoint import Checkpointer  # noqa: E402
from mai_jax.model import count_params  # noqa: E402
from mai_jax.train.trainer import build_trainer  # noqa: E402


def _dir_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def run(cfg: config_lib.Config, saves: int, every: int, steps: int) -> dict:
  mesh = sharding_lib.make_mesh(cfg.mesh)
  config_lib.validate(cfg, jax.device_count())
  trainer = build_trainer(cfg, mesh)
  state = trainer.init_state()
  batch = random_batch(cfg, trainer.batch_sharding)
  with sharding_lib.activate(mesh, cfg.mesh.rules):
    step_fn = trainer.jit_train_step()
    state, m, _ = time_steps(step_fn, state, batch, 1)  # compile
    state, m, step_times = time_steps(step_fn, state, batch, steps)
    step_s = statistics.median(step_times)
    blocked, background, sizes = [], [], []
    with tempfile.TemporaryDirectory() as root:
      checkpointer = Checkpointer(os.path.join(root, "checkpoints"), cfg.checkpoint)
      for i in range(saves):
        state, m = step_fn(state, batch)
        jax.block_until_ready(state)
        t0 = time.perf_counter()
        checkpointer.save(i + 1, state, {"step": i + 1}, config_lib.to_dict(cfg), {})
        t1 = time.perf_counter()
        checkpointer.wait()  # a real run goes on training here
        t2 = time.perf_counter()
        blocked.append(t1 - t0)
        background.append(t2 - t1)
        sizes.append(_dir_bytes(checkpointer.step_dir(i + 1)))
      t0 = time.perf_counter()
      restored = checkpointer.restore_latest(trainer.abstract_state(), print)
      jax.block_until_ready(restored.state)
      restore_s = time.perf_counter() - t0
      checkpointer.close()
  blocked_s = statistics.median(blocked)
  write_s = statistics.median(background) + blocked_s
  return {"params": count_params(cfg.model), "checkpoint_bytes": sizes[-1],
          "step_time_s_median": step_s, "save_every_steps": every,
          "blocked_s_per_save_median": blocked_s, "blocked_s_all": blocked,
          "background_s_all": background,
          "write_bytes_per_s": sizes[-1] / write_s,
          "blocked_fraction": blocked_s / (every * step_s + blocked_s),
          "restore_s": restore_s, "async_save": cfg.checkpoint.async_save,
          "checksums": cfg.checkpoint.checksums}


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  rest, overrides = cli.split_overrides(argv)
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", required=True)
  parser.add_argument("--saves", type=int, default=3)
  parser.add_argument("--every", type=int, default=100, help="steps between saves in the run "
                      "this models (the config's checkpoint.every_steps is often larger)")
  parser.add_argument("--steps", type=int, default=5, help="steps timed for the step time")
  parser.add_argument("--out", default=None)
  args = parser.parse_args(rest)
  try:
    cfg = cli.resolve_config(args.config, None, overrides)
    result = run(cfg, args.saves, args.every, args.steps)
  except config_lib.ConfigError as e:
    print(f"checkpoint.py: error: {e}", file=sys.stderr)
    return 2
  out = write_record("checkpoint", args.config, argv, cfg, result, args.out)
  name = os.path.splitext(os.path.basename(args.config.split(":")[0]))[0]
  print(f"{name}: {result['checkpoint_bytes'] / 2**20:.0f} MB, blocked "
        f"{result['blocked_s_per_save_median'] * 1e3:.0f} ms per save = "
        f"{result['blocked_fraction']:.2%} of {args.every} steps of "
        f"{result['step_time_s_median']:.2f} s; write {result['write_bytes_per_s'] / 2**20:.0f} "
        f"MB/s; restore {result['restore_s']:.2f} s -> {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
