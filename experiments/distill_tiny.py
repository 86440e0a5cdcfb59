"""Distillation on the embedded corpus, small enough for a CPU: a teacher (tiny.py's smoke model,
2 layers, d_model 64) and a 4x smaller student (1 layer, d_model 32) trained either from scratch
or distilled from it on the same tokens for the same steps (tests/test_distill.py,
benchmarks/distill_curve.py).

Variants:
  teacher   (default) the teacher
  student   the student from scratch; distill it with
            --config.train.objective=distill --config.train.distill_teacher=TEACHER_WORKDIR
            --config.data.tokenizer_path=TEACHER_WORKDIR/tokenizer.model (the teacher's ids)
"""

import dataclasses

from mai_jax.config import sibling_experiment

VARIANTS = ("teacher", "student")


def _tiny():
  return sibling_experiment(__file__, "tiny")


def get_config(variant=None):
  cfg = _tiny().get_config("smoke")
  cfg = dataclasses.replace(
      cfg, optim=dataclasses.replace(cfg.optim, learning_rate=3e-3, schedule="constant"),
      checkpoint=dataclasses.replace(cfg.checkpoint, every_steps=0),
      train=dataclasses.replace(cfg.train, num_steps=60, eval_every=0, eval_batches=4,
                                log_every=1000))
  if variant in (None, "teacher"):
    return cfg
  if variant != "student":
    raise ValueError(f"unknown variant {variant!r}; variants: {', '.join(VARIANTS)}")
  return dataclasses.replace(
      cfg, model=dataclasses.replace(cfg.model, num_layers=1, d_model=32, num_heads=2,
                                     num_kv_heads=1, d_ff=64),
      train=dataclasses.replace(cfg.train, num_steps=30, distill_alpha=0.7))
