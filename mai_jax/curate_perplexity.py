"""The `perplexity` curation rule: a document's perplexity under a mai_jax workdir's model.

It sits above both mai_jax.data and the model (data.curate never imports the model): `mai-jax
data curate` registers it (settings.register_rule) before reading the config. The model and
tokenizer are loaded on first use in each worker process (after the local engine forks, so the
parent never starts JAX). A document's score is exp(-mean log p(token | bos, earlier tokens))
over its first `max_tokens` tokens, written to meta['perplexity']; documents above
`max_perplexity` are removed (false: score only), or, with `keep_top_fraction` instead, all but
the lowest-perplexity fraction of the corpus after dedup (data/curate/topcut.py). CCNet and
RedPajama keep the low-perplexity part of the web under a model trained on Wikipedia; here the
reference model is any workdir.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar, Optional

from mai_jax.data.curate import topcut
from mai_jax.data.curate.rules import KEEP, Decision
from mai_jax.data.curate.textstats import DocText


def perplexity(model, tokenizer, text: str, max_tokens: int, max_len: int) -> float:
  """exp of the mean negative log-likelihood of text's first max_tokens tokens after bos."""
  from mai_jax import evaluate  # pylint: disable=import-outside-toplevel
  ids = tokenizer.encode(text)[:max_tokens]
  if not ids:
    return math.inf
  logprob = evaluate.continuation_logprobs(model, [([tokenizer.bos_id], ids)], batch_size=1,
                                           max_len=max_len)[0]
  return math.exp(-float(logprob) / len(ids))


@dataclasses.dataclass(frozen=True)
class Perplexity:
  """Scores (and optionally filters) by perplexity under the latest checkpoint of `workdir`."""
  name: ClassVar[str] = "perplexity"
  workdir: str = ""
  max_perplexity: Optional[float] = None
  max_tokens: int = 256
  keep_top_fraction: Optional[float] = None
  higher_is_better: ClassVar[bool] = False

  def __post_init__(self):
    import os  # pylint: disable=import-outside-toplevel
    topcut.check(self, "max_perplexity")
    if not os.path.isdir(self.workdir):
      raise ValueError(f"workdir {self.workdir!r} is not a folder (a `mai-jax train` workdir)")

  def _loaded(self):
    loaded = self.__dict__.get("_loaded_model")
    if loaded is None:
      from mai_jax import workdir as workdir_lib  # pylint: disable=import-outside-toplevel
      cfg, model, _, _ = workdir_lib.load_model(self.workdir)
      loaded = (model, workdir_lib.load_tokenizer(cfg, self.workdir), cfg.data.seq_len)
      object.__setattr__(self, "_loaded_model", loaded)
    return loaded

  def _doc_score(self, doc: DocText) -> float:
    cached = doc.__dict__.get("perplexity")
    if cached is None:
      model, tokenizer, seq_len = self._loaded()
      cached = doc.__dict__["perplexity"] = perplexity(model, tokenizer, doc.text,
                                                        min(self.max_tokens, seq_len), seq_len)
    return cached

  def fields(self, doc: DocText) -> dict:
    return {"perplexity": round(self._doc_score(doc), 4)}

  def rank_score(self, doc: DocText) -> float:
    """What keep_top_fraction ranks by (lower first)."""
    return self._doc_score(doc)

  def apply(self, doc: DocText) -> Decision:
    if self.max_perplexity is not None and self._doc_score(doc) > self.max_perplexity:
      return "above_max_perplexity", None
    return KEEP
