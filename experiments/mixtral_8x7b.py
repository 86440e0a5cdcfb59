"""Mixtral-8x7B (Mistral AI, 2024) shape: 32 layers, d_model 4096, 32 query / 8 KV heads of 128,
8 SwiGLU experts of d_ff 14336 with top-2 softmax routing in every layer, vocab 32000, RoPE theta
1e6, untied embeddings: 46,702,792,704 parameters, 12,879,925,248 active per token.

The run settings are a starting point for one node of 8 GPUs (experts over the `expert` axis,
everything else fully sharded); `mai-jax plan` sizes it for other meshes.
"""

from mai_jax.config import Config, DataConfig, MeshConfig, ModelConfig, OptimConfig, TrainConfig


def get_config(variant=None) -> Config:
  del variant
  return Config(
      model=ModelConfig(num_layers=32, d_model=4096, num_heads=32, num_kv_heads=8, head_dim=128,
                        d_ff=14336, vocab_size=32000, rope_theta=1e6, tie_embeddings=False,
                        norm_eps=1e-5, compute_dtype="bfloat16", remat="full",
                        num_experts=8, experts_per_token=2, router="softmax_topk",
                        load_balance_loss_weight=0.02),
      mesh=MeshConfig(data=1, fsdp=-1, expert=8),
      optim=OptimConfig(learning_rate=3e-4, warmup_steps=2000, schedule="cosine"),
      data=DataConfig(seq_len=4096),
      train=TrainConfig(num_steps=100_000, global_batch_size=512, microbatches=8),
  )
