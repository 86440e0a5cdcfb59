"""Shapes for measuring one H100/H200 (benchmarks/gpu_suite.py): a dense model and an MoE that
train on a single GPU with AdamW, at the sequence length large runs use.

  dense      1.14B parameters: 16 layers, d_model 2048, 16 query heads of 128 with 8 KV heads,
             SwiGLU d_ff 8192, vocab 32,000, seq 4,096, 8 rows (32K tokens) per step. AdamW state
             and float32 master weights take ~18 GB; the rest of 80 GB is for activations, so every
             remat policy (full, dots, none) can be compared on the same batch.
  moe        8 experts, top-2, d_ff_expert 4096 in every layer of a 12-layer, 1536-wide model
             (1.99B parameters, 0.63B active), seq 4,096, 8 rows, dropless routing.
  dry        the dense layout at toy size, for the suite's CPU dry run in CI
  moe_dry    the MoE layout at toy size, likewise

No data is read: the suite feeds random tokens already on the device (it measures the step).
"""

import dataclasses

from mai_jax.config import Config, DataConfig, MeshConfig, ModelConfig, OptimConfig, TrainConfig

VARIANTS = ("dense", "moe", "dry", "moe_dry")


def get_config(variant=None) -> Config:
  variant = variant or "dense"
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
  model = ModelConfig(num_layers=16, d_model=2048, num_heads=16, num_kv_heads=8, head_dim=128,
                      d_ff=8192, vocab_size=32000, rope_theta=500000.0, tie_embeddings=False,
                      param_dtype="float32", compute_dtype="bfloat16", remat="full")
  if variant in ("moe", "moe_dry"):
    model = dataclasses.replace(model, num_layers=12, d_model=1536, num_heads=12, num_kv_heads=4,
                                num_experts=8, experts_per_token=2, d_ff_expert=4096,
                                load_balance_loss_weight=0.01, router_z_loss_weight=1e-3)
  seq_len, rows = 4096, 8
  if variant in ("dry", "moe_dry"):
    model = dataclasses.replace(model, num_layers=2, d_model=64, num_heads=4, num_kv_heads=2,
                                head_dim=16, d_ff=128, d_ff_expert=64 if model.num_experts else 0,
                                vocab_size=256, compute_dtype="float32")
    seq_len, rows = 64, 8
  return Config(
      model=model,
      mesh=MeshConfig(data=1, fsdp=-1, target_gpu="h100", target_num_gpus=1),
      optim=OptimConfig(learning_rate=3e-4, warmup_steps=10, schedule="cosine", weight_decay=0.1,
                        grad_clip=1.0),
      data=DataConfig(seq_len=seq_len),
      train=TrainConfig(num_steps=1000, global_batch_size=rows, log_every=10,
                        progress_bar=False),
  )
