"""Phi-3-mini (Microsoft, "Phi-3 Technical Report", 2024): the published 3.8B shape, exactly.

Shape: 32 layers, d_model 3,072, 32 heads of 96 with 32 KV heads (full multi-head attention, no
GQA), SwiGLU d_ff 8,192, vocab 32,064 (Llama 2's 32K SentencePiece plus chat tokens), RoPE theta
10,000, untied embeddings, RMSNorm eps 1e-5: 3,821,079,552 parameters, equal to transformers'
Phi3Config(hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32,
vocab_size=32064) (tests/test_distill.py counts its model on the meta device). HF's fused qkv_proj
and gate_up_proj hold the same matrices as the separate projections here. Context 4,096 (the
4k model; HF's config also sets a 2,047-token sliding window, which mai_jax does not model).
Phi-3-mini was trained on 3.3T tokens.

Layout: 256 H100 (32 nodes): fsdp=8 inside each node, data=32 replicas across nodes, no tensor
parallelism (a 3.8B model's ~61 GB of float32 params + AdamW moments spread over 8 GPUs is
~8 GB each); global batch 1,024 x 4,096 = 4.2M tokens.

Variants:
  ci   the same model on 8 devices (the mesh pattern scaled down, config.scaled_to_devices)
"""

from mai_jax.config import (Config, DataConfig, MeshConfig, ModelConfig, OptimConfig, TrainConfig,
                            scaled_to_devices)

VARIANTS = ("ci",)
TARGET_GPUS = 256
TOKENS_PER_STEP = 1024 * 4096
TOKEN_BUDGET = 3_300 * 10**9


def model(vocab_size: int = 32064) -> ModelConfig:
  """Phi-3-mini's shape; another vocab_size gives a Phi-3-mini-class student of a teacher with
  that vocabulary (experiments/distill_mai1_phi3.py)."""
  return ModelConfig(num_layers=32, d_model=3072, num_heads=32, num_kv_heads=32, head_dim=96,
                     d_ff=8192, vocab_size=vocab_size, rope_theta=10000.0, tie_embeddings=False,
                     norm_eps=1e-5, param_dtype="float32", compute_dtype="bfloat16",
                     remat="dots")


def get_config(variant=None) -> Config:
  cfg = Config(
      model=model(),
      mesh=MeshConfig(data=-1, fsdp=8, target_gpu="h100", target_num_gpus=TARGET_GPUS),
      optim=OptimConfig(learning_rate=3e-4, warmup_steps=2000, schedule="cosine",
                        min_lr_ratio=0.1, weight_decay=0.1, grad_clip=1.0),
      data=DataConfig(seq_len=4096),
      train=TrainConfig(num_steps=TOKEN_BUDGET // TOKENS_PER_STEP, global_batch_size=1024,
                        token_budget=TOKEN_BUDGET, log_every=10, progress_bar=False),
  )
  if variant == "ci":
    cfg = scaled_to_devices(cfg, 8, TARGET_GPUS)
  return cfg
