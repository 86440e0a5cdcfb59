"""Typed experiment configuration: frozen dataclasses per section, loading, overrides, validation.

Why frozen dataclasses and Python experiment files: a config is code a researcher can read, diff and
compose (`dataclasses.replace`), every field has a type the CLI can parse overrides against, and a
typo is an error that names the valid keys instead of a silently ignored YAML entry.

This module imports nothing from the package (see docs: imports run one way).
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.util
import json
import math
import os
import re
import types
import typing
from typing import Any, Optional, Tuple

MESH_AXES = ("data", "stage", "fsdp", "expert", "tensor")


class ConfigError(ValueError):
  """A configuration problem a user can fix; the message names the key and the fix."""


# Logical axis name -> mesh axes. The model speaks logical names only; switching FSDP / tensor /
# expert parallelism is an edit here. When one array uses a mesh axis twice, the earlier dimension
# keeps it (so activations ('batch','seq','embed') shard batch over fsdp and leave embed whole, while
# parameters ('embed','mlp') shard embed over fsdp).
DEFAULT_RULES: Tuple[Tuple[str, Tuple[str, ...]], ...] = (
    ("batch", ("data", "fsdp", "expert")),
    ("seq", ()),
    ("embed", ("fsdp",)),
    ("vocab", ("tensor",)),
    ("heads", ("tensor",)),
    ("kv_heads", ("tensor",)),
    ("head_dim", ()),
    ("mlp", ("tensor",)),
    ("experts", ("expert",)),
    ("layers", ("stage",)),
    ("norm", ()),
)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Decoder shape and numerics (Llama family)."""
  num_layers: int = 4
  d_model: int = 256
  num_heads: int = 4
  num_kv_heads: int = 4
  head_dim: int = 64
  d_ff: int = 1024
  vocab_size: int = 4096
  rope_theta: float = 10000.0
  tie_embeddings: bool = False
  norm_eps: float = 1e-5
  init_std: float = 0.02
  param_dtype: str = "float32"
  compute_dtype: str = "bfloat16"
  # What each block keeps for its backward (model/remat.py, by checkpoint_name tags): 'none' all
  # activations; 'full' only its input (recompute the block); 'dots' every projection output;
  # 'attn_proj' attention's q/k/v/o outputs (the MLP is recomputed); 'qkv_proj' q/k/v only.
  remat: str = "full"
  scan_layers: bool = True
  # 'auto' picks cuDNN flash attention on GPU and XLA elsewhere; 'cudnn_packed': cuDNN's
  # sequence-packing mode for document masking (mai_jax/model/packed_attention.py).
  attention_impl: str = "auto"
  # 'cudnn_packed': most segments (documents, plus the padding run) in one packed row.
  attention_max_segments: int = 32
  # fp8 matmuls for the attention and MLP projections (model/fp8_matmul.py; the [fp8] extra):
  # 'off', or 'current' (E4M3 forward, E5M2 gradients, one scale per tensor from its own amax).
  fp8: str = "off"
  # Llama 3.1-style RoPE frequency scaling (HF rope_type 'llama3'); factor 1.0 means none.
  rope_scaling_factor: float = 1.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_len: int = 8192
  # Mixture-of-Experts (mai_jax/model/moe.py). num_experts=0: a dense model.
  num_experts: int = 0
  experts_per_token: int = 2
  num_shared_experts: int = 0
  d_ff_expert: int = 0  # 0: use d_ff
  # After the first `first_dense_layers` dense layers, every `moe_layer_interval`-th layer is MoE
  # (layer i is MoE iff (i - first_dense_layers + 1) % moe_layer_interval == 0).
  moe_layer_interval: int = 1
  first_dense_layers: int = 0
  # 'softmax_topk' (Mixtral: softmax over all experts, top-k, renormalize over the chosen);
  # 'sigmoid_bias' (DeepSeek-V3: sigmoid scores, a bias added for selection only, updated from the
  # realized load outside the gradient by router_bias_update_rate * sign(mean load - load)).
  router: str = "softmax_topk"
  # Node-limited (group-limited) routing (DeepSeek-V2/V3): the experts form router_groups contiguous
  # groups of num_experts / router_groups (a group = the experts of one node, as the 'expert' mesh
  # axis places them); each token keeps its router_topk_groups best groups, then picks its top-k
  # experts inside them. 0 or 1: off (ungrouped routing).
  router_groups: int = 0
  router_topk_groups: int = 0
  capacity_factor: Optional[float] = None  # None: dropless
  router_z_loss_weight: float = 0.0
  load_balance_loss_weight: float = 0.0
  router_bias_update_rate: float = 0.0
  # Dropless expert parallelism: rows of each device's send buffer per destination device, as a
  # multiple of the balanced load (local tokens x experts_per_token / expert devices); overflow is
  # dropped and counted in moe/dropped_fraction. None: the exact worst case (ep x the balanced
  # load). Capacity mode needs no bound: its buffers hold capacity_factor x the balanced load.
  expert_buffer_factor: Optional[float] = None
  # Wire format of the expert-parallel dispatch all-to-all (model/fp8_dispatch.py): 'compute' (the
  # compute dtype) or 'float8_e4m3fn' (DeepSeek-V3's fp8 dispatch: tokens quantized with one float32
  # scale per 1x128 block, per token when 128 does not divide d_model; straight-through gradient in
  # the compute dtype). The combine and the backward stay in the compute dtype.
  moe_dispatch_dtype: str = "compute"
  # Split each MoE layer's tokens into two halves of every device's rows and route, dispatch, run
  # and combine them as independent computations (the shared experts on the whole input), so the
  # scheduler can run one half's all-to-all under the other half's expert GEMMs (DeepSeek-V3's
  # micro-batch overlap). Same outputs and router statistics; an odd local batch (decode) runs
  # unsplit; with expert_buffer_factor the bound applies per half. model/moe.py MoE.__call__.
  moe_overlap_halves: bool = False
  # Hierarchical expert-parallel dispatch (DeepSeek-V3): the 'expert' mesh axis viewed as
  # (mesh.expert / n) nodes x n devices per node; a token bound for several experts on one node
  # crosses the inter-node link once, then is fanned out inside the node; the combine is the
  # reverse. 0: the flat all-to-all over the whole axis (model/moe.py).
  expert_devices_per_node: int = 0
  # Pipeline parallelism (model/pipeline.py; active when mesh.stage > 1). Each device holds
  # pipeline_repeats non-adjacent slices of num_layers / (stage x repeats) layers (circular /
  # interleaved schedule; 1: GPipe), and each (gradient-accumulation) microbatch is split into
  # pipeline_microbatches pieces that flow through the stages (0: one per stage). Neither changes
  # the parameters or the computed function, only how the step is scheduled.
  pipeline_repeats: int = 1
  pipeline_microbatches: int = 0
  # FSDP inside a stage: all-gather each stage's weights once per step, before the schedule (True),
  # or inside every iteration, i.e. once per pipeline microbatch (False: less memory, M x the
  # all-gather traffic).
  pipeline_gather_once: bool = True
  # Checkpoint each pipeline iteration's whole stage (True: the scan keeps only the stage inputs
  # and the backward recomputes the stage forward, so any remat policy costs a full extra
  # forward) or not (False: the blocks' own `remat` policy decides what is kept, per iteration;
  # 'dots' then recomputes only the attention core, at the memory of every iteration's saved
  # projections).
  pipeline_stage_remat: bool = True
  # Sequence parallelism (Megatron-LM, Korthikanti et al. 2022): the residual stream [B, T, D]
  # between sub-layers (and the pipeline's stage buffers) splits T over the axes 'heads' maps to
  # ('tensor'), so the norms, residual adds and the activations saved for backward shrink with the
  # tensor size; attention and the MLP still see the whole sequence (an all-gather before, a
  # reduce-scatter after, instead of one all-reduce). A ModelConfig key, not a MeshConfig one,
  # because the model applies it where it constrains the residual (sharding.sequence_parallelism),
  # like remat: the function computed is the same; only activation memory and elementwise time
  # change. data.seq_len must divide by the tensor shards; shorter inputs (decoding steps of one
  # token) keep the sequence whole.
  sequence_parallel: bool = False


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Device mesh sizes (-1: all remaining devices) and the logical-axis rules."""
  data: int = 1
  # Pipeline stages: the 'layers' axis of the stacked blocks is split over them (model/pipeline.py).
  stage: int = 1
  fsdp: int = -1
  expert: int = 1
  tensor: int = 1
  rules: Tuple[Tuple[str, Tuple[str, ...]], ...] = DEFAULT_RULES
  # ZeRO-1: optimizer moments also split over 'data' (train/state.py), the weights stay replicated
  # over it; with pipeline stages this replaces FSDP within a stage when weights fit.
  zero1: bool = False
  # The hardware this layout is designed for: `mai-jax plan` uses it unless --gpu/--gpus say
  # otherwise (0 GPUs: none declared, plan then needs --gpus). Training ignores both.
  target_gpu: str = "h100"
  target_num_gpus: int = 0


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """AdamW with global-norm clipping and a learning-rate schedule."""
  learning_rate: float = 3e-4
  warmup_steps: int = 100
  # 'cosine': warmup then cosine to min_lr_ratio * lr; 'wsd': warmup, stable, then linear decay over
  # the last decay_fraction of training; 'constant': warmup then flat.
  schedule: str = "cosine"
  min_lr_ratio: float = 0.1
  decay_fraction: float = 0.2
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.1
  decay_embeddings: bool = False
  grad_clip: float = 1.0


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Input pipeline. source='stdlib' reads the running interpreter's own library and docs."""
  seq_len: int = 256
  source: str = "stdlib"
  # Optional path to an existing SentencePiece .model; empty: train one into the workdir.
  tokenizer_path: str = ""
  # Characters of text the tokenizer trainer sees (bounds its time and memory).
  tokenizer_train_chars: int = 4_000_000
  val_fraction: float = 0.02
  max_files: int = 0  # 0: no limit
  worker_count: int = 0
  prefetch_buffer: int = 2
  shuffle_seed: int = 0
  # Named sources mixed by weight (empty: `source` alone). Each entry is a dict, e.g.
  #   {'name': 'web', 'kind': 'jsonl', 'path': '/data/web/*.jsonl', 'weight': 0.7, 'field': 'text'}
  # kinds: stdlib, text, jsonl, parquet, arrayrecord, cache (a `mai-jax data tokenize` folder).
  sources: Tuple[Any, ...] = ()
  # Split regex of a tiktoken rank file given as tokenizer_path (empty: cl100k's pattern).
  tokenizer_pattern: str = ""
  # Chat template of train.objective='sft' (data/chat_template.py): 'chatml', or the path of a
  # chat_template.jinja, a tokenizer_config.json, or a folder holding one (an imported HF workdir).
  chat_template: str = "chatml"
  # Validation set size in tokens (rounded up to whole eval batches of global_batch_size x
  # seq_len), independent of train.eval_batches; 0: train.eval_batches batches.
  eval_tokens: int = 0


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  """Orbax checkpointing policy (every_steps=0 disables periodic saves)."""
  every_steps: int = 1000
  max_to_keep: int = 3
  async_save: bool = True
  keep_period: int = 0  # also keep every step divisible by this forever (0: off)
  checksums: bool = True  # CRC32 of every file in the manifest (else sizes only)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Loop, batch and logging settings."""
  num_steps: int = 1000
  global_batch_size: int = 32
  microbatches: int = 1
  seed: int = 0
  log_every: int = 10
  eval_every: int = 0  # 0: only at the end
  eval_batches: int = 8
  # lm-evaluation-harness tasks run at every evaluation (eval_every and the end), e.g.
  # ('arc_easy',) or local YAML tasks found in eval_tasks_path; their metrics are logged as
  # tasks/TASK/METRIC. Needs the `lmeval` extra. eval_tasks_limit > 0 scores that many documents
  # of each task.
  eval_tasks: Tuple[str, ...] = ()
  eval_tasks_path: str = ""
  eval_tasks_limit: int = 0
  z_loss_weight: float = 0.0
  profile_steps: Optional[Tuple[int, int]] = None
  progress_bar: bool = True
  # Numerical faults: a non-finite loss/gradient skips the update. After this many in a row the
  # run restores its last checkpoint and skips the offending batches (0: only skip updates).
  max_consecutive_bad_steps: int = 3
  # A loss above ratio x the mean of the previous `loss_spike_window` losses is a spike: restore
  # and skip its batch like a bad step (0: detector off).
  loss_spike_ratio: float = 0.0
  loss_spike_window: int = 50
  max_fault_restores: int = 3  # give up (raise) after this many restores in one run
  # Tokens the whole run is meant to see; `mai-jax plan` turns it into days to train.
  # 0: num_steps * global_batch_size * seq_len (the run as configured).
  token_budget: int = 0
  # Fine-tuning / continued pretraining: a workdir (params-only, e.g. `convert from-hf` or
  # `checkpoints --export-params`, or a training run: its latest good step) whose params start
  # this run, with a fresh optimizer state at step 0. Ignored once the run has its own checkpoints.
  init_from: str = ""
  # Weights & Biases logging beside metrics.jsonl and TensorBoard (`pip install -e ".[track]"`);
  # '' project: off. Run name '' is the workdir's name; mode '' leaves it to wandb (WANDB_MODE,
  # else online); 'offline' writes WANDB_DIR (default WORKDIR) only, for a later `wandb sync`.
  wandb_project: str = ""
  wandb_entity: str = ""
  wandb_run_name: str = ""
  wandb_mode: str = ""
  # What the step optimizes: 'pretrain' (every token of data.sources), 'sft' (data.sources of
  # kind 'chat': conversations, loss on assistant tokens only; see data/chat.py), or a preference
  # objective on kind 'preference' pairs: 'dpo' (against the init_from weights' log-probs,
  # precomputed once), 'simpo' or 'orpo' (reference-free); see train/preference_losses.py.
  objective: str = "pretrain"
  preference_beta: float = 0.1  # DPO/SimPO beta; ORPO's lambda
  simpo_gamma: float = 0.5  # SimPO's target reward margin
  dpo_label_smoothing: float = 0.0  # cDPO: assumed fraction of flipped preference labels
  # DPO's reference log-probs: 'precomputed' (one pass before training, stored beside the data;
  # train/reference.py) or 'online' (the init_from weights held frozen in the step, a second copy
  # of the weights in memory, no pass and no file).
  dpo_reference: str = "precomputed"
  # train.objective='distill' (train/distill.py): the loss is alpha * T^2 * D(teacher_T ||
  # student_T) + (1 - alpha) * CE. The teacher is a workdir run online (frozen, bf16, on this mesh)
  # or, for token-cache sources, the name of a top-K cache that `mai-jax distill cache` wrote into
  # each of them (CACHE/distill/NAME). alpha and T go linearly from the first value to *_final
  # (None: constant) over train.num_steps. The loss runs over chunks of distill_chunk_tokens tokens.
  distill_teacher: str = ""
  distill_cache: str = ""
  distill_divergence: str = "forward_kl"  # or 'reverse_kl', 'jsd'
  distill_alpha: float = 0.5
  distill_alpha_final: Optional[float] = None
  distill_temperature: float = 1.0
  distill_temperature_final: Optional[float] = None
  distill_chunk_tokens: int = 4096


@dataclasses.dataclass(frozen=True)
class Config:
  model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
  mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
  optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
  data: DataConfig = dataclasses.field(default_factory=DataConfig)
  checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
  train: TrainConfig = dataclasses.field(default_factory=TrainConfig)


SECTIONS = tuple(f.name for f in dataclasses.fields(Config))

# GPU types the planner has data sheets for (mai_jax.hardware.GPUS is keyed by these).
GPU_TYPES = ("h100", "h200", "h800", "b200")

CHOICES = {
    ("model", "remat"): ("none", "full", "dots", "attn_proj", "qkv_proj"),
    ("model", "attention_impl"): ("auto", "xla", "cudnn", "cudnn_packed"),
    ("model", "fp8"): ("off", "current"),  # model/fp8_matmul.py MODES
    ("model", "param_dtype"): ("float32", "bfloat16"),
    ("model", "compute_dtype"): ("float32", "bfloat16"),
    ("model", "router"): ("softmax_topk", "sigmoid_bias"),
    ("optim", "schedule"): ("cosine", "wsd", "constant"),
    ("data", "source"): ("stdlib",),
    ("train", "wandb_mode"): ("", "online", "offline", "disabled"),
    ("train", "objective"): ("pretrain", "sft", "dpo", "simpo", "orpo", "distill"),
    ("train", "dpo_reference"): ("precomputed", "online"),
    ("train", "distill_divergence"): ("forward_kl", "reverse_kl", "jsd"),
}


# ----------------------------------------------------------------------------------------------
# Loading experiment files


def _import_experiment(path: str, spec: str):
  if not path.endswith(".py"):
    raise ConfigError(f"--config {spec!r}: expected experiments/NAME.py[:VARIANT] or a "
                      f"workdir's config.json")
  if not os.path.isfile(path):
    raise ConfigError(f"--config {spec!r}: file {path!r} not found{_close_files(path)}")
  module_name = "mai_jax_experiment_" + os.path.splitext(os.path.basename(path))[0]
  module_spec = importlib.util.spec_from_file_location(module_name, path)
  module = importlib.util.module_from_spec(module_spec)
  try:
    # Compiled here, not by the import system, which would write __pycache__/NAME.*.pyc beside
    # the user's file: loading a config (even for a refused command) changes nothing on disk.
    with open(path, "rb") as f:
      code = compile(f.read(), path, "exec")
    exec(code, module.__dict__)  # noqa: S102 - the user's own experiment file, as an import would
  except Exception as e:  # noqa: BLE001 - any failure of the user's file is reported, not raised
    raise experiment_error(path, e) from None
  if not hasattr(module, "get_config"):
    raise ConfigError(f"{path}: defines no get_config(variant=None) -> Config")
  return module


def sibling_experiment(this_file: str, name: str):
  """The module of experiments/NAME.py next to `this_file`, for experiments built on another
  (sft_tiny on tiny): loaded like --config loads it, so no __pycache__ is written beside it."""
  path = os.path.join(os.path.dirname(os.path.abspath(this_file)), f"{name}.py")
  return _import_experiment(path, path)


def experiment_variants(path: str) -> tuple[str, ...]:
  """The variants an experiment file declares in `VARIANTS` (empty if it declares none)."""
  return tuple(getattr(_import_experiment(path, path), "VARIANTS", ()))


def load_experiment(spec: str) -> Config:
  """Loads `path/to/NAME.py[:VARIANT]` by calling its `get_config(variant)`, or a workdir's
  config.json (e.g. to fine-tune with the exact model of imported weights)."""
  if spec.endswith(".json"):
    if not os.path.isfile(spec):
      raise ConfigError(f"--config {spec!r}: file not found")
    return load_json(spec)
  path, _, variant = spec.partition(":")
  module = _import_experiment(path, spec)
  variants = tuple(getattr(module, "VARIANTS", ()))
  if variant and variants and variant not in variants:
    raise ConfigError(f"{path}: unknown variant {variant!r}{_did_you_mean(variant, variants)}; "
                      f"valid variants: {', '.join(variants)}")
  try:
    cfg = module.get_config(variant or None)
  except ConfigError:
    raise
  except Exception as e:  # noqa: BLE001
    raise experiment_error(path, e) from None
  if not isinstance(cfg, Config):
    raise ConfigError(f"{path}: get_config returned {type(cfg).__name__}, expected mai_jax Config")
  return cfg


def experiment_error(path: str, error: Exception) -> ConfigError:
  """One line for an exception raised while running an experiment file: FILE:LINE of the deepest
  frame inside that file (where the user's mistake is) and the message, not Python's stack. An
  unknown keyword of a config dataclass also gets the close field names."""
  if isinstance(error, SyntaxError):
    where = f"{error.filename or path}:{error.lineno}"
    return ConfigError(f"{where}: syntax error: {error.msg}")
  line = None
  target = os.path.realpath(path)
  tb = error.__traceback__
  while tb is not None:
    if os.path.realpath(tb.tb_frame.f_code.co_filename) == target:
      line = tb.tb_lineno
    tb = tb.tb_next
  where = f"{path}:{line}" if line is not None else path
  return ConfigError(f"{where}: {type(error).__name__}: {error}{_field_hint(error)}")


def _field_hint(error: Exception) -> str:
  """' (did you mean ...); valid ModelConfig fields: ...' for `ModelConfig(d_modle=3)`-style TypeErrors."""
  match = isinstance(error, TypeError) and re.match(
      r"(\w+)\.__init__\(\) got an unexpected keyword argument '(\w+)'", str(error))
  if not match:
    return ""
  classes = {cls.__name__: cls for cls in typing.get_type_hints(Config).values()}
  cls = classes.get(match.group(1))
  if cls is None:
    return ""
  names = [f.name for f in dataclasses.fields(cls)]
  return f"{_did_you_mean(match.group(2), names)}; valid {cls.__name__} fields: {', '.join(names)}"


def _close_files(path: str) -> str:
  folder = os.path.dirname(path) or "."
  if not os.path.isdir(folder):
    return ""
  names = [n for n in os.listdir(folder) if n.endswith(".py")]
  close = difflib.get_close_matches(os.path.basename(path), names, n=3)
  return f"; did you mean {', '.join(os.path.join(folder, c) for c in close)}?" if close else ""


def _did_you_mean(word: str, choices) -> str:
  close = difflib.get_close_matches(word, list(choices), n=3, cutoff=0.5)
  return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""


# ----------------------------------------------------------------------------------------------
# Overrides


def apply_overrides(cfg: Config, overrides: dict[str, str]) -> Config:
  """Applies {'train.num_steps': '100', ...}; values are parsed as literals against field types."""
  for dotted, raw in overrides.items():
    section, _, key = dotted.partition(".")
    if section not in SECTIONS:
      raise ConfigError(f"unknown config section {section!r} in --config.{dotted}"
                        f"{_did_you_mean(section, SECTIONS)}; valid sections: {', '.join(SECTIONS)}")
    section_cfg = getattr(cfg, section)
    fields = {f.name: f for f in dataclasses.fields(section_cfg)}
    if key not in fields:
      raise ConfigError(f"unknown config key {section}.{key}{_did_you_mean(key, fields)}; "
                        f"valid keys in {section}: {', '.join(fields)}")
    hint = typing.get_type_hints(type(section_cfg))[key]
    value = parse_value(f"{section}.{key}", raw, hint)
    cfg = dataclasses.replace(cfg, **{section: dataclasses.replace(section_cfg, **{key: value})})
  return cfg


def parse_value(key: str, raw: str, hint: Any) -> Any:
  """Parses `raw` as a Python literal (never eval) and checks it against the type `hint`."""
  try:
    value = ast.literal_eval(raw)
  except (ValueError, SyntaxError):
    value = raw  # bare words are strings: --config.model.remat=full
  if hint is str and not isinstance(value, str):
    value = raw  # a string field keeps the text as typed: --config.data.tokenizer_path=123
  try:
    return _coerce(value, hint)
  except TypeError:
    raise ConfigError(f"--config.{key}={raw!r}: expected {_type_name(hint)}") from None


def _coerce(value: Any, hint: Any) -> Any:
  origin, args = typing.get_origin(hint), typing.get_args(hint)
  if origin in (typing.Union, types.UnionType):
    if value is None and type(None) in args:
      return None
    for arg in args:
      if arg is type(None):
        continue
      try:
        return _coerce(value, arg)
      except TypeError:
        pass
    raise TypeError
  if origin in (tuple, Tuple):
    if not isinstance(value, (tuple, list)):
      raise TypeError
    if len(args) == 2 and args[1] is Ellipsis:
      return tuple(_coerce(v, args[0]) for v in value)
    if len(args) != len(value):
      raise TypeError
    return tuple(_coerce(v, a) for v, a in zip(value, args))
  if hint is Any:
    return value
  if hint is bool:
    if isinstance(value, bool):
      return value
    raise TypeError
  if hint is int:
    if isinstance(value, int) and not isinstance(value, bool):
      return value
    raise TypeError
  if hint is float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
      return float(value)
    raise TypeError
  if hint is str:
    if isinstance(value, str):
      return value
    raise TypeError
  raise TypeError


def _type_name(hint: Any) -> str:
  return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


# ----------------------------------------------------------------------------------------------
# Validation


def validate(cfg: Config, num_devices: Optional[int] = None) -> None:
  """Raises ConfigError naming the first inconsistent key and how to fix it."""
  for (section, key), choices in CHOICES.items():
    value = getattr(getattr(cfg, section), key)
    if value not in choices:
      raise ConfigError(f"{section}.{key}={value!r} is not one of {', '.join(map(repr, choices))}"
                        f"{_did_you_mean(str(value), choices)}")
  m, t, o, d = cfg.model, cfg.train, cfg.optim, cfg.data
  positive = {"model.num_layers": m.num_layers, "model.d_model": m.d_model,
              "model.num_heads": m.num_heads, "model.num_kv_heads": m.num_kv_heads,
              "model.head_dim": m.head_dim, "model.d_ff": m.d_ff, "model.vocab_size": m.vocab_size,
              "model.attention_max_segments": m.attention_max_segments,
              "data.seq_len": d.seq_len, "train.global_batch_size": t.global_batch_size,
              "train.microbatches": t.microbatches, "train.log_every": t.log_every}
  for key, value in positive.items():
    if value <= 0:
      raise ConfigError(f"{key}={value} must be positive")
  for key, value in {"train.num_steps": t.num_steps, "optim.warmup_steps": o.warmup_steps,
                     "checkpoint.every_steps": cfg.checkpoint.every_steps,
                     "train.eval_every": t.eval_every, "data.eval_tokens": d.eval_tokens,
                     "train.eval_tasks_limit": t.eval_tasks_limit}.items():
    if value < 0:
      raise ConfigError(f"{key}={value} must be >= 0")
  if cfg.checkpoint.max_to_keep < 1:
    raise ConfigError(f"checkpoint.max_to_keep={cfg.checkpoint.max_to_keep} must be >= 1")
  if m.num_heads % m.num_kv_heads:
    raise ConfigError(f"model.num_kv_heads={m.num_kv_heads} must divide "
                      f"model.num_heads={m.num_heads}")
  _validate_rope_scaling(m)
  if m.head_dim % 2:
    raise ConfigError(f"model.head_dim={m.head_dim} must be even for rotary embeddings")
  if t.global_batch_size % t.microbatches:
    raise ConfigError(f"train.microbatches={t.microbatches} must divide "
                      f"train.global_batch_size={t.global_batch_size}")
  if o.learning_rate <= 0:
    raise ConfigError(f"optim.learning_rate={o.learning_rate} must be positive")
  if not 0 <= d.val_fraction < 1:
    raise ConfigError(f"data.val_fraction={d.val_fraction} must be in [0, 1)")
  if t.profile_steps is not None and not 0 <= t.profile_steps[0] < t.profile_steps[1]:
    raise ConfigError(f"train.profile_steps={t.profile_steps} must be (start, stop) "
                      f"with 0 <= start < stop")
  _validate_fault_handling(cfg)
  _validate_data_sources(d)
  _validate_plan_target(cfg)
  _validate_moe(m)
  _validate_router_groups(m)
  _validate_expert_buffer(m)
  _validate_moe_dispatch(m)
  _validate_fp8(m)
  _validate_init_from(t)
  for key in ("pipeline_repeats", "pipeline_microbatches"):
    if getattr(m, key) < (1 if key == "pipeline_repeats" else 0):
      raise ConfigError(f"model.{key}={getattr(m, key)} must be "
                        f"{'>= 1' if key == 'pipeline_repeats' else '>= 0 (0: one per stage)'}")
  _validate_objective(cfg)
  known = {name for name, _ in DEFAULT_RULES}
  for name, axes in cfg.mesh.rules:
    if name == "residual_seq":
      raise ConfigError("mesh.rules: 'residual_seq' is derived from 'seq' and "
                        "model.sequence_parallel (sharding.residual_rules); drop it from the rules")
    for axis in axes:
      if axis not in MESH_AXES:
        raise ConfigError(f"mesh.rules: logical axis {name!r} maps to unknown mesh axis {axis!r}"
                          f"{_did_you_mean(axis, MESH_AXES)}; mesh axes: {', '.join(MESH_AXES)}")
    known.discard(name)
  if known:
    raise ConfigError(f"mesh.rules lacks logical axes {sorted(known)}; "
                      f"start from mai_jax.config.DEFAULT_RULES")
  if num_devices is not None:
    mesh_shape(cfg.mesh, num_devices)
    _validate_expert_mesh(cfg, num_devices)
    _validate_expert_devices_per_node(cfg, num_devices)
    _validate_head_split(cfg, num_devices)
    _validate_sequence_parallel(cfg, num_devices)
    _validate_pipeline(cfg, num_devices)
    per_step = t.global_batch_size // t.microbatches
    batch_shards = 1
    for axis in dict(cfg.mesh.rules).get("batch", ()):
      batch_shards *= mesh_shape(cfg.mesh, num_devices)[axis]
    if per_step % batch_shards:
      unit = batch_shards * t.microbatches
      raise ConfigError(
          f"train.global_batch_size={t.global_batch_size} / train.microbatches={t.microbatches} "
          f"= {per_step} rows per microbatch must be divisible by the {batch_shards} devices the "
          f"batch is sharded over (mesh axes {dict(cfg.mesh.rules)['batch']}); pass "
          f"--config.train.global_batch_size={nearest_multiple(t.global_batch_size, unit)} "
          f"(the nearest multiple of {unit})")


def nearest_multiple(value: int, unit: int) -> int:
  """The positive multiple of `unit` closest to `value` (ties: the larger one)."""
  return max(unit, unit * ((value + unit // 2) // unit))


def pipeline_microbatches(cfg: Config, num_stages: int) -> int:
  """Pipeline microbatches per step (per gradient-accumulation microbatch): the configured
  count, or one per stage when model.pipeline_microbatches is 0."""
  return cfg.model.pipeline_microbatches or num_stages


def _validate_pipeline(cfg: Config, num_devices: int) -> None:
  """mesh.stage > 1: the schedule's shapes must divide (see model/pipeline.py)."""
  sizes = mesh_shape(cfg.mesh, num_devices)
  stages, m, t = sizes["stage"], cfg.model, cfg.train
  if stages == 1:
    return
  rules = dict(cfg.mesh.rules)
  if "stage" not in rules.get("layers", ()) or any(
      "stage" in axes for name, axes in cfg.mesh.rules if name != "layers"):
    raise ConfigError(f"mesh.stage={stages} needs mesh.rules to map 'layers' (and nothing else) to "
                      f"'stage', as DEFAULT_RULES does")
  if not m.scan_layers:
    raise ConfigError(f"mesh.stage={stages} needs model.scan_layers=True (stages split the "
                      f"stacked layers)")
  repeats = m.pipeline_repeats
  if m.num_experts:  # the pipelined stack: MoE blocks (or groups), after the first dense layers
    units = (m.num_layers - m.first_dense_layers) // m.moe_layer_interval
    if units % (stages * repeats):
      raise ConfigError(f"model.num_layers={m.num_layers} gives {units} MoE "
                        f"{'blocks' if m.moe_layer_interval == 1 else 'block groups'} (after "
                        f"first_dense_layers={m.first_dense_layers}, moe_layer_interval="
                        f"{m.moe_layer_interval}), which must be divisible by mesh.stage={stages} x "
                        f"model.pipeline_repeats={repeats} = {stages * repeats}")
  elif m.num_layers % (stages * repeats):
    raise ConfigError(f"model.num_layers={m.num_layers} must be divisible by mesh.stage={stages} x "
                      f"model.pipeline_repeats={repeats} = {stages * repeats} (layers per "
                      f"virtual stage)")
  micro = pipeline_microbatches(cfg, stages)
  if micro < stages:
    raise ConfigError(f"model.pipeline_microbatches={micro} must be >= mesh.stage={stages} "
                      f"(fewer leaves stages idle; 0 means one per stage)")
  rows = t.global_batch_size // t.microbatches
  shards = math.prod(sizes[a] for a in rules.get("batch", ()))
  if rows % (micro * shards):
    raise ConfigError(f"train.global_batch_size={t.global_batch_size} / train.microbatches="
                      f"{t.microbatches} = {rows} rows must split into model.pipeline_microbatches="
                      f"{micro} pipeline microbatches of a multiple of the {shards} devices the "
                      f"batch is sharded over")


def _validate_fault_handling(cfg: Config) -> None:
  t, c = cfg.train, cfg.checkpoint
  for key, value in {"train.max_consecutive_bad_steps": t.max_consecutive_bad_steps,
                     "train.max_fault_restores": t.max_fault_restores,
                     "checkpoint.keep_period": c.keep_period}.items():
    if value < 0:
      raise ConfigError(f"{key}={value} must be >= 0")
  if t.loss_spike_ratio and t.loss_spike_ratio <= 1:
    raise ConfigError(f"train.loss_spike_ratio={t.loss_spike_ratio} must be > 1 (a spike is a "
                      f"loss above ratio x its recent mean), or 0 to turn the detector off")
  if t.loss_spike_ratio and t.loss_spike_window < 1:
    raise ConfigError(f"train.loss_spike_window={t.loss_spike_window} must be >= 1")
def _validate_init_from(t: TrainConfig) -> None:
  """Only the type here: whether the path holds usable weights is checked when the run starts."""
  if not isinstance(t.init_from, str):
    raise ConfigError(f"train.init_from={t.init_from!r} must be a string: the path of a workdir "
                      f"to take the initial parameters from, or '' for a random init")


def _validate_data_sources(data: DataConfig) -> None:
  if data.sources:
    data_sources(data)


def _validate_objective(cfg: Config) -> None:
  """SFT reads conversations (kind 'chat') and nothing else, preference objectives read pairs
  (kind 'preference'), pretraining reads neither. Post-training needs the tokenizer of its
  weights (there is no text to train one on); DPO needs the weights themselves (its reference)."""
  t = cfg.train
  want = {"sft": "chat", **{o: "preference" for o in PREFERENCE_OBJECTIVES}}.get(t.objective)
  kinds = [s.kind for s in data_sources(cfg.data)]
  if want and any(k != want for k in kinds):
    example = f"{{'name': 'ft', 'kind': '{want}', 'path': 'data.jsonl'}}"
    raise ConfigError(f"train.objective={t.objective!r} reads kind {want!r}: every data.sources "
                      f"entry must have that kind, e.g. --config.data.sources=\"[{example}]\"")
  for kind, objectives in (("chat", "sft"), ("preference", "/".join(PREFERENCE_OBJECTIVES))):
    if kind in kinds and want != kind:
      raise ConfigError(f"data.sources of kind {kind!r} are read by train.objective={objectives} "
                        f"only (train.objective={t.objective!r}); set --config.train.objective")
  if want and not (t.init_from or cfg.data.tokenizer_path):
    raise ConfigError(f"train.objective={t.objective!r} fine-tunes existing weights: set "
                      f"--config.train.init_from=WORKDIR (their tokenizer comes along) or at least "
                      f"--config.data.tokenizer_path")
  if t.objective == "dpo" and not t.init_from:
    raise ConfigError("train.objective='dpo' scores against the starting weights: set "
                      "--config.train.init_from=WORKDIR (e.g. an SFT run)")
  if t.dpo_reference == "online" and t.objective != "dpo":
    raise ConfigError(f"train.dpo_reference='online' is read by train.objective='dpo' only "
                      f"(train.objective={t.objective!r}); drop it or set "
                      f"--config.train.objective=dpo")
  if want == "preference" and t.preference_beta <= 0:
    raise ConfigError(f"train.preference_beta={t.preference_beta} must be positive")
  if not 0 <= t.dpo_label_smoothing < 0.5:
    raise ConfigError(f"train.dpo_label_smoothing={t.dpo_label_smoothing} must be in [0, 0.5)")
  _validate_distill(cfg, kinds)


def _validate_distill(cfg: Config, kinds: list[str]) -> None:
  """A distillation run has exactly one teacher: a workdir (online) or a top-K cache name (token
  cache sources only); alpha in [0, 1], temperatures positive."""
  t = cfg.train
  if t.objective != "distill":
    if t.distill_teacher or t.distill_cache:
      raise ConfigError("train.distill_teacher / train.distill_cache are read by "
                        "train.objective='distill' only; set --config.train.objective=distill")
    return
  if bool(t.distill_teacher) == bool(t.distill_cache):
    raise ConfigError("train.objective='distill' needs a teacher: set exactly one of "
                      "--config.train.distill_teacher=WORKDIR (online) or "
                      "--config.train.distill_cache=NAME (a `mai-jax distill cache` top-K cache)")
  if t.distill_cache and any(k != "cache" for k in kinds):
    raise ConfigError(f"train.distill_cache={t.distill_cache!r} reads teacher log-probs aligned "
                      f"with token caches: every data.sources entry must have kind 'cache' "
                      f"(`mai-jax data tokenize`), or use --config.train.distill_teacher=WORKDIR")
  for key in ("distill_alpha", "distill_alpha_final"):
    value = getattr(t, key)
    if value is not None and not 0 <= value <= 1:
      raise ConfigError(f"train.{key}={value} must be in [0, 1]")
  for key in ("distill_temperature", "distill_temperature_final"):
    value = getattr(t, key)
    if value is not None and not value > 0:
      raise ConfigError(f"train.{key}={value} must be positive")
  if t.distill_chunk_tokens < 0:
    raise ConfigError(f"train.distill_chunk_tokens={t.distill_chunk_tokens} must be >= 0 "
                      f"(0: one chunk)")


# ----------------------------------------------------------------------------------------------
# Data sources (data.sources entries are dicts so the CLI can override them as literals)


SOURCE_KINDS = ("stdlib", "text", "jsonl", "parquet", "arrayrecord", "cache", "chat",
                "preference")
PREFERENCE_OBJECTIVES = ("dpo", "simpo", "orpo")
_SOURCE_KEYS = ("name", "kind", "path", "weight", "field")


@dataclasses.dataclass(frozen=True)
class SourceSpec:
  """One entry of data.sources, checked: a named set of files of one kind, mixed by weight.

  `field` is the JSON key / Parquet column holding the text (default 'text'); for 'cache' the
  path is a folder written by `mai-jax data tokenize`.
  """
  name: str
  kind: str
  path: str = ""
  weight: float = 1.0
  field: str = ""


def _spec_error(i: int, entry, problem: str) -> ConfigError:
  name = entry.get("name") if isinstance(entry, dict) else None
  which = f"data.sources[{i}]" + (f" ({name!r})" if name else "")
  example = "{'name': 'web', 'kind': 'jsonl', 'path': '/data/web/*.jsonl', 'weight': 0.7}"
  return ConfigError(f"{which}: {problem}; each entry is a dict like {example}")


def data_sources(data: DataConfig) -> tuple[SourceSpec, ...]:
  """The checked sources of a run: data.sources, or the single data.source when that is empty.
  Raises ConfigError naming the bad entry and the fix."""
  if not data.sources:
    return (SourceSpec(name=data.source, kind=data.source),)
  specs, names = [], set()
  for i, entry in enumerate(data.sources):
    if not isinstance(entry, dict):
      raise _spec_error(i, {}, f"expected a dict, got {type(entry).__name__} {entry!r}")
    unknown = sorted(set(entry) - set(_SOURCE_KEYS))
    if unknown:
      raise _spec_error(i, entry, f"unknown key(s) {unknown}; valid keys: "
                        f"{', '.join(_SOURCE_KEYS)}")
    name, kind = entry.get("name"), entry.get("kind")
    if not isinstance(name, str) or not name.replace("_", "").replace("-", "").isalnum():
      raise _spec_error(i, entry, f"'name' must be a short word such as 'web' (letters, digits, _ "
                        f"or -), got {name!r}")
    if name in names:
      raise _spec_error(i, entry, f"name {name!r} is used twice; names must be unique")
    names.add(name)
    if kind not in SOURCE_KINDS:
      raise _spec_error(i, entry, f"'kind'={kind!r} must be one of {', '.join(SOURCE_KINDS)}")
    path, field = entry.get("path", ""), entry.get("field", "")
    if kind != "stdlib" and (not isinstance(path, str) or not path):
      raise _spec_error(i, entry, f"kind {kind!r} needs a 'path' (a file, folder or glob)")
    weight = entry.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
      raise _spec_error(i, entry, f"'weight'={weight!r} must be a positive number")
    if not isinstance(field, str):
      raise _spec_error(i, entry, f"'field'={field!r} must be a string (JSON key or column)")
    specs.append(SourceSpec(name=name, kind=kind, path=path or "", weight=float(weight),
                            field=field))
  kinds = {s.kind == "cache" for s in specs}
  if len(kinds) > 1:
    raise ConfigError("data.sources mixes kind 'cache' with raw sources; pre-tokenize every "
                      "source with `mai-jax data tokenize` and list only caches, or list none")
  return tuple(specs)
def _validate_plan_target(cfg: Config) -> None:
  """The planner's hardware target and token budget (see MeshConfig / TrainConfig)."""
  if cfg.mesh.target_gpu not in GPU_TYPES:
    gpu = cfg.mesh.target_gpu
    raise ConfigError(f"mesh.target_gpu={gpu!r} is not one of {', '.join(map(repr, GPU_TYPES))}"
                      f"{_did_you_mean(gpu, GPU_TYPES)}")
  if cfg.mesh.target_num_gpus < 0:
    raise ConfigError(f"mesh.target_num_gpus={cfg.mesh.target_num_gpus} must be >= 0 "
                      f"(0: no target declared)")
  if cfg.train.token_budget < 0:
    raise ConfigError(f"train.token_budget={cfg.train.token_budget} must be >= 0 "
                      f"(0: num_steps x global_batch_size x seq_len)")


def token_budget(cfg: Config) -> int:
  """Tokens the run is meant to train on: train.token_budget, else what num_steps amounts to."""
  if cfg.train.token_budget:
    return cfg.train.token_budget
  return cfg.train.num_steps * cfg.train.global_batch_size * cfg.data.seq_len


def scaled_mesh(mesh: MeshConfig, full_sizes: dict[str, int], num_devices: int) -> MeshConfig:
  """The same mesh pattern on fewer devices (e.g. 8 fake CPUs for a compile check).

  Every axis that is larger than 1 in `full_sizes` stays larger than 1 where the device count
  allows: sizes double round-robin from the innermost axis ('tensor') outwards, never past the
  full size, until they multiply to `num_devices`. So data=30, fsdp=64, tensor=8 on 8 devices
  becomes data=2, fsdp=2, tensor=2, exercising every collective of the full layout.
  """
  active = [a for a in reversed(MESH_AXES) if full_sizes[a] > 1]
  sizes = {a: 1 for a in MESH_AXES}
  remaining = num_devices
  while remaining > 1:
    grown = False
    for axis in active:
      if remaining % 2 == 0 and sizes[axis] * 2 <= full_sizes[axis]:
        sizes[axis] *= 2
        remaining //= 2
        grown = True
    if not grown:
      break
  if remaining > 1:
    inner = active[0] if active else "fsdp"
    sizes[inner] *= remaining
  return dataclasses.replace(mesh, **sizes)


def scaled_to_devices(cfg: Config, num_devices: int, full_num_devices: int) -> Config:
  """`cfg` as laid out for `full_num_devices`, scaled down to `num_devices` (scaled_mesh) with the
  same sequences per device and microbatch count: per-device shapes stay those of the full run."""
  full = mesh_shape(cfg.mesh, full_num_devices)
  mesh = scaled_mesh(cfg.mesh, full, num_devices)
  small = mesh_shape(mesh, num_devices)
  batch_axes = dict(cfg.mesh.rules).get("batch", ())
  t = cfg.train
  rows = max(t.global_batch_size // (t.microbatches * math.prod(full[a] for a in batch_axes)), 1)
  batch = rows * t.microbatches * math.prod(small[a] for a in batch_axes)
  return dataclasses.replace(cfg, mesh=dataclasses.replace(mesh, target_num_gpus=num_devices),
                             train=dataclasses.replace(t, global_batch_size=batch))
def _validate_fp8(m: ModelConfig) -> None:
  """model.fp8 runs through qwix (the [fp8] extra): refuse before anything is built without it."""
  if m.fp8 != "off" and importlib.util.find_spec("qwix") is None:
    raise ConfigError(f"model.fp8={m.fp8!r} needs qwix: pip install 'mai-jax[fp8]' "
                      f"(or --config.model.fp8=off)")


def _validate_rope_scaling(m: ModelConfig) -> None:
  if m.rope_scaling_factor < 1:
    raise ConfigError(f"model.rope_scaling_factor={m.rope_scaling_factor} must be >= 1 "
                      f"(1: no scaling)")
  if m.rope_scaling_factor > 1 and not 0 < m.rope_low_freq_factor < m.rope_high_freq_factor:
    raise ConfigError(f"model.rope_low_freq_factor={m.rope_low_freq_factor} must be positive and "
                      f"below model.rope_high_freq_factor={m.rope_high_freq_factor}")
  if m.rope_scaling_factor > 1 and m.rope_original_max_len <= 0:
    raise ConfigError(f"model.rope_original_max_len={m.rope_original_max_len} must be positive")
def _validate_moe(m: ModelConfig) -> None:
  """MoE fields are consistent (they are ignored when num_experts=0, except that they must be sane)."""
  if m.num_experts < 0:
    raise ConfigError(f"model.num_experts={m.num_experts} must be >= 0 (0: a dense model)")
  if m.num_experts == 0:
    return
  if not 1 <= m.experts_per_token <= m.num_experts:
    raise ConfigError(f"model.experts_per_token={m.experts_per_token} must be in "
                      f"[1, model.num_experts={m.num_experts}]")
  for key in ("num_shared_experts", "d_ff_expert", "first_dense_layers"):
    if getattr(m, key) < 0:
      raise ConfigError(f"model.{key}={getattr(m, key)} must be >= 0")
  if m.moe_layer_interval < 1:
    raise ConfigError(f"model.moe_layer_interval={m.moe_layer_interval} must be >= 1")
  sparse = m.num_layers - m.first_dense_layers
  if sparse < m.moe_layer_interval or sparse % m.moe_layer_interval:
    raise ConfigError(
        f"model.num_layers={m.num_layers} - model.first_dense_layers={m.first_dense_layers} = "
        f"{sparse} must be a positive multiple of model.moe_layer_interval={m.moe_layer_interval} "
        f"(the MoE part repeats groups of moe_layer_interval layers)")
  if m.capacity_factor is not None and m.capacity_factor <= 0:
    raise ConfigError(f"model.capacity_factor={m.capacity_factor} must be positive, or None "
                      f"for dropless routing")
  for key in ("router_z_loss_weight", "load_balance_loss_weight", "router_bias_update_rate"):
    if getattr(m, key) < 0:
      raise ConfigError(f"model.{key}={getattr(m, key)} must be >= 0")
  if m.router_bias_update_rate and m.router != "sigmoid_bias":
    raise ConfigError(f"model.router_bias_update_rate={m.router_bias_update_rate} needs "
                      f"model.router='sigmoid_bias' (only that router has a selection bias)")


def _validate_router_groups(m: ModelConfig) -> None:
  """Group-limited routing needs groups that split the experts and room for k experts in the kept
  groups (both routers support it: model/moe.py group_limit)."""
  G, M = m.router_groups, m.router_topk_groups
  if G < 0 or M < 0:
    raise ConfigError(f"model.router_groups={G} and model.router_topk_groups={M} must be >= 0 "
                      f"(router_groups 0 or 1: ungrouped routing)")
  if G <= 1:
    if M:
      raise ConfigError(f"model.router_topk_groups={M} needs model.router_groups > 1 (it is "
                        f"{G}: routing is ungrouped); set both or neither")
    return
  if not m.num_experts:
    raise ConfigError(f"model.router_groups={G} needs an MoE model (model.num_experts > 0)")
  if m.num_experts % G:
    raise ConfigError(f"model.router_groups={G} must divide model.num_experts={m.num_experts}")
  if not 1 <= M <= G:
    raise ConfigError(f"model.router_topk_groups={M} must be in [1, model.router_groups={G}] "
                      f"when router_groups is set")
  if m.experts_per_token > M * (m.num_experts // G):
    raise ConfigError(f"model.experts_per_token={m.experts_per_token} exceeds the "
                      f"{M * (m.num_experts // G)} experts of model.router_topk_groups={M} groups "
                      f"of {m.num_experts // G}; raise router_topk_groups")


def _validate_expert_buffer(m: ModelConfig) -> None:
  """expert_buffer_factor bounds the dropless expert-parallel buffers; nothing else."""
  if m.expert_buffer_factor is None:
    return
  if m.expert_buffer_factor <= 0:
    raise ConfigError(f"model.expert_buffer_factor={m.expert_buffer_factor} must be positive, or "
                      f"None for exact (worst-case) dropless buffers")
  if m.num_experts and m.capacity_factor is not None:
    raise ConfigError(f"model.expert_buffer_factor={m.expert_buffer_factor} bounds dropless "
                      f"buffers only; with model.capacity_factor={m.capacity_factor} the buffers "
                      f"are capacity-bounded already: set one of them to None")


def _validate_moe_dispatch(m: ModelConfig) -> None:
  """moe_dispatch_dtype names a known wire format and is set only on MoE models."""
  known = ("compute", "float8_e4m3fn")  # model/fp8_dispatch.py DISPATCH_DTYPES
  if m.moe_dispatch_dtype not in known:
    raise ConfigError(f"model.moe_dispatch_dtype={m.moe_dispatch_dtype!r} is not one of {known}")
  if m.moe_dispatch_dtype != "compute" and not m.num_experts:
    raise ConfigError(f"model.moe_dispatch_dtype={m.moe_dispatch_dtype!r} needs an MoE model "
                      f"(model.num_experts > 0); leave it 'compute' for a dense model")


def _validate_expert_mesh(cfg: Config, num_devices: int) -> None:
  """Experts must split evenly over the mesh axes the 'experts' logical axis maps to."""
  if not cfg.model.num_experts:
    return
  sizes = mesh_shape(cfg.mesh, num_devices)
  axes = dict(cfg.mesh.rules).get("experts", ())
  shards = 1
  for axis in axes:
    shards *= sizes[axis]
  if cfg.model.num_experts % shards:
    raise ConfigError(f"model.num_experts={cfg.model.num_experts} must be divisible by the "
                      f"{shards} devices the experts are sharded over (mesh axes {tuple(axes)}); "
                      f"change mesh.expert or model.num_experts")


def _validate_expert_devices_per_node(cfg: Config, num_devices: int) -> None:
  """model.expert_devices_per_node splits the expert devices into whole nodes of n devices, at
  least two nodes of at least two devices (otherwise one of the two all-to-alls is a no-op and the
  flat one is the same exchange): model/hierarchical_dispatch.py. Not with pipeline stages: their
  vmap (model/pipeline.py) has no batching rule for an all-to-all with axis_index_groups."""
  n = cfg.model.expert_devices_per_node
  if not n:
    return
  if not cfg.model.num_experts:
    raise ConfigError(f"model.expert_devices_per_node={n} needs an MoE model (model.num_experts "
                      f"> 0) with experts over mesh.expert; leave it 0 for a dense model")
  axes = tuple(dict(cfg.mesh.rules).get("experts", ()))
  ep = _devices_over(cfg, num_devices, axes)
  if not 1 < n < ep or ep % n:
    fits = [d for d in range(2, ep) if ep % d == 0]
    fix = (f"set it to the expert devices of one node (e.g. {fits[-1]}) or 0" if fits else
           f"no n fits {ep} devices: raise mesh.expert or set it to 0")
    raise ConfigError(f"model.expert_devices_per_node={n} must be 0 (flat all-to-all) or divide "
                      f"the {ep} devices the experts are sharded over (mesh.expert="
                      f"{cfg.mesh.expert}, mesh axes {axes}) with 1 < n < {ep}: {fix}")
  if cfg.mesh.stage > 1:
    raise ConfigError(f"model.expert_devices_per_node={n} does not run inside pipeline stages "
                      f"(mesh.stage={cfg.mesh.stage}: jax cannot vmap its grouped all-to-alls); "
                      f"set it to 0 or mesh.stage to 1")


def _validate_head_split(cfg: Config, num_devices: int) -> None:
  """Query heads must split evenly over the mesh axes 'heads' maps to (mesh.tensor by default).

  The sharding rules replicate a dimension its mesh axes do not divide, so mesh.tensor=8 with 4
  heads would compute all of attention on every tensor device: the run works but wastes those
  devices, with nothing in the log. That is refused. KV heads fewer than the tensor shards are
  allowed: replicating the small K/V projections is the usual GQA trade (8 KV heads at tensor=16).
  """
  axes = dict(cfg.mesh.rules).get("heads", ())
  shards = _devices_over(cfg, num_devices, axes)
  if cfg.model.num_heads % shards:
    raise ConfigError(f"model.num_heads={cfg.model.num_heads} must be divisible by the {shards} "
                      f"devices the heads are sharded over (mesh axes {tuple(axes)}); otherwise "
                      f"attention is replicated on every one of them. Lower mesh.tensor or use "
                      f"more heads")


def _devices_over(cfg: Config, num_devices: int, axes) -> int:
  """Devices a dimension sharded over mesh `axes` is split into, on num_devices."""
  sizes = mesh_shape(cfg.mesh, num_devices)
  return math.prod(sizes[a] for a in axes)


def _validate_sequence_parallel(cfg: Config, num_devices: int) -> None:
  """model.sequence_parallel splits the training sequence over the 'heads' axes; a length they do
  not divide would stay whole (as for a decoding step of one token), i.e. sequence parallelism
  silently off, so it is refused for data.seq_len."""
  if not cfg.model.sequence_parallel:
    return
  rules = dict(cfg.mesh.rules)
  seq = tuple(rules.get("seq", ()))
  axes = seq + tuple(a for a in rules.get("heads", ()) if a not in seq)  # sharding.residual_rules
  shards = _devices_over(cfg, num_devices, axes)
  if cfg.data.seq_len % shards:
    raise ConfigError(f"model.sequence_parallel: data.seq_len={cfg.data.seq_len} must be divisible "
                      f"by the {shards} devices the sequence is split over (mesh.tensor="
                      f"{cfg.mesh.tensor}, mesh axes {tuple(axes)}); change data.seq_len or "
                      f"mesh.tensor, or turn sequence_parallel off")


def mesh_shape(mesh: MeshConfig, num_devices: int) -> dict[str, int]:
  """Resolves -1 ('the rest') and checks the sizes multiply to the device count."""
  sizes = {axis: getattr(mesh, axis) for axis in MESH_AXES}
  for axis, size in sizes.items():
    if size == 0 or size < -1:
      raise ConfigError(f"mesh.{axis}={size} must be a positive size or -1 (the rest)")
  unknown = [a for a, s in sizes.items() if s == -1]
  if len(unknown) > 1:
    raise ConfigError(f"only one mesh axis may be -1, got {', '.join('mesh.' + a for a in unknown)}")
  known = 1
  for size in sizes.values():
    known *= size if size > 0 else 1
  if unknown:
    if num_devices % known:
      raise ConfigError(f"mesh sizes {sizes} cannot fill {num_devices} devices: the fixed axes "
                        f"multiply to {known}, which does not divide {num_devices}")
    sizes[unknown[0]] = num_devices // known
  elif known != num_devices:
    raise ConfigError(f"mesh sizes {sizes} multiply to {known} but there are {num_devices} "
                      f"devices; set one axis to -1 or make them multiply to {num_devices}")
  return sizes


# ----------------------------------------------------------------------------------------------
# Serialization


def to_dict(cfg: Config) -> dict:
  return dataclasses.asdict(cfg)


def to_json(cfg: Config) -> str:
  return json.dumps(to_dict(cfg), indent=2, sort_keys=True)


def differences(cfg: Config, base: Config) -> list[tuple[str, Any, Any]]:
  """(SECTION.KEY, value in cfg, value in base) of every field where the two differ, in field
  order: `mai-jax config show --diff` against the dataclass defaults."""
  out = []
  for section in SECTIONS:
    ours, theirs = getattr(cfg, section), getattr(base, section)
    for field in dataclasses.fields(ours):
      if getattr(ours, field.name) != getattr(theirs, field.name):
        out.append((f"{section}.{field.name}", getattr(ours, field.name),
                    getattr(theirs, field.name)))
  return out


def from_dict(raw: dict) -> Config:
  """Rebuilds a Config from `to_dict` output (e.g. WORKDIR/config.json); unknown keys are errors."""
  sections = {}
  hints = typing.get_type_hints(Config)
  for section, values in raw.items():
    if section not in SECTIONS:
      raise ConfigError(f"config.json: unknown section {section!r}{_did_you_mean(section, SECTIONS)}")
    cls = hints[section]
    field_hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
      if key not in field_hints:
        raise ConfigError(f"config.json: unknown key {section}.{key}"
                          f"{_did_you_mean(key, field_hints)}")
      kwargs[key] = _from_json(value, field_hints[key], f"{section}.{key}")
    sections[section] = cls(**kwargs)
  return Config(**sections)


def _from_json(value: Any, hint: Any, key: str) -> Any:
  def listify_to_tuple(v):
    return tuple(listify_to_tuple(x) for x in v) if isinstance(v, list) else v
  try:
    return _coerce(listify_to_tuple(value), hint)
  except TypeError:
    raise ConfigError(f"config.json: {key}={value!r} is not a {_type_name(hint)}") from None


def read_json(path: str, fix: str) -> Any:
  """json.load of a file a user handed us; a malformed or unreadable one is a ConfigError naming
  the file, where the JSON breaks and `fix`, not a JSONDecodeError traceback."""
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise ConfigError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); "
                      f"{fix}") from None
  except (OSError, UnicodeDecodeError) as e:
    raise ConfigError(f"{path}: cannot be read ({e}); {fix}") from None


def read_json_or_none(path: str) -> Optional[dict]:
  """json.load of a file this code wrote itself (a record, a progress marker), or None when it
  is missing or torn: the caller then treats it as never written."""
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def load_json(path: str) -> Config:
  """Reads a config.json (see read_json for a broken one)."""
  raw = read_json(path, "repair it, or pass the run's experiment with --config")
  if not isinstance(raw, dict) or not all(isinstance(v, dict) for v in raw.values()):
    raise ConfigError(f"{path}: expected a JSON object of sections ({', '.join(SECTIONS)}), each "
                      f"an object of keys, as `mai-jax train` writes it")
  return from_dict(raw)
