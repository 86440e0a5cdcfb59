"""MAI-1 -> a small on-device model: a Phi-3-mini-class student trained on the soft targets of the
~500B dense MAI-1 teacher (experiments/mai1_500b.py), read from a top-K cache written once.

Student: Phi-3-mini's shape (experiments/phi3_mini.py) with the teacher's 131,072-token vocabulary
(distillation needs one tokenizer: a student logit per teacher logit), 4,429,384,704 parameters
(Phi-3-mini's 3,821,079,552 plus 2 x 99,008 x 3,072 for the larger embedding and head).

Why a cache, not an online teacher (planner figures: mai_jax.metrics FLOPs per token at seq 4,096,
H100 bf16 peak 989.4 TFLOP/s at 40% MFU; planner_figures() below recomputes them, and
tests/test_distill.py checks these comments against it):
  teacher forward over 100B tokens     ~2,955 H100 GPU-days (2 x 498.6B params + attention / token)
  student training on 100B tokens          ~78 H100 GPU-days (6 x 4.4B params + attention / token)
  teacher / student per token               ~38x
Online, every student run pays the teacher again (~3,033 GPU-days per 100B tokens, 97% of it the
teacher); cached, the teacher's pass is paid once and each further student run (other sizes, seeds,
ablations) costs ~78. The cache is K=64 ids (int32) + log-probs (float16): 384 B per token, 38.4 TB
per 100B tokens (384 GB per 1B), on the same storage as the token cache.

Steps (`mai-jax data tokenize` with the teacher's tokenizer first):
  mai-jax distill cache --teacher runs/mai1_500b --data /data/tokens/web --top-k 64 --seq-len 4096
  mai-jax train --config experiments/distill_mai1_phi3.py --workdir runs/mai1_phi3
The loss: alpha = 0.9 of the forward KL at T = 1 over the cached top-64 plus the tail bin, 0.1 of
the data's cross-entropy (Minitron finds the logit loss alone best for a pruned student; a little
CE keeps the student anchored to the data where the top-64 truncates the teacher).
100B tokens for the student: Minitron's 8B/4B students reached their teacher's class with ~94B.

Variants:
  ci   the same run on 8 devices (config.scaled_to_devices)
"""

from mai_jax.config import (Config, DataConfig, MeshConfig, OptimConfig, TrainConfig,
                            scaled_to_devices, sibling_experiment)

VARIANTS = ("ci",)
TARGET_GPUS = 256
TOKENS_PER_STEP = 1024 * 4096
TOKEN_BUDGET = 100 * 10**9
TEACHER_VOCAB = 131072
MFU = 0.4
SEQ_LEN = 4096


def _experiment(name: str):
  return sibling_experiment(__file__, name)


def get_config(variant=None) -> Config:
  cfg = Config(
      model=_experiment("phi3_mini").model(vocab_size=TEACHER_VOCAB),
      mesh=MeshConfig(data=-1, fsdp=8, target_gpu="h100", target_num_gpus=TARGET_GPUS),
      optim=OptimConfig(learning_rate=3e-4, warmup_steps=1000, schedule="cosine",
                        min_lr_ratio=0.1, weight_decay=0.1, grad_clip=1.0),
      data=DataConfig(seq_len=SEQ_LEN, sources=(
          {"name": "web", "kind": "cache", "path": "/data/tokens/web"},)),
      train=TrainConfig(num_steps=TOKEN_BUDGET // TOKENS_PER_STEP, global_batch_size=1024,
                        token_budget=TOKEN_BUDGET, log_every=10, progress_bar=False,
                        objective="distill", distill_cache="topk64", distill_alpha=0.9,
                        distill_temperature=1.0),
  )
  if variant == "ci":
    cfg = scaled_to_devices(cfg, 8, TARGET_GPUS)
  return cfg


def planner_figures(tokens: float = 100e9, gpu: str = "h100") -> dict:
  """GPU-days of the teacher's forward (the cache) and of the student's training over `tokens`."""
  from mai_jax import hardware, metrics  # pylint: disable=import-outside-toplevel
  from mai_jax.model import count_params  # pylint: disable=import-outside-toplevel
  teacher = _experiment("mai1_500b").get_config().model
  student = get_config().model
  rate = hardware.GPUS[gpu].peak_bf16_flops * MFU
  forward = metrics.train_flops_per_token(teacher, count_params(teacher), SEQ_LEN) / 3
  train = metrics.train_flops_per_token(student, count_params(student), SEQ_LEN)
  days = lambda flops: flops * tokens / rate / 86400  # noqa: E731
  return {"teacher_cache_gpu_days": days(forward), "student_train_gpu_days": days(train),
          "ratio": forward / train, "student_params": count_params(student),
          "cache_bytes": tokens * 64 * (4 + 2)}
