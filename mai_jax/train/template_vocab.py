"""A fine-tuning run's vocabulary: its tokenizer plus the chat template's missing special tokens.

Decided before the model is built, since model.vocab_size follows it. For train.objective 'sft'
and the preference objectives, the tokenizer the run would start with (data.tokenizer_path, the
workdir's own, else train.init_from's) is checked for the template's special tokens
(data/template_tokens.py); the missing ones are appended into a staging copy, which the run
commits into its workdir like any adopted tokenizer, and the run's config gets
model.vocab_size = the new size and data.tokenizer_path = '' (so readers load the workdir's
extended copy). train/init_from.py grows the embeddings of the starting weights to match.

Resuming repeats the decision and lands on the same vocabulary: re-extending the same base gives
byte-identical files, and a workdir tokenizer that already ends with the template's tokens sets
model.vocab_size to its size.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from typing import Callable, Optional

from mai_jax.config import PREFERENCE_OBJECTIVES, Config, ConfigError
from mai_jax.data import template_tokens
from mai_jax.data.chat_template import load_template
from mai_jax.data.tokenizer import HF_TOKENIZER_FILE, TOKENIZER_FILE, Tokenizer, load_tokenizer

Log = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class Extension:
  """The extended tokenizer in `staging`, the tokens it added and its base's content hash."""
  tokenizer: Tokenizer
  staging: str
  added: tuple[str, ...]
  base_hash: str

  def copies(self) -> dict[str, str]:
    """Staged file -> its name in the workdir (side files first, the main file last)."""
    names = [n for n in (*template_tokens.SIDE_FILES, TOKENIZER_FILE, HF_TOKENIZER_FILE)
             if os.path.isfile(os.path.join(self.staging, n))]
    return {os.path.join(self.staging, n): n for n in names}


def _base_tokenizer(cfg: Config, workdir: str) -> Optional[Tokenizer]:
  """The tokenizer the run would load, unchecked; None when it would train one."""
  if cfg.data.tokenizer_path:
    return load_tokenizer(cfg.data.tokenizer_path, cfg.data.tokenizer_pattern)
  folders = [workdir]
  if cfg.train.init_from:
    folders.append(os.path.abspath(cfg.train.init_from))
  for folder in folders:
    for name in (TOKENIZER_FILE, HF_TOKENIZER_FILE):
      if os.path.isfile(os.path.join(folder, name)):
        return load_tokenizer(os.path.join(folder, name))
  return None


def plan(cfg: Config, workdir: str, log: Log) -> tuple[Config, Optional[Extension]]:
  """(the run's config with its vocabulary decided, the staged extension or None)."""
  if cfg.train.objective not in ("sft", *PREFERENCE_OBJECTIVES):
    return cfg, None  # pretraining and distillation render no chat template
  try:
    base = _base_tokenizer(cfg, workdir)
  except ConfigError:
    return cfg, None  # the tokenizer checks of the run say what is wrong
  if base is None:
    return cfg, None
  wanted = template_tokens.template_tokens(load_template(cfg.data.chat_template))
  missing = template_tokens.missing_tokens(base, wanted)
  vocab = cfg.model.vocab_size
  if not missing:
    if base.vocab_size > vocab and template_tokens.added_at_end(base, vocab, wanted):
      return _with_vocab(cfg, base.vocab_size, cfg.data.tokenizer_path), None
    return cfg, None
  if not template_tokens.can_add(base):
    log(f"mai-jax: WARNING: tokenizer {base.path} lacks the chat template's tokens "
        f"{', '.join(missing)} and a {type(base).__name__} cannot take new ones: they are "
        f"spelled in several tokens")
    return cfg, None
  if base.vocab_size != vocab:
    return cfg, None  # a size mismatch to begin with: the tokenizer checks of the run refuse it
  staging = tempfile.mkdtemp(prefix="mai_jax_template_tokens_")
  try:
    extended = template_tokens.add_tokens(base, missing, staging)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  log(f"mai-jax: tokenizer: added the chat template's tokens {', '.join(missing)} to "
      f"{base.path} as ids {vocab}..{extended.vocab_size - 1} (model.vocab_size {vocab} -> "
      f"{extended.vocab_size}); the extended tokenizer is saved in the workdir")
  return (_with_vocab(cfg, extended.vocab_size, ""),
          Extension(extended, staging, tuple(missing), base.content_hash))


def _with_vocab(cfg: Config, vocab_size: int, tokenizer_path: str) -> Config:
  return dataclasses.replace(
      cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab_size),
      data=dataclasses.replace(cfg.data, tokenizer_path=tokenizer_path))
