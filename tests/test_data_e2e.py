"""End to end: train a tokenizer and tokenize the configured sources with `mai-jax data`, train
from the token cache through `mai-jax train`, resume it, log the realized mixture, and refuse to
resume with another tokenizer."""

import json
import os
import subprocess
import sys

import pytest
from cli_runs import cli_env

from mai_jax import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(REPO, "experiments", "tiny.py") + ":smoke"


def _train(workdir, *extra):
  env = cli_env()
  return subprocess.run([sys.executable, "-m", "mai_jax", "train", "--config", SMOKE,
                         "--workdir", str(workdir), "--config.optim.schedule=constant",
                         "--config.checkpoint.every_steps=2", *extra],
                        capture_output=True, text=True, env=env, timeout=900, cwd=REPO)


@pytest.mark.slow
def test_tokenize_then_train_from_the_cache_and_resume(tmp_path):
  docs = tmp_path / "synthetic.jsonl"
  docs.write_text("".join(json.dumps({"text": f"def f{i}(x):\n    return x * {i}\n",
                                      "generator": "template"}) + "\n" for i in range(400)))
  raw = repr(({"name": "code", "kind": "stdlib", "weight": 0.7},
              {"name": "synthetic", "kind": "jsonl", "path": str(docs), "weight": 0.3}))
  tok = str(tmp_path / "tok.model")
  assert cli.main(["data", "train-tokenizer", "--config", SMOKE, "--out", tok,
                   f"--config.data.sources={raw}"]) == 0
  out = tmp_path / "cache"
  # val_fraction 0.1: ~40 synthetic validation documents, enough for validation windows whatever
  # the interpreter's stdlib holds (at the default 0.02, 3.12's first 60 files give none).
  assert cli.main(["data", "tokenize", "--config", SMOKE, "--out", str(out),
                   f"--config.data.sources={raw}", f"--config.data.tokenizer_path={tok}",
                   "--config.data.val_fraction=0.1"]) == 0
  cached = repr(({"name": "code", "kind": "cache", "path": str(out / "code"), "weight": 0.7},
                 {"name": "synthetic", "kind": "cache", "path": str(out / "synthetic"),
                  "weight": 0.3}))
  run = [f"--config.data.sources={cached}", f"--config.data.tokenizer_path={tok}"]
  workdir = tmp_path / "run"
  first = _train(workdir, *run, "--config.train.num_steps=2")
  assert first.returncode == 0, first.stderr[-3000:]
  second = _train(workdir, *run, "--config.train.num_steps=4")
  assert second.returncode == 0, second.stderr[-3000:]
  assert "resumed from step 2" in second.stdout + second.stderr
  rows = [json.loads(l) for l in open(workdir / "metrics.jsonl")]
  losses = [r["loss"] for r in rows if "loss" in r]
  assert len(losses) == 4
  mix = [r for r in rows if "data/tokens/code" in r][-1]
  share = mix["data/tokens/code"] / (mix["data/tokens/code"] + mix["data/tokens/synthetic"])
  assert 0.55 < share < 0.85  # 2 steps x 8 rows: a coarse check of the 0.7 weight
  assert json.load(open(workdir / "tokenizer_record.json"))["path"] == tok

  other = str(tmp_path / "other.model")
  assert cli.main(["data", "train-tokenizer", "--config", SMOKE, "--out", other,
                   "--config.data.tokenizer_train_chars=50000"]) == 0
  refused = _train(workdir, f"--config.data.tokenizer_path={other}",
                   "--config.train.num_steps=6")
  assert refused.returncode == 2
  assert "was started with tokenizer" in refused.stderr
