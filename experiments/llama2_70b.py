"""Llama 2 70B (Touvron et al., "Llama 2", 2023, Table 1, and the released config): published shape.

Shape: 80 layers, d_model 8192 (depth/width 1/102), 64 query heads of 128 with 8 KV heads (GQA was
introduced in Llama 2 for the 34B/70B models to keep inference memory in check), SwiGLU d_ff 28672
(3.5 x d_model, rounded to a multiple of 4096), 32,000-token SentencePiece vocabulary, RoPE theta
10,000, untied embeddings: 68,976,648,192 parameters (tests/test_experiments_scale.py).
Context 4,096; the paper's global batch of 4M tokens = 1,024 sequences.

Layout: 4,096 H100 (512 nodes): tensor=8 inside each node (64 heads -> 8 per GPU, one KV head per
GPU), fsdp=8 across nodes, data=64 replicas: 1,024 rows / 512 tensor groups = 2 rows of 4,096 per
group. remat 'dots' (projection outputs saved, ~63 GB per GPU) is the fastest layout that fits by
`mai-jax plan --search`, ~7% faster than 'full'.
Token budget: 2T tokens (the paper's pretraining corpus).

Variants:
  ci   the same model on 8 devices (the mesh pattern scaled down, config.scaled_to_devices)
"""

from mai_jax.config import (Config, DataConfig, MeshConfig, ModelConfig, OptimConfig, TrainConfig,
                            scaled_to_devices)

VARIANTS = ("ci",)
TARGET_GPUS = 4096
GLOBAL_BATCH = 1024
SEQ_LEN = 4096
TOKEN_BUDGET = 2 * 10**12


def get_config(variant=None) -> Config:
  cfg = Config(
      model=ModelConfig(num_layers=80, d_model=8192, num_heads=64, num_kv_heads=8, head_dim=128,
                        d_ff=28672, vocab_size=32000, rope_theta=10000.0, tie_embeddings=False,
                        param_dtype="float32", compute_dtype="bfloat16", remat="dots"),
      mesh=MeshConfig(data=-1, fsdp=8, tensor=8, target_gpu="h100", target_num_gpus=TARGET_GPUS),
      optim=OptimConfig(learning_rate=1.5e-4, warmup_steps=2000, schedule="cosine",
                        min_lr_ratio=0.1, weight_decay=0.1, grad_clip=1.0),
      data=DataConfig(seq_len=SEQ_LEN),
      train=TrainConfig(num_steps=TOKEN_BUDGET // (GLOBAL_BATCH * SEQ_LEN),
                        global_batch_size=GLOBAL_BATCH, token_budget=TOKEN_BUDGET, log_every=10,
                        progress_bar=False),
  )
  if variant == "ci":
    cfg = scaled_to_devices(cfg, 8, TARGET_GPUS)
  return cfg
