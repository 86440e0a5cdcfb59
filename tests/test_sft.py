"""Post-training through the one train step and the CLI: loss_weights vs a NumPy loss; a tiny
model fine-tuned (SFT) on a synthetic instruction task answering held-out prompts it could not
before, and DPO on synthetic preference pairs ranking held-out pairs it could not before."""

import json
import os
import random
import subprocess
import sys

import jax
import numpy as np
import pytest

from mai_jax import config as C, sample, sharding as S, workdir as workdir_lib
from flax import nnx

from mai_jax.data import batches, tokenizer as tok_lib
from mai_jax.data.chat_template import CHATML, ChatTemplate
from mai_jax.train import preference, step as step_lib
from mai_jax.train.state import ModelSpec
from mai_jax.train.trainer import build_trainer
from tests import cli_runs

MODEL = C.ModelConfig(num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8, d_ff=64,
                      vocab_size=64, compute_dtype="float32", remat="none")


def _setup(microbatches):
  cfg = C.Config(model=MODEL, data=C.DataConfig(seq_len=16),
                 train=C.TrainConfig(global_batch_size=16, microbatches=microbatches,
                                     objective="sft"),
                 optim=C.OptimConfig(learning_rate=1e-2, warmup_steps=0, schedule="constant"))
  mesh = S.make_mesh(cfg.mesh)
  trainer = build_trainer(cfg, mesh, num_steps=10)
  return cfg, mesh, trainer


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, 64, (16, 17)).astype(np.int32)
  seg = np.ones((16, 16), np.int32)
  seg[:, 12:] = 0
  seg[::2, 5:12] = 2
  pos = np.tile(np.arange(16, dtype=np.int32), (16, 1))
  pos[::2, 5:] -= 5
  weights = (rng.random((16, 16)) < 0.4).astype(np.float32)
  weights[:, 12:] = 1.0  # weight on padding must still carry no loss
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": seg, "positions": pos,
          "loss_weights": weights}


def test_loss_weights_give_the_mean_over_trained_tokens_like_numpy():
  """Two microbatches: the loss (and gradient) is divided by the trained tokens of the whole
  batch, not averaged per microbatch (test_step.py checks microbatching against one batch)."""
  cfg, mesh, trainer = _setup(microbatches=2)
  state, host = trainer.init_state(), _batch()
  model = trainer.layout.model_spec.merge(jax.device_get(state.params))
  logits = np.asarray(model(host["inputs"], host["segment_ids"], host["positions"]), np.float64)
  logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  ce = logz - np.take_along_axis(logits, host["targets"][..., None], -1)[..., 0]
  trained = (host["segment_ids"] != 0) & (host["loss_weights"] > 0)
  fn = trainer.jit_train_step()
  with S.activate(mesh, cfg.mesh.rules):
    _, metrics = fn(state, {k: jax.device_put(v, trainer.batch_sharding) for k, v in host.items()})
  assert float(metrics["loss"]) == pytest.approx(ce[trained].mean(), rel=1e-5)
  assert float(metrics["tokens"]) == trained.sum()


# ----------------------------------------------------------------------------- end to end

WORDS = "red blue green cat dog sun moon tree fish bird star rock".split()


def _task(seed=0):
  """'reverse: a b c' -> 'c b a' over 3 distinct words; held-out triples never trained on."""
  rng = random.Random(seed)
  triples = [tuple(rng.sample(WORDS, 3)) for _ in range(700)]
  held = sorted(set(triples[600:]) - set(triples[:600]))[:24]
  return triples[:600], held


def _exact_match(cfg, workdir, tokenizer, held):
  _, model, _, mesh = workdir_lib.load_model(str(workdir))
  conversations = [[{"role": "user", "content": "reverse: " + " ".join(t)}] for t in held]
  replies = sample.chat_replies(cfg, model, tokenizer, conversations,
                                sample.SamplingConfig(max_new_tokens=12, temperature=0), mesh)
  return np.mean([r == " ".join(t[::-1]) for r, t in zip(replies, held)]), replies


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  """A 2-step 'pretrained' smoke model whose tokenizer knows the task's words and the ChatML
  markers, plus the task's training data as conversations and as preference pairs (answering
  preferred over refusing)."""
  root = tmp_path_factory.mktemp("post")
  train, held = _task()
  (root / "reverse.jsonl").write_text("".join(json.dumps(
      {"prompt": "reverse: " + " ".join(t), "completion": " ".join(t[::-1])}) + "\n"
      for t in train))
  (root / "pairs.jsonl").write_text("".join(json.dumps(
      {"prompt": "reverse: " + " ".join(t), "chosen": " ".join(t[::-1]),
       "rejected": "I cannot do that."}) + "\n" for t in train))
  rendered = [ChatTemplate(CHATML, "chatml").render(
      [{"role": "user", "content": "reverse: " + " ".join(t)},
       {"role": "assistant", "content": " ".join(t)}]) for t in train]
  tok_path = tok_lib.train_sentencepiece(rendered, 512, str(root / "tok"), 200_000)
  cli_runs.run_train(root / "base", "--config.train.num_steps=2", "--config.train.eval_batches=1",
                     "--config.checkpoint.every_steps=0", "--config.data.max_files=10",
                     "--config.data.tokenizer_path=" + tok_path, env=ONE_DEVICE)
  return {"root": root, "tok": tok_path, "held": held}


ONE_DEVICE = cli_runs.cli_env(devices=1)  # compiles faster than 8 fake devices
SFT_CONFIG = os.path.join(cli_runs.REPO, "experiments", "sft_tiny.py") + ":smoke"


def _post_train(base, workdir, kind, data, *extra):
  return cli_runs.run_train(
      workdir, "--config.train.init_from=" + str(base["root"] / "base"),
      "--config.checkpoint.every_steps=0", "--config.data.seq_len=64",
      "--config.data.tokenizer_path=" + base["tok"],
      f"--config.data.sources=[{{'name': 'rev', 'kind': '{kind}', 'path': '{data}'}}]",
      *extra, config=SFT_CONFIG, env=ONE_DEVICE)


@pytest.mark.slow
def test_sft_through_the_cli_teaches_a_held_out_instruction_task(base):
  sft, held = base["root"] / "sft", base["held"]
  out = _post_train(base, sft, "chat", base["root"] / "reverse.jsonl",
                    "--config.train.num_steps=250", "--config.train.log_every=50")
  assert "initialized the parameters from" in out
  rows = cli_runs.metrics(sft)
  losses = cli_runs.losses(rows)
  assert losses[250] < 0.2 * losses[50]
  assert [r["eval_loss"] for r in rows if "eval_loss" in r][-1] < 1.0
  cfg = C.load_json(str(sft / "config.json"))
  # The run added ChatML's markers to the base tokenizer (ids 512, 513) and saved it beside its
  # checkpoints; the base model reads the base tokenizer.
  tokenizer = workdir_lib.load_tokenizer(cfg, str(sft))
  assert tokenizer.encode("<|im_end|>") == [513] and cfg.model.vocab_size == 514
  base_em, _ = _exact_match(cfg, base["root"] / "base", tok_lib.load_tokenizer(base["tok"]), held)
  sft_em, replies = _exact_match(cfg, sft, tokenizer, held)
  print(f"held-out exact match: base {base_em:.2f}, after SFT {sft_em:.2f}")
  assert base_em == 0.0
  assert sft_em >= 0.5, replies
  prompt = "reverse: " + " ".join(held[0])
  proc = subprocess.run([sys.executable, "-m", "mai_jax", "sample", "--workdir", str(sft), "--chat",
                         "--prompt", prompt, "--temperature", "0", "--max-new-tokens", "12"],
                        capture_output=True, text=True, env=ONE_DEVICE, cwd=cli_runs.REPO,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.splitlines()[-2:] == [f"=== {prompt!r}", replies[0]]
  # `mai-jax chat`: two turns on stdin; the second sees the first as context.
  second = "reverse: " + " ".join(held[1])
  proc = subprocess.run([sys.executable, "-m", "mai_jax", "chat", "--workdir", str(sft),
                         "--temperature", "0", "--max-new-tokens", "12"],
                        input=f"{prompt}\n{second}\n", capture_output=True, text=True,
                        env=ONE_DEVICE, cwd=cli_runs.REPO, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  _, model, _, mesh = workdir_lib.load_model(str(sft))
  context = [{"role": "user", "content": prompt}, {"role": "assistant", "content": replies[0]},
             {"role": "user", "content": second}]
  want = sample.chat_replies(cfg, model, tokenizer, [context],
                             sample.SamplingConfig(max_new_tokens=12, temperature=0), mesh)[0]
  assert proc.stdout.splitlines() == [f"assistant> {replies[0]}", f"assistant> {want}"]


def _held_out_reward_accuracy(workdir):
  """rewards/accuracies of the held-out pairs under the workdir's latest weights."""
  cfg, model, _, mesh = workdir_lib.load_model(str(workdir))
  tokenizer = workdir_lib.load_tokenizer(cfg, str(workdir))
  graphdef, state = nnx.split(model)
  spec, params = ModelSpec(graphdef, state), nnx.to_pure_dict(state)
  fn = jax.jit(lambda p, batch: preference.summed_preference_loss(
      p, batch, spec, preference.loss_config(cfg))[1])
  sharding = step_lib.batch_sharding(mesh, cfg)
  correct = pairs = 0.0
  for host in batches.make_eval_batches(cfg, tokenizer, num_batches=100):
    _, count, _, sums = fn(params, step_lib.global_batch(host, sharding,
                                                         cfg.train.global_batch_size))
    correct, pairs = correct + float(sums["rewards/accuracies"]), pairs + float(count)
  return correct / pairs, pairs


@pytest.mark.slow
def test_dpo_through_the_cli_raises_held_out_reward_accuracy(base):
  dpo, data = base["root"] / "dpo", base["root"] / "pairs.jsonl"
  out = _post_train(base, dpo, "preference", data, "--config.train.objective=dpo",
                    "--config.train.num_steps=20", "--config.train.log_every=10",
                    "--config.train.preference_beta=0.5")
  assert "reference log-probs of" in out  # computed once, before the first step
  rows = cli_runs.metrics(dpo)
  logged = [r for r in rows if "rewards/accuracies" in r]
  assert logged and {"rewards/chosen", "rewards/rejected", "rewards/margins"} <= set(logged[0])
  eval_loss = [r["eval_loss"] for r in rows if "eval_loss" in r][-1]
  accuracy, pairs = _held_out_reward_accuracy(dpo)
  print(f"DPO: held-out loss {eval_loss:.3f} (log 2 = 0.693 at the start), reward accuracy "
        f"{accuracy:.2f} on {pairs:.0f} pairs (0 at the start: policy = reference)")
  assert pairs >= 10
  assert eval_loss < 0.6
  assert accuracy >= 0.8
