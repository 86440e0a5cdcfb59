"""A refused command leaves a trained workdir byte for byte as it was, an accepted change is
recorded, and every reader checks the tokenizer and the array shapes before it restores, saying
what is wrong in one line."""

import contextlib
import hashlib
import io
import json
import os
import shutil

import jax
import numpy as np
import pytest

from cli_runs import SMOKE
from mai_jax import checkpoint as checkpoint_lib
from mai_jax import cli
from mai_jax import config as C
from mai_jax import workdir as workdir_lib
from mai_jax.data import tokenizer as tokenizer_lib
from mai_jax.train import loop as loop_lib

TINY = {"model.num_layers": "1", "model.d_model": "32", "model.num_heads": "2",
        "model.num_kv_heads": "1", "model.head_dim": "16", "model.d_ff": "64",
        "model.remat": "'none'", "data.seq_len": "16", "data.max_files": "10",
        "data.tokenizer_train_chars": "60000", "train.eval_every": "0", "train.eval_batches": "1",
        "checkpoint.every_steps": "1"}


def _tiny(num_steps: int) -> C.Config:
  cfg = C.apply_overrides(C.load_experiment(SMOKE), {**TINY, "train.num_steps": str(num_steps)})
  C.validate(cfg)
  return cfg


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A 0-step run (checkpoint 0), resumed with train.num_steps 0 -> 1 (an accepted change,
  checkpoint 1); the resume's output is kept."""
  workdir = tmp_path_factory.mktemp("safety") / "run"
  loop_lib.train(_tiny(0), str(workdir))
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    result = loop_lib.train(_tiny(1), str(workdir))
  return {"workdir": workdir, "resume_out": out.getvalue(), "result": result}


def _hashes(root) -> dict:
  out = {}
  for folder, dirs, files in os.walk(root):
    for name in dirs:
      out[os.path.relpath(os.path.join(folder, name), root) + "/"] = "dir"
    for name in files:
      path = os.path.join(folder, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
  return out


def _other_tokenizer(path) -> str:
  """A SentencePiece model of the same size trained on other text: same vocab, other ids."""
  texts = [f"alpha beta {i} gamma delta {i * 7} epsilon\n" * 20 for i in range(200)]
  return tokenizer_lib.train_sentencepiece(texts, 512, str(path)[:-len(".model")], 200_000)


def _one_line_error(capsys, argv) -> str:
  assert cli.main(argv) == 2
  err = capsys.readouterr().err
  assert err.startswith("mai-jax: error: ") and err.count("\n") == 1, err
  return err


def test_an_accepted_num_steps_change_is_recorded_with_a_schedule_warning(run):
  workdir = run["workdir"]
  assert run["result"].resumed_from == 0 and run["result"].final_step == 1
  assert "train.num_steps: 0 -> 1" in run["resume_out"]
  warning = "WARNING: train.num_steps changed, so the learning-rate schedule changes"
  assert warning in run["resume_out"]
  with open(workdir / "config_history.jsonl") as f:
    history = [json.loads(line) for line in f]
  assert len(history) == 1 and history[0]["step"] == 0
  assert history[0]["changes"] == {"train.num_steps": {"from": 0, "to": 1}}
  checkpoints = str(workdir / "checkpoints")
  assert checkpoint_lib.stored_json(checkpoints, 0, "config")["train"]["num_steps"] == 0
  assert checkpoint_lib.stored_json(checkpoints, 1, "config")["train"]["num_steps"] == 1
  assert C.load_json(str(workdir / "config.json")).train.num_steps == 1


@pytest.mark.parametrize("argv,message", [
    (["--config", os.path.join(os.path.dirname(SMOKE), "tiny.py")],  # a mistaken variant
     "state/params/"),
    (["--config.model.d_model=48"], "the checkpoint was written with model.d_model=32"),
    (["--config.train.num_steps=0"], "past train.num_steps=0"),
    (["--config.data.tokenizer_path=OTHER"], "was started with tokenizer"),
])
def test_a_refused_train_leaves_the_workdir_byte_identical(run, tmp_path, capsys, argv, message):
  workdir = shutil.copytree(run["workdir"], tmp_path / "run")
  argv = [a.replace("OTHER", _other_tokenizer(tmp_path / "other.model")) for a in argv]
  before = _hashes(workdir)
  err = _one_line_error(capsys, ["train", "--workdir", str(workdir), *argv])
  assert message in err, err
  assert _hashes(workdir) == before
  # The run still reads as it did: its own config and the params of its latest checkpoint.
  cfg, step = workdir_lib.open_checkpoint(str(workdir))
  assert step == 1 and cfg.model.d_model == 32 and cfg.train.num_steps == 1


def test_readers_refuse_another_tokenizer_in_one_line(run, tmp_path, capsys):
  other = _other_tokenizer(tmp_path / "other.model")
  workdir = str(run["workdir"])
  for argv in (["eval", "--workdir", workdir, "--tasks"],
               ["sample", "--workdir", workdir, "--prompt", "x"],
               ["convert", "to-hf", "--workdir", workdir, "--out", str(tmp_path / "hf")]):
    err = _one_line_error(capsys, argv + [f"--config.data.tokenizer_path={other}"])
    assert "was trained with tokenizer" in err and "other.model" in err, err
  assert not os.path.exists(tmp_path / "hf")
  # A tokenizer file swapped inside the workdir is caught too (here by export-params).
  swapped = shutil.copytree(run["workdir"], tmp_path / "swapped")
  shutil.copyfile(other, swapped / "tokenizer.model")
  err = _one_line_error(capsys, ["checkpoints", "--workdir", str(swapped), "--export-params",
                                 str(tmp_path / "exported")])
  assert "was trained with tokenizer" in err and not os.path.exists(tmp_path / "exported")


def test_readers_refuse_other_shapes_in_one_line(run, tmp_path, capsys):
  workdir = str(run["workdir"])
  err = _one_line_error(capsys, ["sample", "--workdir", workdir, "--prompt", "x",
                                 "--config.model.d_ff=96"])
  assert "holds params/blocks/mlp/down_proj of shape (1, 64, 32)" in err, err
  assert "model.d_ff=64 (here 96)" in err, err
  err = _one_line_error(capsys, ["convert", "to-hf", "--workdir", workdir, "--out",
                                 str(tmp_path / "hf"), "--config.model.num_layers=2"])
  assert "holds params/" in err and "model.num_layers=1 (here 2)" in err, err


def test_readers_use_the_checkpoints_config_not_a_rewritten_config_json(run, tmp_path):
  """What older versions left behind: config.json overwritten by a refused command."""
  workdir = shutil.copytree(run["workdir"], tmp_path / "run")
  with open(workdir / "config.json", "w") as f:
    f.write(C.to_json(C.load_experiment(os.path.join(os.path.dirname(SMOKE), "tiny.py"))))
  cfg, model, step, _ = workdir_lib.load_model(str(workdir))
  assert step == 1 and cfg.model.d_model == 32
  want = jax.device_get(workdir_lib.load_model(str(run["workdir"]))[1].embed.embedding[...])
  np.testing.assert_array_equal(jax.device_get(model.embed.embedding[...]), want)


def test_step_picks_a_checkpoint_and_a_bad_step_is_one_line(run, capsys):
  cfg, step = workdir_lib.open_checkpoint(str(run["workdir"]), 0)
  assert step == 0 and cfg.train.num_steps == 0  # the config checkpoint 0 was written with
  err = _one_line_error(capsys, ["eval", "--workdir", str(run["workdir"]), "--step", "7"])
  assert "--step 7 is not a good checkpoint" in err and "good steps: 0, 1" in err, err
