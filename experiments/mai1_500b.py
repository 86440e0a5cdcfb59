"""MAI-1 class, ~500B parameters: a dense and a Mixture-of-Experts design for 15,360 H100.

`:dense` (the default), 498,589,747,200 parameters (exact, tests/test_experiments_scale.py):
  120 layers, d_model 18,432: Llama 3 405B's recipe (126 x 16,384) scaled by width. Kaplan et al.
    2020 find loss flat over a wide range of aspect ratios (d_model / layers ~ 50-200); 154 is a
    little wider than Llama 3 405B (130) and GPT-3 175B (12,288 / 96 = 128), which keeps the
    sequential depth (per-layer collectives, remat carries) below 405B's 126 layers.
  144 query heads of 128 (head_dim 128 as every Llama; 144 = 18 per GPU at tensor=8), 8 KV heads
    (GQA, one KV head per tensor rank: the KV projections stay unreplicated and the KV cache small).
  SwiGLU d_ff 61,440 = 10/3 x d_model (the 8/3 x 1.25 multiplier Llama uses), a multiple of
    8 x 128 so every tensor shard is MMA-aligned.
  vocab 131,072 = 2^17: the 128K class of Llama 3's tokenizer (better compression of code and
    non-English text than 32K), a power of two so it shards evenly over tensor=8 with no padding.
  context 8,192 for pretraining (long context is a later, cheaper extension phase, as in Llama 3).
  Untied embeddings, RoPE theta 500,000 (Llama 3's choice for 8K and beyond).
  Layout for 15,360 H100 (1,920 nodes x 8), chosen by `mai-jax plan --search` with the pipeline
  terms (docs/planner.md): stage=5 x fsdp=384 x tensor=8 (data=1), pipeline_repeats=12 (2 layers
  per virtual stage), pipeline_microbatches=5, train.microbatches=2, remat 'dots',
  sequence_parallel, pipeline_stage_remat=False; 61.8 GB of 72 GB usable per GPU.
  Why this split, in the planner's physics for this codebase's pipeline (model/pipeline.py):
  - The stages exist to cut what FSDP moves: each GPU gathers only its stage's layers, once per
    step (model.pipeline_gather_once; gathering per iteration instead: 29.9%). With no stages the
    all-gathers bound the step (about 33%).
  - pipeline_stage_remat=False: the blocks' 'dots' policy alone decides what each iteration keeps
    (the projection outputs; the attention core is recomputed), so the backward does not run a
    second stage forward. With the whole-stage checkpoint this layout predicts 35.3% (17.8 GB):
    the recompute costs 1.33x the block FLOPs. remat 'none' would be 47.8% but needs 92.5 GB;
    'full' 35.7%.
  - sequence_parallel with tensor=8: the residual stream, norms and the stage buffers split over
    the tensor GPUs of a node (Megatron-LM's sequence parallelism), so every iteration's saved
    activations shrink 8-fold and each tensor rank sends 1/8 of a stage's output. Without it:
    171 GB (39.2% if it fit). tensor=8 keeps the 144 query and 8 KV heads evenly split.
  - train.microbatches=2: the step runs the pipeline twice on 1,920 rows each, so the scan keeps
    half the iterations' activations (120 GB with one); the second bubble costs nothing the planner
    can see at this size (46.9% both ways).
  - stage=5, R=12, M_p=5: bubble (S-1)/(R M + S - 1) = 4/64 = 6.2%; fsdp=384 divides d_model
    18,432; data=1 takes the rest. The stages split the batch rows for the output layer and loss.
  Global batch 3,840 x 8,192 = 31.5M tokens: twice Llama 3 405B's 16M, half DeepSeek-V3's 63M;
    DeepSeek LLM's batch-size law (0.292 C^0.327 tokens) gives ~63M at this run's 3e25 FLOPs, so
    31.5M is inside the flat optimum, and at 15.7M the bubble and the fixed per-step FSDP traffic
    cost MFU points.
  Predicted: 46.9% MFU, 13.6 s a step, ~50 days for 10T tokens (`mai-jax plan --config
  experiments/mai1_500b.py`); `--compile` compiles this layout's sharded step at 24 layers on 8
  CPU devices (planned peak within 11% of XLA's).
  Token budget: 10T tokens, Chinchilla-optimal (Hoffmann et al. 2022: ~20 tokens per parameter);
  the planner puts it at ~50 days on 15,360 H100, so training longer is a schedule decision.

`:moe`: same vocab and attention family, narrower and fine-grained, pretrained at 4,096 context:
  64 layers, d_model 8,192, 64 heads of 128, 8 KV heads, every layer MoE with 128 routed experts
  of d_ff_expert 2,560, 8 routed per token, 1 shared expert (DeepSeek-MoE's fine-grained + shared
  design: more expert combinations at the same FLOPs). Parameters (mai_jax.model.count_params /
  count_active_params): ~531B total, ~48B active per token (9 x 3 x 8,192 x 2,560 = 0.57B expert
  weights per token and layer). capacity_factor 1.25: 320 slots per expert per 4,096-token
  sequence. Batch 15,360 rows x 4,096 = 63M tokens, DeepSeek-V3's final batch size; the context
  is extended after pretraining as theirs was. Token budget 10T as `:dense`.
  No leading dense layers (DeepSeek-V3 keeps 3, this design had 2): under pipeline stages this
  codebase runs the first_dense_layers before the schedule, on every stage over all its rows
  (model/transformer.py), so S stages compute them S times, and the 62 MoE blocks they leave
  split over 2 stages only (the stages divide the MoE stack). With 2 dense layers in front of 64
  MoE blocks (66 layers) the best layout predicts 28.9%.
  Layout for 15,360 H100, from `mai-jax plan --search` (docs/planner.md "MAI-1 MoE: what each
  switch buys"): expert=8 x fsdp=16 x stage=8 x data=15, tensor 1, pipeline_repeats=8 (one MoE
  block per virtual stage), pipeline_microbatches=8 (one row each), remat 'dots',
  pipeline_stage_remat=False, fp8 dispatch, the two-half overlap; 61.7 GB of 72 GB usable.
  Why, in the planner's physics:
  - expert=8 inside a node: the all-to-all runs on NVLink (0.53 s a step) and the two halves
    hide it under the expert GEMMs. Over 8 nodes (expert=64) it crosses InfiniBand: 5.5 s flat,
    1.7 s even hierarchical with node-limited routing (4 of 8 nodes), fp8 dispatch and the
    overlap (23.7% at best).
  - With experts replicated over 1,920 nodes their weights must be FSDP-sharded, and FSDP over
    InfiniBand is what bounds expert=8 without stages (fsdp=128: 10.2%): 8 stages cut each GPU's
    gathered weights 8-fold (its stage's 8 blocks, gathered once per step: 67 GB, 1.7 s,
    overlapped).
  - pipeline_stage_remat=False with 'dots': the projections are saved, the routed experts (and
    their all-to-alls) recomputed in the backward; the whole-stage checkpoint would recompute
    every stage on top (31.3%, 48.0 GB); remat 'full' 36.1% (48.2 GB).
  - The two-half overlap hides the 0.53 s NVLink all-to-all under the expert GEMMs (without it
    32.5%); fp8 dispatch then changes nothing the planner sees (it shrinks the all-to-all the
    overlap already hides: a margin if XLA's scheduler does not overlap as planned).
  - R=8, M_p=8: bubble 7 / 71 = 9.9%.
  (The alternatives' memory figures above were planned before the planner's remat correction,
  mai_jax/plan_remat.py: no policy keeps mlp_down's output, which took this layout from 66.4 GB
  to 61.7 GB.)
  Predicted 38.5% MFU, 3.18 s a step, ~5.8 days for 10T tokens (`mai-jax plan --config
  experiments/mai1_500b.py:moe`). The old layout (expert=64 x fsdp=8 x data=30, 2 dense
  layers, no stages): 13.6%.

Variants:
  dense     the default
  moe       MoE (see above)
  ci        :dense on 8 devices (the mesh pattern scaled down, config.scaled_to_devices)
"""

import dataclasses

from mai_jax.config import (Config, DataConfig, MeshConfig, ModelConfig, OptimConfig,
                            TrainConfig, scaled_to_devices)

VARIANTS = ("dense", "moe", "ci")
TARGET_GPUS = 15360
GLOBAL_BATCH = 3840
SEQ_LEN = 8192
TOKEN_BUDGET = 10 * 10**12
MOE_GLOBAL_BATCH = 15360
MOE_SEQ_LEN = 4096

# The MoE fields of `:moe` (ModelConfig names used by the MoE model). router is left at the MoE
# model's default.
MOE_FIELDS = dict(num_experts=128, experts_per_token=8, num_shared_experts=1, d_ff_expert=2560,
                  moe_layer_interval=1, first_dense_layers=0, capacity_factor=1.25,
                  moe_dispatch_dtype="float8_e4m3fn", moe_overlap_halves=True)


def dense() -> Config:
  return Config(
      model=ModelConfig(num_layers=120, d_model=18432, num_heads=144, num_kv_heads=8,
                        head_dim=128, d_ff=61440, vocab_size=131072, rope_theta=500000.0,
                        tie_embeddings=False, param_dtype="float32", compute_dtype="bfloat16",
                        remat="dots", pipeline_repeats=12, pipeline_microbatches=5,
                        pipeline_stage_remat=False, sequence_parallel=True),
      mesh=MeshConfig(data=-1, stage=5, fsdp=384, tensor=8, target_gpu="h100",
                      target_num_gpus=TARGET_GPUS),
      optim=OptimConfig(learning_rate=8e-5, warmup_steps=8000, schedule="wsd",
                        min_lr_ratio=0.01, decay_fraction=0.1, weight_decay=0.1, grad_clip=1.0),
      data=DataConfig(seq_len=SEQ_LEN),
      train=TrainConfig(num_steps=TOKEN_BUDGET // (GLOBAL_BATCH * SEQ_LEN),
                        global_batch_size=GLOBAL_BATCH, microbatches=2,
                        token_budget=TOKEN_BUDGET, log_every=10,
                        z_loss_weight=1e-4, progress_bar=False),
  )


def moe() -> Config:
  cfg = dense()
  model = dataclasses.replace(cfg.model, num_layers=64, d_model=8192, num_heads=64,
                              num_kv_heads=8, head_dim=128, d_ff=28672, remat="dots",
                              pipeline_repeats=8, pipeline_microbatches=8,
                              pipeline_stage_remat=False, sequence_parallel=False, **MOE_FIELDS)
  return dataclasses.replace(
      cfg, model=model,
      mesh=dataclasses.replace(cfg.mesh, data=-1, stage=8, fsdp=16, expert=8, tensor=1),
      data=dataclasses.replace(cfg.data, seq_len=MOE_SEQ_LEN),
      train=dataclasses.replace(cfg.train, global_batch_size=MOE_GLOBAL_BATCH, microbatches=1,
                                num_steps=TOKEN_BUDGET // (MOE_GLOBAL_BATCH * MOE_SEQ_LEN)))


def get_config(variant=None) -> Config:
  if variant == "moe":
    return moe()
  if variant == "ci":
    return scaled_to_devices(dense(), 8, TARGET_GPUS)
  return dense()
