"""The lm-eval model `mai_jax`: a workdir's checkpoint behind lm_eval's LM interface.

Why a TemplateLM: it owns lm-eval's request tokenization (trailing context spaces move to the
continuation, continuation ids are those of context + continuation after the context's), so
the token pairs scored here are those the harness's own `hf` model scores for the same
tokenizer. Text is encoded as a Llama tokenizer does by default: [bos] + ids (add_bos_token=False
turns that off); an empty context is [bos] (eos without one), lm-eval's prefix token.

- loglikelihood: batches of right-padded rows on the mesh's batch axes (evaluate.
  continuation_scores; pads neither score nor causally affect real tokens), sorted by length.
- loglikelihood_rolling: lm-eval's disjoint windows of max_length tokens, scored the same way.
- generate_until: the KV-cache sampler (sample.generate: left-padded prompts, greedy unless the
  task asks do_sample), then the text is cut at the first stop string, as the hf model does.

max_length defaults to data.seq_len (the context the weights were trained at).
"""

from __future__ import annotations

import json
import math
from typing import Optional

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval import utils as eval_utils
from lm_eval.models import utils as lm_utils
from tqdm import tqdm

from mai_jax import sample
from mai_jax import sharding as sharding_lib
from mai_jax.config import Config, ConfigError
from mai_jax.evaluate import continuation_scores
from mai_jax.model import count_params
from mai_jax.train import step as step_lib

DEFAULT_BATCH_SIZE = 16
# What lm_eval's command line adds to every model's arguments; the mesh decides placement.
HARNESS_EXTRAS = frozenset({"device", "max_batch_size"})


def _flag(value, name: str) -> bool:
  if isinstance(value, bool):
    return value
  if str(value).lower() in ("true", "1", "yes"):
    return True
  if str(value).lower() in ("false", "0", "no"):
    return False
  raise ConfigError(f"--model_args {name}={value!r} must be True or False")


def _int(value, name: str, default: int) -> int:
  if value is None or value == "auto":
    return default
  try:
    out = int(value)
  except (TypeError, ValueError):
    raise ConfigError(f"--model_args {name}={value!r} must be an integer") from None
  if out < 1:
    raise ConfigError(f"--model_args {name}={out} must be >= 1")
  return out


def batch_row_shards(mesh, cfg: Config) -> int:
  """How many ways the mesh splits a batch's rows (a batch must be a multiple of it)."""
  spec = step_lib.batch_sharding(mesh, cfg).spec[0]
  axes = spec if isinstance(spec, tuple) else () if spec is None else (spec,)
  return math.prod(mesh.shape[a] for a in axes)


@register_model("mai_jax")
class MaiJaxLM(TemplateLM):
  """`--model mai_jax --model_args workdir=W[,step=S,batch_size=B,max_length=L,
  add_bos_token=False,max_gen_toks=N]`, or `MaiJaxLM.from_model(...)` in a Python process."""

  def __init__(self, workdir: Optional[str] = None, step=None, batch_size=None,
               max_length=None, add_bos_token=True, max_gen_toks=256, progress=True,
               _loaded=None, **unused):
    super().__init__()
    unknown = sorted(set(unused) - HARNESS_EXTRAS)
    if unknown:
      raise ConfigError(f"--model_args {', '.join(unknown)}: not an argument of the mai_jax "
                        f"model (workdir, step, batch_size, max_length, max_gen_toks, "
                        f"add_bos_token, progress)")
    if _loaded is None:
      if not workdir:
        raise ConfigError("--model mai_jax needs --model_args workdir=DIR (a `mai-jax train` or "
                          "`mai-jax convert from-hf` directory)")
      from mai_jax import workdir as workdir_lib  # pylint: disable=import-outside-toplevel
      step = None if step in (None, "") else _int(step, "step", 0)
      cfg, model, step, mesh = workdir_lib.load_model(str(workdir), step=step)
      _loaded = (cfg, model, workdir_lib.load_tokenizer(cfg, str(workdir)), mesh, step)
    self.cfg, self.model, self.tokenizer_, self.mesh, self.step = _loaded
    self.shards = batch_row_shards(self.mesh, self.cfg)
    rows = _int(batch_size, "batch_size", DEFAULT_BATCH_SIZE)
    self.rows = -(-rows // self.shards) * self.shards  # a multiple of the batch shards
    self._max_length = _int(max_length, "max_length", self.cfg.data.seq_len)
    self._max_gen_toks = _int(max_gen_toks, "max_gen_toks", 256)
    self.add_bos = _flag(add_bos_token, "add_bos_token")
    self.progress = _flag(progress, "progress")
    tok = self.tokenizer_
    self.bos = tok.bos_id if tok.bos_id is not None and tok.bos_id >= 0 else None
    self.eos = tok.eos_id if tok.eos_id is not None and tok.eos_id >= 0 else None
    if self.bos is None and self.eos is None:
      raise ConfigError(f"{tok!r} defines neither bos nor eos: lm-eval needs one as the prefix "
                        f"of an empty context")
    self._batch_sharding = step_lib.batch_sharding(self.mesh, self.cfg)

  @classmethod
  def from_model(cls, cfg: Config, model, tokenizer, mesh, step: int = 0, **kwargs):
    """An LM over a model already in memory (e.g. the train loop's current params)."""
    return cls(_loaded=(cfg, model, tokenizer, mesh, step), **kwargs)

  # ------------------------------------------------------------------------ lm-eval's contract
  @property
  def eot_token_id(self) -> int:
    return self.eos if self.eos is not None else self.bos

  @property
  def prefix_token_id(self) -> int:
    return self.bos if self.bos is not None else self.eos

  @property
  def max_length(self) -> int:
    return self._max_length

  @property
  def max_gen_toks(self) -> int:
    return self._max_gen_toks

  @property
  def batch_size(self) -> int:
    return self.rows

  def get_model_info(self) -> dict:
    return {"mai_jax_step": self.step, "mai_jax_params": count_params(self.cfg.model)}

  def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None,
                 left_truncate_len: Optional[int] = None, **kwargs) -> list[int]:
    bos = self.add_bos if add_special_tokens is None else add_special_tokens
    ids = ([self.bos] if bos and self.bos is not None else []) + self.tokenizer_.encode(string)
    return ids[-left_truncate_len:] if left_truncate_len else ids

  def tok_decode(self, ids) -> str:
    special = {self.bos, self.eos, self.tokenizer_.pad_id,  # as hf's skip_special_tokens
               *getattr(self.tokenizer_, "special_ids", ())}
    return self.tokenizer_.decode([int(i) for i in ids if int(i) not in special])

  def _bar(self, total: int, desc: str, disable: bool):
    return tqdm(total=total, desc=desc, disable=disable or not self.progress)

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
    """[(log p(continuation | context), greedy)] for lm-eval's ((ctx, cont), ctx ids, cont ids)."""
    pairs = []
    for _, context, continuation in requests:
      if len(continuation) > self.max_length:
        raise ConfigError(f"a continuation of {len(continuation)} tokens is longer than "
                          f"max_length={self.max_length}: raise --model_args max_length")
      pairs.append((list(context), list(continuation)))
    with self._bar(len(pairs), "mai_jax loglikelihood", disable_tqdm) as bar, \
        sharding_lib.activate(self.mesh, self.cfg.mesh.rules):
      scores, greedy = continuation_scores(self.model, pairs, batch_size=self.rows,
                                           max_len=self.max_length,
                                           sharding=self._batch_sharding, on_rows=bar.update)
    out = [(float(s), bool(g)) for s, g in zip(scores, greedy)]
    for (strings, _, _), result in zip(requests, out):
      if strings is not None:
        self.cache_hook.add_partial("loglikelihood", strings, result)
    return out

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    windows, owner = [], []
    for index, (string,) in enumerate(req.args for req in requests):
      for context, continuation in map(eval_utils.make_disjoint_window,
                                       eval_utils.get_rolling_token_windows(
                                           token_list=self.tok_encode(string),
                                           prefix_token=self.prefix_token_id,
                                           max_seq_len=self.max_length, context_len=1)):
        windows.append((None, context, continuation))
        owner.append(index)
    scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
    totals = [0.0] * len(requests)
    for index, (score, _) in zip(owner, scores):
      totals[index] += score
    for req, total in zip(requests, totals):
      self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
    return totals

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    """Continuations cut at the task's stop strings (and the eos text); requests sharing
    generation settings run as left-padded batches of the KV-cache sampler."""
    groups: dict[str, list[int]] = {}
    for i, req in enumerate(requests):
      groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
    results: list[Optional[str]] = [None] * len(requests)
    eos_text = self.tokenizer_.decode([self.eot_token_id])
    with self._bar(len(requests), "mai_jax generate_until", disable_tqdm) as bar:
      for indices in groups.values():
        kwargs = lm_utils.normalize_gen_kwargs(dict(requests[indices[0]].args[1]),
                                               self.max_gen_toks)
        until = lm_utils.handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
        new_tokens = int(kwargs.pop("max_gen_toks"))
        room = self.max_length - new_tokens
        if room < 1:
          raise ConfigError(f"max_gen_toks={new_tokens} leaves no room for a prompt within "
                            f"max_length={self.max_length}: raise --model_args max_length")
        settings = sample.SamplingConfig(
            max_new_tokens=new_tokens,
            temperature=float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0,
            top_k=int(kwargs.get("top_k") or 0), top_p=float(kwargs.get("top_p") or 1.0),
            seed=int(kwargs.get("seed") or 0))
        order = sorted(indices, key=lambda i: -len(self.tok_encode(requests[i].args[0])))
        for start in range(0, len(order), self.rows):
          chunk = order[start:start + self.rows]
          prompts = [self.tok_encode(requests[i].args[0], left_truncate_len=room) for i in chunk]
          outs = sample.generate(self.model, prompts, settings, eos_id=self.eos,
                                 pad_id=self.tokenizer_.pad_id, mesh=self.mesh,
                                 rules=self.cfg.mesh.rules)
          for i, out in zip(chunk, outs):
            text = lm_utils.postprocess_generated_text(self.tok_decode(out), until, None)
            results[i] = text
            self.cache_hook.add_partial("generate_until", requests[i].args, text)
          bar.update(len(chunk))
    return results
