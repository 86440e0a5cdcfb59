"""A Hugging Face `tokenizer.json` behind mai_jax's Tokenizer interface (encode/decode/bos/eos/pad).

Imported checkpoints bring their own tokenizer; sampling and evaluation of such a workdir need it.
Special tokens come from tokenizer_config.json (`bos_token`, `eos_token`, `pad_token`, as strings
or {"content": ...}) next to tokenizer.json, else from the ids in (generation_)config.json.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Optional, Sequence

from mai_jax.config import ConfigError

TOKENIZER_JSON = "tokenizer.json"
# Files save_pretrained writes for a tokenizer; `convert` copies the ones present.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "generation_config.json")


class HFTokenizer:
  """tokenizers.Tokenizer from DIR/tokenizer.json; encode adds no special tokens."""

  def __init__(self, directory: str):
    from tokenizers import Tokenizer as _Tokenizer

    self.path = os.path.join(directory, TOKENIZER_JSON)
    if not os.path.isfile(self.path):
      raise ConfigError(f"{self.path} not found: copy the model's tokenizer.json into the workdir")
    with open(self.path, "rb") as f:
      self.content_hash = hashlib.sha256(f.read()).hexdigest()
    self._tok = _Tokenizer.from_file(self.path)
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    settings = _read_json(os.path.join(directory, "tokenizer_config.json"))
    # An HF config.json or generation_config.json may carry the ids (a mai_jax config.json has no
    # *_token_id keys, so reading it too is harmless).
    model_cfg = {**_read_json(os.path.join(directory, "config.json")),
                 **_read_json(os.path.join(directory, "generation_config.json"))}
    self.bos_id = self._special(settings, model_cfg, "bos")
    self.eos_id = self._special(settings, model_cfg, "eos")
    pad = self._special(settings, model_cfg, "pad")
    self.pad_id = pad if pad is not None else (self.eos_id if self.eos_id is not None else 0)

  def _special(self, settings: dict, model_cfg: dict, kind: str) -> Optional[int]:
    token = settings.get(f"{kind}_token")
    if isinstance(token, dict):
      token = token.get("content")
    if isinstance(token, str):
      token_id = self._tok.token_to_id(token)
      if token_id is not None:
        return token_id
    token_id = model_cfg.get(f"{kind}_token_id")
    if isinstance(token_id, list):  # Llama 3 lists several eos ids; the first ends a turn
      token_id = token_id[0] if token_id else None
    return token_id

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Sequence[int]) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


def _read_json(path: str) -> dict:
  if not os.path.isfile(path):
    return {}
  with open(path) as f:
    return json.load(f)
