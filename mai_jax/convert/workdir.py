"""`mai-jax convert`: an HF checkpoint directory <-> a mai_jax workdir.

from-hf writes config.json, a params-only checkpoint at step 0 (checkpoints/0, read by
`workdir.load_params`) and the tokenizer files, so `eval`, `sample` and `convert to-hf` work on it.
Training from it: `mai-jax train --config WORKDIR/config.json --workdir RUN
--config.train.init_from=WORKDIR` (a fresh optimizer state; see train/init_from.py).
"""

from __future__ import annotations

import os
import shutil
from typing import Optional

import jax
from flax import nnx

from mai_jax import __version__
from mai_jax import checkpoint as checkpoint_lib
from mai_jax import config as config_lib
from mai_jax import sharding as sharding_lib
from mai_jax import workdir as workdir_lib
from mai_jax.config import Config, ConfigError
from mai_jax.convert import hf

# Files save_pretrained writes for a tokenizer; `convert` copies the ones present.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "generation_config.json")


def _copy_tokenizer(src: str, dst: str) -> list[str]:
  copied = []
  for name in TOKENIZER_FILES:
    if os.path.isfile(os.path.join(src, name)):
      shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
      copied.append(name)
  return copied


def hf_to_workdir(hf_dir: str, workdir: str, *, param_dtype: Optional[str] = None,
                  overrides: Optional[dict[str, str]] = None) -> Config:
  """Imports hf_dir into a new workdir; returns its Config."""
  cfg = hf.config_from_hf(hf_dir, param_dtype=param_dtype)
  cfg = config_lib.apply_overrides(cfg, overrides or {})
  config_lib.validate(cfg)
  directory = os.path.join(os.path.abspath(workdir), workdir_lib.CHECKPOINTS)
  if checkpoint_lib.latest_step(directory) is not None:
    raise ConfigError(f"{directory} already holds checkpoints; convert into a new --workdir")
  mesh = sharding_lib.make_mesh(cfg.mesh)
  params = hf.load_params(hf_dir, cfg, mesh)
  os.makedirs(workdir, exist_ok=True)
  from mai_jax.train.loop import write_config
  write_config(cfg, workdir)
  copied = _copy_tokenizer(hf_dir, workdir)
  if not copied:
    print(f"mai-jax: note: {hf_dir} has no tokenizer files; sample/eval will need "
          f"--config.data.tokenizer_path")
  checkpoint_lib.save_params(directory, 0, params, config_lib.to_dict(cfg),
                             {"mai_jax_version": __version__, "jax_version": jax.__version__,
                              "imported_from": os.path.abspath(hf_dir)})
  return cfg


def workdir_to_hf(workdir: str, out_dir: str, *, cfg: Optional[Config] = None,
                  step: Optional[int] = None) -> list[str]:
  """Exports the params of checkpoint `step` (default: the latest good one) as a
  LlamaForCausalLM (MixtralForCausalLM) directory; returns the shard files. What the target
  architecture cannot express is refused before anything is read or written."""
  if cfg is not None:
    hf.check_exportable(cfg.model)
  cfg, model, _, _ = workdir_lib.load_model(workdir, cfg=cfg, step=step)
  hf.check_exportable(cfg.model)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  bos = eos = None
  try:
    tokenizer = workdir_lib.load_tokenizer(cfg, workdir)
    bos, eos = (i if i is not None and i >= 0 else None for i in (tokenizer.bos_id,
                                                                   tokenizer.eos_id))
  except ConfigError:
    pass
  files = hf.to_hf(cfg, params, out_dir, bos_id=bos, eos_id=eos)
  _copy_tokenizer(workdir, out_dir)
  return files
