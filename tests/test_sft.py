"""SFT through the one train step and the CLI: loss_weights vs a NumPy loss, and a tiny model
fine-tuned on a synthetic instruction task answering held-out prompts it could not before."""

import json
import os
import random
import subprocess
import sys

import jax
import numpy as np
import pytest

from mai_jax import config as C, sample, sharding as S, workdir as workdir_lib
from mai_jax.data import tokenizer as tok_lib
from mai_jax.data.chat_template import CHATML, ChatTemplate
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


@pytest.mark.slow
def test_sft_through_the_cli_teaches_a_held_out_instruction_task(tmp_path):
  train, held = _task()
  data = tmp_path / "reverse.jsonl"
  data.write_text("".join(json.dumps({"prompt": "reverse: " + " ".join(t),
                                      "completion": " ".join(t[::-1])}) + "\n" for t in train))
  # The base model's tokenizer knows the task's words and the ChatML markers.
  rendered = [ChatTemplate(CHATML, "chatml").render(
      [{"role": "user", "content": "reverse: " + " ".join(t)},
       {"role": "assistant", "content": " ".join(t)}]) for t in train]
  tok_path = tok_lib.train_sentencepiece(rendered, 512, str(tmp_path / "tok"), 200_000)
  one_device = cli_runs.cli_env(devices=1)  # compiles faster than 8 fake devices
  cli_runs.run_train(tmp_path / "base", "--config.train.num_steps=2", "--config.train.eval_batches=1",
                     "--config.checkpoint.every_steps=0", "--config.data.max_files=10",
                     "--config.data.tokenizer_path=" + tok_path, env=one_device)
  sft = tmp_path / "sft"
  out = cli_runs.run_train(
      sft, "--config.train.init_from=" + str(tmp_path / "base"), "--config.train.num_steps=250",
      "--config.train.log_every=50", "--config.checkpoint.every_steps=0",
      "--config.data.seq_len=64",
      "--config.data.tokenizer_path=" + tok_path,
      f"--config.data.sources=[{{'name': 'rev', 'kind': 'chat', 'path': '{data}'}}]",
      config=os.path.join(cli_runs.REPO, "experiments", "sft_tiny.py") + ":smoke", env=one_device)
  assert "initialized the parameters from" in out
  rows = cli_runs.metrics(sft)
  losses = cli_runs.losses(rows)
  assert losses[250] < 0.2 * losses[50]
  assert [r["eval_loss"] for r in rows if "eval_loss" in r][-1] < 1.0
  cfg = C.load_json(str(sft / "config.json"))
  tokenizer = tok_lib.load_tokenizer(tok_path)
  base_em, _ = _exact_match(cfg, tmp_path / "base", tokenizer, held)
  sft_em, replies = _exact_match(cfg, sft, tokenizer, held)
  print(f"held-out exact match: base {base_em:.2f}, after SFT {sft_em:.2f}")
  assert base_em == 0.0
  assert sft_em >= 0.5, replies
  prompt = "reverse: " + " ".join(held[0])
  proc = subprocess.run([sys.executable, "-m", "mai_jax", "sample", "--workdir", str(sft), "--chat",
                         "--prompt", prompt, "--temperature", "0", "--max-new-tokens", "12"],
                        capture_output=True, text=True, env=one_device, cwd=cli_runs.REPO,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.splitlines()[-2:] == [f"=== {prompt!r}", replies[0]]
