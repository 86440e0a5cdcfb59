"""Does distillation help? Validation loss curves of the same small student trained from scratch
and distilled from a teacher (online, train.objective=distill), same tokens, same steps, on the
embedded corpus (experiments/distill_tiny.py).

  python benchmarks/distill_curve.py [--teacher-steps 60] [--student-steps 60] [--eval-every 10]
      [--alpha 0.7] [--temperature 1.0] [--out benchmarks/results/distill_cpu.json]

The teacher is trained first (its tokenizer too); both students read its tokenizer, so their
validation windows are the same tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_step import save_result  # noqa: E402

from mai_jax import config as config_lib  # noqa: E402
from mai_jax.train import loop  # noqa: E402

EXPERIMENT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "experiments", "distill_tiny.py")


def _curve(workdir: str) -> list[list[float]]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return [[r["step"], r["eval_loss"]] for r in rows if "eval_loss" in r]


def run(args, root: str) -> dict:
  teacher_dir = os.path.join(root, "teacher")
  teacher = config_lib.apply_overrides(config_lib.load_experiment(EXPERIMENT + ":teacher"), {
      "train.num_steps": str(args.teacher_steps)})
  start = time.perf_counter()
  t = loop.train(teacher, teacher_dir)
  out = {"teacher": {"steps": args.teacher_steps, "eval_loss": t.eval_loss,
                     "seconds": time.perf_counter() - start}}
  common = {"train.num_steps": str(args.student_steps), "train.eval_every": str(args.eval_every),
            "data.tokenizer_path": repr(os.path.join(teacher_dir, "tokenizer.model"))}
  distill = {"train.objective": "'distill'", "train.distill_teacher": repr(teacher_dir),
             "train.distill_alpha": str(args.alpha),
             "train.distill_temperature": str(args.temperature)}
  for name, extra in (("scratch", {}), ("distilled", distill)):
    cfg = config_lib.apply_overrides(config_lib.load_experiment(EXPERIMENT + ":student"),
                                     {**common, **extra})
    config_lib.validate(cfg)
    start = time.perf_counter()
    result = loop.train(cfg, os.path.join(root, name))
    out[name] = {"eval_loss": result.eval_loss, "curve": _curve(os.path.join(root, name)),
                 "seconds": time.perf_counter() - start}
  out["distilled_minus_scratch"] = out["distilled"]["eval_loss"] - out["scratch"]["eval_loss"]
  return out


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--teacher-steps", type=int, default=60)
  parser.add_argument("--student-steps", type=int, default=60)
  parser.add_argument("--eval-every", type=int, default=10)
  parser.add_argument("--alpha", type=float, default=0.7)
  parser.add_argument("--temperature", type=float, default=1.0)
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  with tempfile.TemporaryDirectory(prefix="mai_jax_distill_") as root:
    result = run(args, root)
  out = save_result("distill_curve", argv, {"experiment": "experiments/distill_tiny.py",
                                            "alpha": args.alpha,
                                            "temperature": args.temperature, "result": result},
                    args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                             "results", "distill_cpu.json"))
  print(json.dumps(result, indent=2))
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
