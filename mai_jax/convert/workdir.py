"""`mai-jax convert`: an HF checkpoint directory <-> a mai_jax workdir.

from-hf writes config.json, a params-only checkpoint at step 0 (checkpoints/0, read by
`workdir.load_params`) and the tokenizer files, so `eval`, `sample` and `convert to-hf` work on it.
Training from it: `mai-jax train --config WORKDIR/config.json --workdir RUN
--config.train.init_from=WORKDIR` (a fresh optimizer state; see train/init_from.py).

Chat templates travel both ways. from-hf copies chat_template.jinja (transformers >= 4.43 saves
the template there) with the tokenizer files, and when the model has a template sets
data.chat_template to the new workdir, so `sample --chat`, `chat` and a fine-tuning run from it
render what the model was tuned on. to-hf writes the workdir's template, when it has one (a
template other than the default, or a run fine-tuned with one), as chat_template.jinja and as
tokenizer_config.json's `chat_template`, so transformers' `apply_chat_template` works on the
export; a template whose bos our renderer prepends as an id (the built-in ChatML) is exported
with a leading `{{ bos_token }}`, so transformers' token ids are the ones the model was trained on.
"""

from __future__ import annotations

import dataclasses
import json
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
                   "tokenizer.model", "generation_config.json", "chat_template.jinja")
CHAT_TEMPLATE_FILE = "chat_template.jinja"


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
  if _has_chat_template(hf_dir) and "data.chat_template" not in (overrides or {}):
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(
        cfg.data, chat_template=os.path.abspath(workdir)))
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
  template = _exported_template(cfg)
  files = hf.to_hf(cfg, params, out_dir, bos_id=bos, eos_id=eos)
  _copy_tokenizer(workdir, out_dir)
  if template is not None:
    specials = {k: _token_text(tokenizer, i) for k, i in (("bos_token", bos), ("eos_token", eos))
                if i is not None}
    write_chat_template(template, out_dir, specials)
  return files


def _token_text(tokenizer, token_id: int) -> str:
  piece = getattr(tokenizer, "id_to_piece", None)
  return piece(token_id) if piece is not None else tokenizer.decode([token_id])


def _has_chat_template(hf_dir: str) -> bool:
  from mai_jax.data.chat_template import ChatError, load_template  # pylint: disable=import-outside-toplevel
  try:
    load_template(hf_dir)
    return True
  except ChatError:
    return False


def _exported_template(cfg: Config):
  """The workdir's chat template, or None for a model that never had one (a pretraining run
  with the default setting); loaded before anything is written, so a bad one refuses early."""
  if cfg.data.chat_template == "chatml" and cfg.train.objective == "pretrain":
    return None
  from mai_jax.data.chat_template import load_template  # pylint: disable=import-outside-toplevel
  return load_template(cfg.data.chat_template)


def write_chat_template(template, out_dir: str, specials: Optional[dict] = None) -> None:
  """Writes `template` as out_dir/chat_template.jinja and as the `chat_template` of
  out_dir/tokenizer_config.json (created when absent, with `specials`' bos_token/eos_token when
  it names none), the two places transformers reads."""
  source = ("{{- bos_token -}}" + template.source) if template.prepend_bos else template.source
  with open(os.path.join(out_dir, CHAT_TEMPLATE_FILE), "w", encoding="utf-8") as f:
    f.write(source)
  path = os.path.join(out_dir, "tokenizer_config.json")
  settings = {}
  if os.path.isfile(path):
    with open(path, encoding="utf-8") as f:
      settings = json.load(f)
  for key, value in (specials or {}).items():
    settings.setdefault(key, value)
  settings["chat_template"] = source
  with open(path, "w", encoding="utf-8") as f:
    json.dump(settings, f, indent=2, ensure_ascii=False)
