"""Hugging Face safetensors <-> mai_jax parameters for Llama-family models (Llama 2/3, Mistral,
SmolLM) and Mixtral (Mixture-of-Experts).

    cfg, model = hf.from_hf("path/to/hf_dir")      # model(tokens_BT) -> float32 logits_BTV
    hf.to_hf(cfg, params, "out_dir")                 # config.json + model*.safetensors

Why a table of tensor names: every checkpoint tensor is one row (HF name pattern, mai_jax param
path, layout conversion), so a family that renames or adds tensors (Mixtral's experts) is a few more
rows rather than new code. Layout: HF stores nn.Linear weights as [out, in]; mai_jax stores
[in, out...] with heads split out (q_proj [D, H, K], o_proj [H, K, D]), and with scan_layers one
stacked array per parameter with a leading [layers] axis.

Memory: tensors are read one at a time with `safe_open` (never pickle). Each mai_jax parameter is
assembled in one host buffer and sent to its devices (already sharded by the config's rules) as soon
as its last layer arrives, so host memory stays below one model copy, not two. Export gathers one
parameter at a time and writes shards of at most `max_shard_bytes`.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
from typing import Callable, Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open

from mai_jax import config as config_lib
from mai_jax import sharding as sharding_lib
from mai_jax.config import Config, ConfigError, ModelConfig
from mai_jax.model import Decoder
from mai_jax.model.moe import expert_d_ff
from mai_jax.train import state as state_lib

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
SUPPORTED_TYPES = ("llama", "mistral", "mixtral")
# Buffers some older exports carry that hold no learned weights.
_IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


class HFConversionError(ConfigError):
  """An HF checkpoint this converter cannot represent exactly; the message says what and why."""


# ----------------------------------------------------------------------------------------------
# Layout conversions: (HF array, model config) -> mai_jax array, and back.

@dataclasses.dataclass(frozen=True)
class Layout:
  to_mai: Callable[[np.ndarray, ModelConfig], np.ndarray]
  to_hf: Callable[[np.ndarray, ModelConfig], np.ndarray]


SAME = Layout(lambda w, c: w, lambda p, c: p)
# nn.Linear [out, in] <-> [in, out]
LINEAR = Layout(lambda w, c: w.T, lambda p, c: p.T)
# q_proj [H*K, D] <-> [D, H, K]; k/v_proj [G*K, D] <-> [D, G, K]
Q_HEADS = Layout(lambda w, c: w.T.reshape(c.d_model, c.num_heads, c.head_dim),
                 lambda p, c: p.reshape(c.d_model, -1).T)
KV_HEADS = Layout(lambda w, c: w.T.reshape(c.d_model, c.num_kv_heads, c.head_dim),
                  lambda p, c: p.reshape(c.d_model, -1).T)
# o_proj [D, H*K] <-> [H, K, D]
O_HEADS = Layout(lambda w, c: w.T.reshape(c.num_heads, c.head_dim, c.d_model),
                 lambda p, c: p.reshape(-1, c.d_model).T)


@dataclasses.dataclass(frozen=True)
class Row:
  hf_name: str          # may contain {layer} and {expert}
  path: tuple[str, ...]  # mai_jax param path inside the model (per block for layer rows)
  layout: Layout
  per_expert: bool = False  # one HF tensor per expert, stacked on the param's experts axis


GLOBAL_ROWS = (
    Row("model.embed_tokens.weight", ("embed", "embedding"), SAME),
    Row("model.norm.weight", ("final_norm", "scale"), SAME),
)
UNTIED_ROWS = (Row("lm_head.weight", ("unembed",), LINEAR),)
ATTENTION_ROWS = (
    Row("model.layers.{layer}.input_layernorm.weight", ("attn_norm", "scale"), SAME),
    Row("model.layers.{layer}.self_attn.q_proj.weight", ("attn", "q_proj"), Q_HEADS),
    Row("model.layers.{layer}.self_attn.k_proj.weight", ("attn", "k_proj"), KV_HEADS),
    Row("model.layers.{layer}.self_attn.v_proj.weight", ("attn", "v_proj"), KV_HEADS),
    Row("model.layers.{layer}.self_attn.o_proj.weight", ("attn", "o_proj"), O_HEADS),
    Row("model.layers.{layer}.post_attention_layernorm.weight", ("mlp_norm", "scale"), SAME),
)
DENSE_MLP_ROWS = (
    Row("model.layers.{layer}.mlp.gate_proj.weight", ("mlp", "gate_proj"), LINEAR),
    Row("model.layers.{layer}.mlp.up_proj.weight", ("mlp", "up_proj"), LINEAR),
    Row("model.layers.{layer}.mlp.down_proj.weight", ("mlp", "down_proj"), LINEAR),
)


# Mixtral: router [E, D] -> [D, E]; experts' w1 (gate), w3 (up) [F, D] -> [D, F] and w2 (down)
# [D, F] -> [F, D], each stacked over experts: gate_proj/up_proj [E, D, F], down_proj [E, F, D].
_EXPERT = "model.layers.{layer}.block_sparse_moe.experts.{expert}"
MOE_ROWS = (
    Row("model.layers.{layer}.block_sparse_moe.gate.weight", ("moe", "router"), LINEAR),
    Row(_EXPERT + ".w1.weight", ("moe", "gate_proj"), LINEAR, per_expert=True),
    Row(_EXPERT + ".w3.weight", ("moe", "up_proj"), LINEAR, per_expert=True),
    Row(_EXPERT + ".w2.weight", ("moe", "down_proj"), LINEAR, per_expert=True),
)


def layer_rows(cfg: ModelConfig) -> tuple[Row, ...]:
  return ATTENTION_ROWS + (MOE_ROWS if cfg.num_experts else DENSE_MLP_ROWS)


@dataclasses.dataclass(frozen=True)
class Target:
  """Where one HF tensor goes: param path in the pure params dict, and index into it (a layer of a
  stacked parameter, or () for the whole array)."""
  path: tuple
  index: tuple
  layout: Layout


def tensor_table(cfg: ModelConfig) -> dict[str, Target]:
  """HF tensor name -> Target, for every tensor the model needs."""
  table = {}
  rows = GLOBAL_ROWS + (() if cfg.tie_embeddings else UNTIED_ROWS)
  for row in rows:
    table[row.hf_name] = Target(row.path, (), row.layout)
  for layer in range(cfg.num_layers):
    for row in layer_rows(cfg):
      if cfg.scan_layers:
        path, index = ("blocks",) + row.path, (layer,)
      else:
        path, index = ("blocks", layer) + row.path, ()
      for expert in range(cfg.num_experts) if row.per_expert else (None,):
        name = row.hf_name.format(layer=layer, expert=expert)
        table[name] = Target(path, index + ((expert,) if row.per_expert else ()), row.layout)
  return table


# ----------------------------------------------------------------------------------------------
# Config


def model_config_from_hf(hf: dict, *, param_dtype: Optional[str] = None,
                         compute_dtype: Optional[str] = None) -> ModelConfig:
  """ModelConfig for an HF config.json dict; raises HFConversionError for what it cannot match."""
  model_type = hf.get("model_type")
  if model_type not in SUPPORTED_TYPES:
    raise HFConversionError(f"HF model_type={model_type!r} is not supported; supported: "
                            f"{', '.join(SUPPORTED_TYPES)} (Llama-family decoders)")
  if hf.get("hidden_act", "silu") != "silu":
    raise HFConversionError(f"HF hidden_act={hf['hidden_act']!r}: mai_jax's MLP is SwiGLU (silu)")
  for key in ("attention_bias", "mlp_bias"):
    if hf.get(key):
      raise HFConversionError(f"HF {key}=true: mai_jax projections have no biases")
  rope = _rope(hf)  # fields of ModelConfig
  heads = hf["num_attention_heads"]
  stored = _dtype_name(hf.get("dtype") or hf.get("torch_dtype") or "float32")
  param_dtype = param_dtype or stored
  moe = {}
  if model_type == "mixtral":
    moe = dict(num_experts=hf["num_local_experts"], experts_per_token=hf["num_experts_per_tok"],
               d_ff_expert=hf["intermediate_size"], router="softmax_topk")
  return ModelConfig(**moe,
      num_layers=hf["num_hidden_layers"], d_model=hf["hidden_size"], num_heads=heads,
      num_kv_heads=hf.get("num_key_value_heads") or heads,
      head_dim=hf.get("head_dim") or hf["hidden_size"] // heads, d_ff=hf["intermediate_size"],
      vocab_size=hf["vocab_size"], **rope,
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      norm_eps=float(hf.get("rms_norm_eps", 1e-6)), param_dtype=param_dtype,
      compute_dtype=compute_dtype or param_dtype, remat="none", scan_layers=True)


def _rope(hf: dict) -> dict:
  """ModelConfig rope fields from either layout (transformers >= 5 `rope_parameters`, older
  `rope_theta` + `rope_scaling`). 'llama3' scaling is implemented; other scaled variants would
  change the logits, so they are refused."""
  params = dict(hf.get("rope_parameters") or {})
  scaling = dict(hf.get("rope_scaling") or {})
  merged = {**params, **scaling}
  kinds = {params.get("rope_type"), scaling.get("rope_type"), scaling.get("type")} - {None}
  fields = {"rope_theta": float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))}
  for kind in sorted(kinds - {"default"}):
    if kind != "llama3":
      raise HFConversionError(f"HF rope type {kind!r} (rope scaling) is not supported: mai_jax "
                              f"implements unscaled and 'llama3' rotary embeddings only, so "
                              f"logits would differ")
    try:
      fields.update(rope_scaling_factor=float(merged["factor"]),
                    rope_low_freq_factor=float(merged["low_freq_factor"]),
                    rope_high_freq_factor=float(merged["high_freq_factor"]),
                    rope_original_max_len=int(merged["original_max_position_embeddings"]))
    except KeyError as e:
      raise HFConversionError(f"HF 'llama3' rope scaling lacks {e.args[0]!r}") from None
  return fields


def _dtype_name(name: str) -> str:
  """HF checkpoint dtype -> a mai_jax param dtype (float16 widens to float32, exactly)."""
  name = str(name).replace("torch.", "")
  return "bfloat16" if name == "bfloat16" else "float32"


def config_from_hf(hf_dir: str, *, param_dtype: Optional[str] = None,
                   compute_dtype: Optional[str] = None) -> Config:
  """A mai_jax Config (model section from HF, the rest defaults) for the checkpoint in hf_dir."""
  path = os.path.join(hf_dir, CONFIG_FILE)
  if not os.path.isfile(path):
    raise HFConversionError(f"{path} not found; --hf-dir must be a directory written by "
                            f"save_pretrained (config.json + *.safetensors)")
  hf = config_lib.read_json(path, "it must be the config.json save_pretrained writes")
  if not isinstance(hf, dict):
    raise HFConversionError(f"{path}: expected a JSON object, as save_pretrained writes it")
  if hf.get("sliding_window") and hf.get("use_sliding_window", True):
    print(f"mai-jax: note: {path} sets sliding_window={hf['sliding_window']}; mai_jax attends to "
          f"the full context, which matches only for sequences up to that length")
  return Config(model=model_config_from_hf(hf, param_dtype=param_dtype,
                                           compute_dtype=compute_dtype))


# ----------------------------------------------------------------------------------------------
# Import


def safetensors_files(hf_dir: str) -> list[str]:
  """The checkpoint's shard files: from the index when there is one, else every *.safetensors."""
  index = os.path.join(hf_dir, INDEX_FILE)
  if os.path.isfile(index):
    with open(index) as f:
      names = sorted(set(json.load(f)["weight_map"].values()))
    files = [os.path.join(hf_dir, n) for n in names]
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
      raise HFConversionError(f"{index} lists shards that are missing: {missing}")
    return files
  files = sorted(glob.glob(os.path.join(hf_dir, "*.safetensors")))
  if not files:
    raise HFConversionError(f"no *.safetensors in {hf_dir}; (PyTorch .bin pickles are never "
                            f"loaded: convert them with save_pretrained(safe_serialization=True))")
  return files


def iter_tensors(files: list[str]) -> Iterator[tuple[str, np.ndarray]]:
  """(name, host array) one tensor at a time; bfloat16 read through the flax backend on the CPU."""
  cpu = jax.devices("cpu")[0]
  for path in files:
    with jax.default_device(cpu), safe_open(path, framework="flax") as f:
      for name in f.keys():
        yield name, np.asarray(f.get_tensor(name))


def _get(tree: dict, path: tuple):
  for key in path:
    tree = tree[key]
  return tree


def _set(tree: dict, path: tuple, value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def load_params(hf_dir: str, cfg: Config, mesh: jax.sharding.Mesh) -> dict:
  """Reads hf_dir's safetensors into a sharded mai_jax params dict (see module docstring)."""
  table = tensor_table(cfg.model)
  _, abstract, logical = state_lib.abstract_model(lambda r: Decoder(cfg.model, rngs=r))
  shardings = state_lib.param_shardings(mesh, cfg.mesh.rules, abstract, logical)
  remaining = {}  # path -> tensors still to come
  for target in table.values():
    remaining[target.path] = remaining.get(target.path, 0) + 1
  buffers: dict[tuple, np.ndarray] = {}
  params: dict = {}
  seen = set()
  for name, w in iter_tensors(safetensors_files(hf_dir)):
    if _IGNORED.fullmatch(name) or (cfg.model.tie_embeddings and name == "lm_head.weight"):
      continue
    if name not in table:
      raise HFConversionError(f"{hf_dir}: tensor {name!r} has no mai_jax counterpart (this "
                              f"converter handles {', '.join(SUPPORTED_TYPES)} without biases)")
    if name in seen:
      raise HFConversionError(f"{hf_dir}: tensor {name!r} appears in two shards")
    seen.add(name)
    target = table[name]
    spec = _get(abstract, target.path)
    if target.path not in buffers:
      buffers[target.path] = np.empty(spec.shape, spec.dtype)
    value = target.layout.to_mai(w, cfg.model)
    expected = spec.shape[len(target.index):]
    if value.shape != expected:
      raise HFConversionError(f"{hf_dir}: tensor {name!r} has shape {w.shape}, which does not fit "
                              f"mai_jax shape {expected} from config.json")
    buffers[target.path][target.index] = value.astype(spec.dtype)
    remaining[target.path] -= 1
    if not remaining[target.path]:  # complete: send it to its devices, free the host copy
      host = buffers.pop(target.path)
      sharding = _get(shardings, target.path)
      _set(params, target.path,
           jax.make_array_from_callback(host.shape, sharding, lambda idx, h=host: h[idx]))
  missing = sorted(set(table) - seen)
  if missing:
    raise HFConversionError(f"{hf_dir}: {len(missing)} tensors missing, e.g. {missing[:3]}")
  return params


def from_hf(hf_dir: str, *, mesh: Optional[jax.sharding.Mesh] = None,
            param_dtype: Optional[str] = None, compute_dtype: Optional[str] = None):
  """(Config, Decoder) with the weights of the HF Llama-family checkpoint in `hf_dir`.

  The Decoder's params are sharded over `mesh` (default: all devices, FSDP) by the default rules;
  dtypes default to the checkpoint's (bfloat16 stays bfloat16, float16 widens to float32).
  """
  cfg = config_from_hf(hf_dir, param_dtype=param_dtype, compute_dtype=compute_dtype)
  mesh = mesh if mesh is not None else sharding_lib.make_mesh(cfg.mesh)
  params = load_params(hf_dir, cfg, mesh)
  spec, _, _ = state_lib.abstract_model(lambda r: Decoder(cfg.model, rngs=r))
  return cfg, spec.merge(params)


# ----------------------------------------------------------------------------------------------
# Export


def check_exportable(m: ModelConfig) -> None:
  """Refuses (one line, naming the key) an MoE model that MixtralForCausalLM would compute
  differently: its router is a softmax over all experts, top-k, renormalized (mai_jax's
  'softmax_topk'), every layer is sparse and no expert is shared. A sigmoid_bias (DeepSeek-V3)
  router is not exported as Mixtral: its softmax gives other expert weights, so other logits."""
  if not m.num_experts:
    return
  if m.router != "softmax_topk":
    raise HFConversionError(
        f"model.router={m.router!r} cannot be exported: MixtralForCausalLM routes with a softmax "
        f"over all experts (mai_jax's 'softmax_topk'), so its logits would differ; only "
        f"softmax_topk MoE models convert to Hugging Face")
  for key, plain in (("num_shared_experts", 0), ("first_dense_layers", 0),
                     ("moe_layer_interval", 1)):
    if getattr(m, key) != plain:
      raise HFConversionError(f"model.{key}={getattr(m, key)} cannot be exported: "
                              f"MixtralForCausalLM has every layer sparse and no shared experts "
                              f"(needs model.{key}={plain})")


def hf_config(cfg: Config, *, bos_id: Optional[int] = None, eos_id: Optional[int] = None) -> dict:
  """config.json contents of a LlamaForCausalLM (MixtralForCausalLM with experts) like cfg.model."""
  m = cfg.model
  check_exportable(m)
  moe = {}
  if m.num_experts:
    moe = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
           "num_local_experts": m.num_experts, "num_experts_per_tok": m.experts_per_token,
           "intermediate_size": expert_d_ff(m)}  # d_ff_expert=0 means d_ff
  return {
      "architectures": ["LlamaForCausalLM"], "model_type": "llama",
      "hidden_size": m.d_model, "intermediate_size": m.d_ff, "num_hidden_layers": m.num_layers,
      "num_attention_heads": m.num_heads, "num_key_value_heads": m.num_kv_heads,
      "head_dim": m.head_dim, "vocab_size": m.vocab_size, "rms_norm_eps": m.norm_eps,
      "rope_theta": m.rope_theta, "rope_parameters": _hf_rope(m),
      "rope_scaling": _hf_rope(m) if m.rope_scaling_factor != 1 else None,
      "tie_word_embeddings": m.tie_embeddings, "hidden_act": "silu", "attention_bias": False,
      "mlp_bias": False, "max_position_embeddings": max(cfg.data.seq_len, 2048),
      "dtype": m.param_dtype, "torch_dtype": m.param_dtype, "bos_token_id": bos_id,
      "eos_token_id": eos_id, **moe,
  }


def _hf_rope(m: ModelConfig) -> dict:
  if m.rope_scaling_factor == 1:
    return {"rope_type": "default", "rope_theta": m.rope_theta}
  return {"rope_type": "llama3", "rope_theta": m.rope_theta, "factor": m.rope_scaling_factor,
          "low_freq_factor": m.rope_low_freq_factor, "high_freq_factor": m.rope_high_freq_factor,
          "original_max_position_embeddings": m.rope_original_max_len}


def to_hf(cfg: Config, params: dict, out_dir: str, *, bos_id: Optional[int] = None,
          eos_id: Optional[int] = None, max_shard_bytes: int = 4 << 30) -> list[str]:
  """Writes config.json and model*.safetensors (with an index when sharded) into out_dir.

  `params` is a mai_jax params dict (e.g. TrainState.params); returns the written shard files.
  Tensors are gathered to the host one parameter at a time.
  """
  from safetensors.flax import save_file  # keeps bfloat16 (numpy has no bfloat16)

  check_exportable(cfg.model)
  os.makedirs(out_dir, exist_ok=True)
  table = tensor_table(cfg.model)
  by_path: dict[tuple, list[tuple[str, Target]]] = {}
  for name, target in table.items():
    by_path.setdefault(target.path, []).append((name, target))
  shards: list[dict[str, jax.Array]] = [{}]
  size = 0
  for path, entries in by_path.items():
    host = np.asarray(jax.device_get(_get(params, path)))
    for name, target in entries:
      w = np.ascontiguousarray(target.layout.to_hf(host[target.index], cfg.model))
      if size and size + w.nbytes > max_shard_bytes:
        shards.append({})
        size = 0
      shards[-1][name] = jnp.asarray(w, device=jax.devices("cpu")[0])
      size += w.nbytes
    del host
  files = []
  if len(shards) == 1:
    names = ["model.safetensors"]
  else:
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
  weight_map = {}
  for name, shard in zip(names, shards):
    save_file(shard, os.path.join(out_dir, name), metadata={"format": "pt"})
    files.append(os.path.join(out_dir, name))
    weight_map.update({k: name for k in shard})
  shards.clear()
  if len(names) > 1:
    total = sum(os.path.getsize(f) for f in files)
    with open(os.path.join(out_dir, INDEX_FILE), "w") as f:
      json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
  with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
    json.dump(hf_config(cfg, bos_id=bos_id, eos_id=eos_id), f, indent=2)
  return files
