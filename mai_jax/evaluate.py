"""Evaluation: validation loss / perplexity, and likelihood-based multiple-choice tasks.

Tasks are JSONL files, one example per line: {"context": str, "choices": [str, ...], "answer": int}.
As in lm-evaluation-harness, each choice is scored by the summed log-probability of its tokens
after the context; `acc` picks the highest sum, `acc_norm` the highest sum per character of the
choice (which removes the bias towards short answers). The continuation's tokens are those of
context + choice after the context's own tokens, so a tokenizer that merges across the boundary
is handled the way the harness does. Contexts longer than `max_len` keep their end.
The project's own tasks live in mai_jax/tasks/ and are sized for the tiny models of this repo.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import json
import math
import os
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mai_jax.config import Config, ConfigError
from mai_jax.train.step import token_losses

TASKS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tasks")
RESULTS_FILE = "eval.json"


def evaluate(eval_step, params, batches) -> float:
  """Token-weighted mean cross-entropy over the given (global, on-device) batches."""
  return evaluate_counted(eval_step, params, batches)[0]


def evaluate_counted(eval_step, params, batches) -> tuple[float, int]:
  """(mean cross-entropy, number of tokens it is the mean over): a perplexity means little
  without the size of the set it was measured on."""
  ce_total, tokens_total = 0.0, 0.0
  pending = [eval_step(params, batch) for batch in batches]
  for ce, tokens in jax.device_get(pending):
    ce_total += float(ce)
    tokens_total += float(tokens)
  return ce_total / max(tokens_total, 1.0), int(round(tokens_total))


# ----------------------------------------------------------------------------------------------
# Multiple-choice tasks


@dataclasses.dataclass(frozen=True)
class Example:
  context: str
  choices: tuple[str, ...]
  answer: int


def builtin_tasks() -> list[str]:
  return sorted(glob.glob(os.path.join(TASKS_DIR, "*.jsonl")))


def load_task(path: str) -> list[Example]:
  """Parses a task file; a malformed line is a ConfigError naming file:line and the fix."""
  if not os.path.isfile(path):
    raise ConfigError(f"task file {path} not found")
  examples = []
  with open(path) as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f"{path}:{number}"
      try:
        raw = json.loads(line)
      except json.JSONDecodeError as e:
        raise ConfigError(f"{where}: not JSON ({e.msg})") from None
      if not isinstance(raw, dict) or not isinstance(raw.get("context"), str):
        raise ConfigError(f"{where}: expected an object with a string 'context'")
      choices = raw.get("choices")
      if (not isinstance(choices, list) or len(choices) < 2
          or not all(isinstance(c, str) and c for c in choices)):
        raise ConfigError(f"{where}: 'choices' must be a list of at least 2 non-empty strings")
      answer = raw.get("answer")
      if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
        raise ConfigError(f"{where}: 'answer' must be an index into choices "
                          f"(0..{len(choices) - 1})")
      examples.append(Example(raw["context"], tuple(choices), answer))
  if not examples:
    raise ConfigError(f"task file {path} has no examples")
  return examples


def _length_bucket(n: int, max_len: int) -> int:
  """Rounds row lengths up to a power of two (>= 16) so few shapes get compiled."""
  return min(max(16, 1 << (n - 1).bit_length()), max_len)


@functools.partial(jax.jit, static_argnums=(0,))
def _sum_logprobs(graphdef, state, inputs_BT, targets_BT, weights_BT):
  """Per row: sum of log p(target) where weights are 1, and whether every such target is the
  argmax (lm-eval's `is_greedy`); inputs < 0 mark right padding."""
  model = nnx.merge(graphdef, state)
  segment_ids_BT = (inputs_BT >= 0).astype(jnp.int32)  # every row is one document
  logits_BTV = model(jnp.maximum(inputs_BT, 0), segment_ids_BT)
  _, ce_BT = token_losses(logits_BTV, targets_BT, 0.0)
  hit_BT = jnp.argmax(logits_BTV, axis=-1) == targets_BT
  greedy_B = jnp.all(hit_BT | (weights_BT == 0), axis=-1)
  return -jnp.sum(ce_BT * weights_BT, axis=-1), greedy_B


def continuation_logprobs(model: nnx.Module, pairs: Sequence[tuple[list[int], list[int]]], *,
                          batch_size: int, max_len: int) -> np.ndarray:
  """Summed log p(continuation | context) for each (context ids, continuation ids) pair."""
  return continuation_scores(model, pairs, batch_size=batch_size, max_len=max_len)[0]


def continuation_scores(model: nnx.Module, pairs: Sequence[tuple[list[int], list[int]]], *,
                        batch_size: int, max_len: int, sharding=None,
                        on_rows: Optional[Callable[[int], None]] = None):
  """(summed log p(continuation | context) [N] float64, greedy [N] bool) for each (context ids,
  continuation ids) pair.

  Rows are right-padded; pads neither score nor (causally) affect the real tokens. With
  `sharding` (a NamedSharding of [batch, T]) the rows are placed over the mesh's batch axes, so
  batch_size must be a multiple of their size. `on_rows(n)` is told after each batch (progress).
  """
  scores = np.zeros(len(pairs), np.float64)
  greedy = np.zeros(len(pairs), bool)
  order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
  graphdef, state = nnx.split(model)
  for start in range(0, len(order), batch_size):
    rows = order[start:start + batch_size]
    seqs = []
    for i in rows:
      context, continuation = pairs[i]
      if not continuation:
        raise ValueError("empty continuation")
      seqs.append(((context + continuation)[-(max_len + 1):], len(continuation)))
    T = _length_bucket(max(len(s) - 1 for s, _ in seqs), max_len)
    inputs = np.full((batch_size, T), -1, np.int32)
    targets = np.zeros((batch_size, T), np.int32)
    weights = np.zeros((batch_size, T), np.float32)
    for r, (seq, n) in enumerate(seqs):
      L = len(seq) - 1
      inputs[r, :L], targets[r, :L] = seq[:-1], seq[1:]
      weights[r, L - n:L] = 1.0
    arrays = (inputs, targets, weights)
    if sharding is not None:
      arrays = tuple(jax.device_put(a, sharding) for a in arrays)
    out, hits = jax.device_get(_sum_logprobs(graphdef, state, *arrays))
    scores[rows], greedy[rows] = np.asarray(out)[:len(rows)], np.asarray(hits)[:len(rows)]
    if on_rows is not None:
      on_rows(len(rows))
  return scores, greedy


def score_task(model: nnx.Module, tokenizer, examples: Sequence[Example], *, batch_size: int,
               max_len: int) -> dict:
  """{'acc', 'acc_norm', 'n'} for one task."""
  bos = [tokenizer.bos_id] if tokenizer.bos_id is not None and tokenizer.bos_id >= 0 else []
  pairs = []
  for ex in examples:
    context = bos + tokenizer.encode(ex.context)
    for choice in ex.choices:
      whole = bos + tokenizer.encode(ex.context + choice)
      continuation = whole[len(context):] if whole[:len(context)] == context else \
          tokenizer.encode(choice)
      pairs.append((context, continuation or tokenizer.encode(choice)))
  logprobs = continuation_logprobs(model, pairs, batch_size=batch_size, max_len=max_len)
  correct = correct_norm = 0
  k = 0
  for ex in examples:
    lp = logprobs[k:k + len(ex.choices)]
    k += len(ex.choices)
    correct += int(np.argmax(lp) == ex.answer)
    lengths = np.array([len(c) for c in ex.choices], np.float64)
    correct_norm += int(np.argmax(lp / lengths) == ex.answer)
  n = len(examples)
  return {"acc": correct / n, "acc_norm": correct_norm / n, "n": n}


# ----------------------------------------------------------------------------------------------
# A workdir end to end


def validation_loss(cfg: Config, model: nnx.Module, tokenizer, mesh, num_batches: int,
                    reference=None) -> dict:
  """Mean validation cross-entropy over up to `num_batches` batches of the held-out split.
  `reference`: DPO's online reference (train/reference.for_run, made outside any mesh context),
  which scores each batch."""
  from mai_jax.data.batches import make_eval_batches
  from mai_jax.train import frozen
  from mai_jax.train import step as step_lib
  from mai_jax.train.state import ModelSpec

  graphdef, state = nnx.split(model)
  params = nnx.to_pure_dict(state)
  spec = ModelSpec(graphdef, state)
  batch_sharding = step_lib.batch_sharding(mesh, cfg)
  eval_step = step_lib.jit_eval_step(
      step_lib.make_eval_step(cfg, spec, reference.prepare_batch if reference else None),
      jax.tree.map(lambda x: x.sharding, params), batch_sharding, step_lib.batch_keys(cfg),
      frozen.extra_shardings(reference))
  eval_step = frozen.bind(eval_step, reference)
  host = make_eval_batches(cfg, tokenizer, num_batches=num_batches,
                           process_index=jax.process_index(), process_count=jax.process_count())
  if not host:
    raise ConfigError("the validation split is empty; raise data.val_fraction")
  batches = [step_lib.global_batch(b, batch_sharding, cfg.train.global_batch_size) for b in host]
  loss = evaluate(eval_step, params, batches)
  tokens = int(sum(np.sum((b["segment_ids"] != 0) * b.get("loss_weights", 1.0))  # SFT: trained
                   for b in host))
  return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": tokens,
          "batches": len(host)}


def evaluate_workdir(workdir: str, cfg: Optional[Config] = None,
                     task_paths: Optional[Sequence[str]] = None,
                     num_batches: Optional[int] = None, step: Optional[int] = None) -> dict:
  """Validation loss and task accuracies of checkpoint `step` (default: the latest good one);
  writes eval.json."""
  from mai_jax import sharding as sharding_lib
  from mai_jax import workdir as workdir_lib
  from mai_jax.data.batches import eval_batch_count
  from mai_jax.train import reference as reference_lib

  cfg, model, step, mesh = workdir_lib.load_model(workdir, cfg=cfg, step=step)
  tokenizer = workdir_lib.load_tokenizer(cfg, workdir)
  task_paths = builtin_tasks() if task_paths is None else list(task_paths)
  tasks = {os.path.splitext(os.path.basename(p))[0]: load_task(p) for p in task_paths}
  reference = reference_lib.for_run(cfg, mesh)  # DPO's online reference, if the run had one
  with sharding_lib.activate(mesh, cfg.mesh.rules):
    results = {"step": step, "validation": validation_loss(
        cfg, model, tokenizer, mesh, num_batches or eval_batch_count(cfg), reference),
        "tasks": {}}
    for name, examples in tasks.items():
      results["tasks"][name] = score_task(model, tokenizer, examples,
                                          batch_size=cfg.train.global_batch_size,
                                          max_len=cfg.data.seq_len)
  write_results(workdir, results)
  return results


def write_results(workdir: str, results: dict) -> None:
  """WORKDIR/eval.json, atomically, on process 0."""
  if jax.process_index() == 0:
    path = os.path.join(workdir, RESULTS_FILE)
    with open(path + ".tmp", "w") as f:
      json.dump(results, f, indent=2)
    os.replace(path + ".tmp", path)


def format_table(results: dict) -> str:
  v = results["validation"]
  lines = [f"step {results['step']}: validation loss {v['loss']:.4f}, perplexity "
           f"{v['perplexity']:.2f} ({v['tokens']} tokens)"]
  if results["tasks"]:
    width = max(len(n) for n in results["tasks"])
    lines.append(f"{'task':<{width}}  {'n':>5}  {'acc':>6}  {'acc_norm':>8}")
    for name, r in results["tasks"].items():
      lines.append(f"{name:<{width}}  {r['n']:>5}  {r['acc']:>6.3f}  {r['acc_norm']:>8.3f}")
  return "\n".join(lines)
