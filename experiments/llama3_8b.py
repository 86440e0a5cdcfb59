"""Llama 3 8B (Meta, "The Llama 3 Herd of Models", 2024, Table 3): the published shape, exactly.

Shape: 32 layers, d_model 4096, 32 query heads of 128 with 8 KV heads (GQA: the KV cache and the
K/V projections shrink 4x at no measurable quality cost), SwiGLU d_ff 14336 (3.5 x d_model), vocab
128,256 (100K tiktoken BPE + 28K multilingual tokens), RoPE theta 500,000, untied embeddings:
8,030,261,248 parameters (tests/test_experiments_scale.py). Pretraining context 8,192.

Layout: 2,048 H100 (256 nodes). Not 15,360: an 8B model does not want the >= 15M-token batch that
one sequence per tensor group on 15,360 GPUs forces; Llama 3 trained with 4M-16M-token batches.
Here 512 x 8,192 = 4.2M tokens per step; tensor=4 inside a node (one sequence per 4 GPUs), fsdp=2
inside the node too, data=256 replicas across nodes, no remat (~35 GB per GPU): the fastest layout
that fits by `mai-jax plan --search` (fsdp across nodes would put the weight all-gathers on
InfiniBand, which one 8K-token row per group cannot hide).
Token budget: 15T tokens (the paper's pretraining corpus size).

Variants:
  ci   the same model on 8 devices (the mesh pattern scaled down, config.scaled_to_devices)
"""

from mai_jax.config import (Config, DataConfig, MeshConfig, ModelConfig, OptimConfig, TrainConfig,
                            scaled_to_devices)

VARIANTS = ("ci",)
TARGET_GPUS = 2048
TOKENS_PER_STEP = 512 * 8192
TOKEN_BUDGET = 15 * 10**12


def get_config(variant=None) -> Config:
  cfg = Config(
      model=ModelConfig(num_layers=32, d_model=4096, num_heads=32, num_kv_heads=8, head_dim=128,
                        d_ff=14336, vocab_size=128256, rope_theta=500000.0, tie_embeddings=False,
                        param_dtype="float32", compute_dtype="bfloat16", remat="none"),
      mesh=MeshConfig(data=-1, fsdp=2, tensor=4, target_gpu="h100", target_num_gpus=TARGET_GPUS),
      optim=OptimConfig(learning_rate=3e-4, warmup_steps=2000, schedule="cosine",
                        min_lr_ratio=0.01, weight_decay=0.1, grad_clip=1.0),
      data=DataConfig(seq_len=8192),
      train=TrainConfig(num_steps=TOKEN_BUDGET // TOKENS_PER_STEP, global_batch_size=512,
                        token_budget=TOKEN_BUDGET, log_every=10, progress_bar=False),
  )
  if variant == "ci":
    cfg = scaled_to_devices(cfg, 8, TARGET_GPUS)
  return cfg
