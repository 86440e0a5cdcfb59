"""Evaluation: likelihoods against a direct forward pass, task scoring, and a trained workdir end to
end through `mai-jax eval` and `mai-jax sample`."""

import dataclasses
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mai_jax import cli, evaluate
from mai_jax.config import ConfigError, ModelConfig
from mai_jax.model import Decoder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_model():
  cfg = ModelConfig(num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8, d_ff=64,
                    vocab_size=50, compute_dtype="float32", remat="none", init_std=0.3)
  return Decoder(cfg, rngs=nnx.Rngs(0))


_forward = nnx.jit(lambda model, tokens_BT: model(tokens_BT))


def direct_logprob(model, context, continuation, max_len):
  """log p(continuation | context) from one forward pass with NumPy log-softmax. The sequence sits
  at the start of a fixed 64-token buffer (one compilation); attention is causal, so what follows
  it cannot change its logits."""
  seq = (context + continuation)[-(max_len + 1):]
  buffer = np.zeros((1, 64), np.int32)
  buffer[0, :len(seq) - 1] = seq[:-1]
  logits = np.asarray(_forward(model, jnp.asarray(buffer)), np.float64)[0, :len(seq) - 1]
  top = logits.max(-1, keepdims=True)
  logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
  n = len(continuation)
  targets = seq[1:]
  return sum(logp[t, targets[t]] for t in range(len(targets) - n, len(targets)))


def test_continuation_logprobs_match_a_direct_forward():
  model = tiny_model()
  rng = np.random.RandomState(0)
  pairs = [([int(x) for x in rng.randint(0, 50, c)], [int(x) for x in rng.randint(0, 50, n)])
           for c, n in [(1, 1), (5, 3), (12, 1), (3, 7), (30, 4), (2, 2), (9, 9)]]
  got = evaluate.continuation_logprobs(model, pairs, batch_size=4, max_len=20)
  want = [direct_logprob(model, c, n, 20) for c, n in pairs]  # (30, 4) is cut to its last 21
  np.testing.assert_allclose(got, want, rtol=1e-5)


class CharTokenizer:
  """One token per character (ids 4..), bos 2: enough to score hand-made tasks."""
  bos_id, eos_id, pad_id = 2, 3, 0

  def encode(self, text):
    return [4 + (ord(ch) % 46) for ch in text]


def test_acc_and_length_normalized_acc(monkeypatch):
  # Fixed log-likelihoods: the long right answer loses on the sum, wins per character.
  examples = [evaluate.Example("q", ("a", "bbbbbbbb"), 1),
              evaluate.Example("q", ("cc", "d"), 0)]
  fixed = np.array([-2.0, -4.0, -1.0, -3.0])
  monkeypatch.setattr(evaluate, "continuation_logprobs", lambda *a, **k: fixed)
  result = evaluate.score_task(None, CharTokenizer(), examples, batch_size=4, max_len=16)
  # ex 1: sums -2 > -4 -> 0 (wrong); per char -2/1 < -4/8 -> 1 (right)
  # ex 2: sums -1 > -3 -> 0 (right); per char -1/2 > -3/1 -> 0 (right)
  assert result == {"acc": 0.5, "acc_norm": 1.0, "n": 2}


def test_score_task_with_a_model_picks_the_likeliest_choice():
  model = tiny_model()
  tok = CharTokenizer()
  examples = [evaluate.Example("abc", ("de", "fgh", "i"), 0), evaluate.Example("xy", ("z", "w"), 1)]
  result = evaluate.score_task(model, tok, examples, batch_size=2, max_len=32)
  right = right_norm = 0
  for ex in examples:
    ctx = [tok.bos_id] + tok.encode(ex.context)
    lps = np.array([direct_logprob(model, ctx, tok.encode(c), 32) for c in ex.choices])
    right += int(np.argmax(lps) == ex.answer)
    right_norm += int(np.argmax(lps / [len(c) for c in ex.choices]) == ex.answer)
  assert result == {"acc": right / 2, "acc_norm": right_norm / 2, "n": 2}


@pytest.mark.parametrize("line,message", [
    ("not json", "not JSON"),
    ('{"choices": ["a", "b"], "answer": 0}', "context"),
    ('{"context": "x", "choices": ["a"], "answer": 0}', "at least 2"),
    ('{"context": "x", "choices": ["a", "b"], "answer": 2}', "index into choices"),
])
def test_bad_task_lines_name_file_and_line(tmp_path, line, message):
  path = tmp_path / "t.jsonl"
  path.write_text('{"context": "x", "choices": ["a", "b"], "answer": 1}\n' + line + "\n")
  with pytest.raises(ConfigError, match=f"t.jsonl:2: .*{message}"):
    evaluate.load_task(str(path))


def test_builtin_tasks_load():
  paths = evaluate.builtin_tasks()
  assert len(paths) >= 3
  for path in paths:
    examples = evaluate.load_task(path)
    assert len(examples) >= 16
    assert len({ex.answer for ex in examples}) > 1  # the right answer is not always first


# ----------------------------------------------------------------------------------------------
# A tiny trained workdir


@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory):
  from mai_jax import config as config_lib
  from mai_jax.train.loop import train
  cfg = config_lib.load_experiment(os.path.join(REPO, "experiments", "tiny.py") + ":smoke")
  cfg = dataclasses.replace(
      cfg, model=dataclasses.replace(cfg.model, num_layers=1),
      data=dataclasses.replace(cfg.data, seq_len=32, max_files=20, tokenizer_train_chars=100_000),
      train=dataclasses.replace(cfg.train, num_steps=2, eval_every=0, eval_batches=1))
  workdir = tmp_path_factory.mktemp("trained")
  result = train(cfg, str(workdir))
  return workdir, result


@pytest.mark.slow  # trains a tiny workdir first (~30 s on 2 busy cores)
def test_eval_cli_reproduces_the_training_eval_loss(trained_workdir, capsys):
  workdir, result = trained_workdir
  assert cli.main(["eval", "--workdir", str(workdir)]) == 0
  out = capsys.readouterr().out
  with open(workdir / "eval.json") as f:
    results = json.load(f)
  assert results["step"] == 2
  # Same held-out batches, same params: the loop's final eval loss, recomputed from the checkpoint.
  assert results["validation"]["loss"] == pytest.approx(result.eval_loss, rel=1e-5)
  assert results["validation"]["perplexity"] == pytest.approx(np.exp(result.eval_loss), rel=1e-5)
  names = [os.path.basename(p)[:-len(".jsonl")] for p in evaluate.builtin_tasks()]
  assert sorted(results["tasks"]) == sorted(names)
  for name in names:
    r = results["tasks"][name]
    assert 0 <= r["acc"] <= 1 and 0 <= r["acc_norm"] <= 1 and r["n"] >= 16
    assert name in out
  assert "validation loss" in out


@pytest.mark.slow
def test_sample_cli_is_deterministic_and_batched(trained_workdir, capsys):
  workdir, _ = trained_workdir
  args = ["sample", "--workdir", str(workdir), "--prompt", "def f(x):", "--prompt", "import",
          "--max-new-tokens", "6", "--temperature", "0.8", "--top-k", "20", "--seed", "1"]
  assert cli.main(args) == 0
  first = capsys.readouterr().out
  assert cli.main(args) == 0
  assert capsys.readouterr().out == first
  assert "=== 'def f(x):'\ndef f(x):" in first and "=== 'import'\nimport" in first


@pytest.mark.slow
def test_synthesize_cli_writes_provenance_shards_and_resumes_without_duplicates(
    trained_workdir, tmp_path, capsys):
  workdir, _ = trained_workdir
  prompts = tmp_path / "p.jsonl"
  prompts.write_text("".join(json.dumps(r) + "\n" for r in [
      {"id": "a", "prompt": "def f(x):"}, {"id": "b", "prompt": "import"},
      {"prompt": "class A:"}]))
  out = tmp_path / "syn"
  args = ["data", "synthesize", "--workdir", str(workdir), "--prompts", str(prompts), "--out",
          str(out), "--batch-size", "1", "--shard-prompts", "2", "--max-new-tokens", "4",
          "--temperature", "0.8", "--seed", "3"]
  assert cli.main(args) == 0
  assert "2 new shards" in capsys.readouterr().out
  assert sorted(os.listdir(out)) == ["part-00000.jsonl", "part-00001.jsonl", "synthesize.json"]
  shards = {n: (out / n).read_bytes() for n in ("part-00000.jsonl", "part-00001.jsonl")}
  rows = [json.loads(line) for n in sorted(shards) for line in shards[n].decode().splitlines()]
  assert [(r["prompt_id"], r["prompt"], r["seed"]) for r in rows] == [
      ("a", "def f(x):", 3), ("b", "import", 4), ("p.jsonl:3", "class A:", 5)]
  assert {r["generator"] for r in rows} == {f"{os.path.abspath(workdir)}@step 2"}
  assert rows[0]["sampling"] == {"max_new_tokens": 4, "temperature": 0.8, "top_k": 0,
                                 "top_p": 1.0, "seed": 3}
  assert all(isinstance(r["text"], str) for r in rows)
  os.remove(out / "part-00001.jsonl")  # interrupted before the last shard: only it is made again
  assert cli.main(args) == 0
  assert "1 new shards" in capsys.readouterr().out
  assert {n: (out / n).read_bytes() for n in shards} == shards  # same records, none twice


def test_eval_and_sample_errors_are_one_line(tmp_path, capsys):
  assert cli.main(["eval", "--workdir", str(tmp_path)]) == 2
  assert "config.json" in capsys.readouterr().err
