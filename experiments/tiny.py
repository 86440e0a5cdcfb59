"""Tiny Llama-shaped decoder trained on the embedded corpus (the interpreter's standard library).

The default is the README's main job: a few minutes on 2 CPU cores, the loss falls from
~ln(4096) = 8.3 by well over 3 nats. Its shape is the one benchmarks/maxtext_tiny.sh trains
with MaxText (4 layers, d_model 256, 4 heads of 64, d_ff 1024, vocab 4096, seq 256, batch 8, bf16
compute), so the two step times compare directly. bf16 compute is also the faster choice on the
2-core CPU (benchmarks/results/train_step_tiny_fp32_cpu.json: float32 compute is ~1.4x slower).
remat 'dots' (save the projection outputs, recompute the attention core) is as fast as 'full'
(MaxText's default) here and recomputes less; saving everything ('none') is 14% slower: the layer
scan stacks the float32 attention probabilities [layers, B, H, T, T] and converts them back in the
backward, more memory traffic than recomputing them (jax 0.10.2, 2 cores, 20 steps each:
dots 0.76-0.77 s/step, full 0.77 s, none 0.88 s; benchmarks/results/train_step_tiny_remat_*_cpu.json).

Variants:
  smoke   a few steps of a much smaller model, for end-to-end tests of the CLI and resume
  tp      the default on an fsdp x tensor mesh (needs an even device count)
  moe     the default with 8 top-2 experts of d_ff 512 in every layer (the active FFN FLOPs equal
          the dense model's d_ff 1024), load-balancing and router z-losses; float32 compute,
          since bf16 grouped matmuls are ~2.5x slower on CPU (benchmarks/results/moe_layer_*cpu.json)
  moe_quick  the smoke model with 4 experts (sigmoid_bias router), for end-to-end tests
"""

import dataclasses

from mai_jax.config import (CheckpointConfig, Config, DataConfig, MeshConfig, ModelConfig,
                            OptimConfig, TrainConfig)

VARIANTS = ("smoke", "tp", "moe", "moe_quick")


def get_config(variant=None) -> Config:
  cfg = Config(
      model=ModelConfig(num_layers=4, d_model=256, num_heads=4, num_kv_heads=4, head_dim=64,
                        d_ff=1024, vocab_size=4096, rope_theta=10000.0, tie_embeddings=False,
                        compute_dtype="bfloat16", remat="dots"),
      mesh=MeshConfig(data=1, fsdp=-1),
      optim=OptimConfig(learning_rate=3e-3, warmup_steps=25, schedule="cosine", weight_decay=0.1,
                        grad_clip=1.0),
      data=DataConfig(seq_len=256, tokenizer_train_chars=3_000_000),
      checkpoint=CheckpointConfig(every_steps=125, max_to_keep=2),
      train=TrainConfig(num_steps=250, global_batch_size=8, log_every=10, eval_every=125,
                        eval_batches=4),
  )
  if variant in ("smoke", "moe_quick"):
    cfg = dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, num_layers=2, d_model=64, num_heads=4, num_kv_heads=2,
                                  head_dim=16, d_ff=128, vocab_size=512, compute_dtype="float32"),
        data=dataclasses.replace(cfg.data, seq_len=64, max_files=60,
                                 tokenizer_train_chars=300_000),
        checkpoint=dataclasses.replace(cfg.checkpoint, every_steps=4),
        train=dataclasses.replace(cfg.train, num_steps=8, global_batch_size=8, log_every=1,
                                  eval_every=4, eval_batches=2, progress_bar=False),
        optim=dataclasses.replace(cfg.optim, warmup_steps=2))
  elif variant == "tp":
    cfg = dataclasses.replace(cfg, mesh=MeshConfig(data=1, fsdp=-1, tensor=2))
  if variant == "moe":
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(
        cfg.model, num_experts=8, experts_per_token=2, d_ff_expert=512, compute_dtype="float32",
        load_balance_loss_weight=0.01, router_z_loss_weight=1e-3))
  elif variant == "moe_quick":
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(
        cfg.model, num_experts=4, experts_per_token=2, router="sigmoid_bias",
        router_bias_update_rate=1e-3, router_z_loss_weight=1e-3))
  return cfg
