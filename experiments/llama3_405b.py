"""Llama 3 405B ("The Llama 3 Herd of Models", 2024, Table 3): the published shape.

Shape: 126 layers, d_model 16384 (depth/width 1/130), 128 query heads of 128 with 8 KV heads,
SwiGLU d_ff 53248 (3.25 x d_model), vocab 128,256, RoPE theta 500,000, untied embeddings:
405,853,388,800 parameters from these shapes (tests/test_experiments_scale.py). Context 8,192.

Layout: 16,384 H100 (2,048 nodes x 8), the scale and batch Meta trained it at (16K H100, 2,048 x
8,192 = 16.8M tokens per step at the end of its batch ramp; Meta ramped 4M -> 8M -> 16M tokens). Meta
used TP8 x PP16 x DP128. This layout is the plain one (no pipeline stages, no sequence
parallelism): tensor=8 inside each node, fsdp across nodes, data-parallel replicas over the rest,
one row per tensor group. Full remat: the residual stream is replicated over tensor, and at 126 x
8,192 x 16,384 bf16 the saved block inputs alone take 34 GB per GPU, so nothing more fits. With
stages and model.sequence_parallel `mai-jax plan --search` ranks faster layouts (MAI-1 dense's
docstring explains the switches).
Token budget: 15.6T tokens (the paper's pretraining corpus).

Variants:
  ci   the same model on 8 devices (the mesh pattern scaled down, config.scaled_to_devices)
"""

from mai_jax.config import (Config, DataConfig, MeshConfig, ModelConfig, OptimConfig, TrainConfig,
                            scaled_to_devices)

VARIANTS = ("ci",)
TARGET_GPUS = 16384
GLOBAL_BATCH = 2048
SEQ_LEN = 8192
TOKEN_BUDGET = 15_600 * 10**9


def get_config(variant=None) -> Config:
  cfg = Config(
      model=ModelConfig(num_layers=126, d_model=16384, num_heads=128, num_kv_heads=8,
                        head_dim=128, d_ff=53248, vocab_size=128256, rope_theta=500000.0,
                        tie_embeddings=False, param_dtype="float32", compute_dtype="bfloat16",
                        remat="full"),
      mesh=MeshConfig(data=-1, fsdp=64, tensor=8, target_gpu="h100", target_num_gpus=TARGET_GPUS),
      optim=OptimConfig(learning_rate=8e-5, warmup_steps=8000, schedule="cosine",
                        min_lr_ratio=0.01, weight_decay=0.1, grad_clip=1.0),
      data=DataConfig(seq_len=SEQ_LEN),
      train=TrainConfig(num_steps=TOKEN_BUDGET // (GLOBAL_BATCH * SEQ_LEN),
                        global_batch_size=GLOBAL_BATCH, token_budget=TOKEN_BUDGET, log_every=10,
                        progress_bar=False),
  )
  if variant == "ci":
    cfg = scaled_to_devices(cfg, 8, TARGET_GPUS)
  return cfg
