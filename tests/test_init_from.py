"""train.init_from: a run starts from existing weights with a fresh optimizer, resumes from its own
checkpoints once it has them, and refuses weights that do not fit with an error naming the array."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from cli_runs import REPO, SMOKE, cli_env, metrics
from mai_jax import checkpoint as checkpoint_lib
from mai_jax import cli
from mai_jax import config as C
from mai_jax import sharding as S
from mai_jax import workdir as workdir_lib
from mai_jax.config import ConfigError
from mai_jax.train import loop as loop_lib
from mai_jax.train.trainer import build_trainer


def _smoke(**train) -> C.Config:
  """The smoke model, a schedule independent of where a run stops, no eval before the end;
  keyword arguments override train.* keys."""
  cfg = C.apply_overrides(C.load_experiment(SMOKE), {
      "train.num_steps": "4", "checkpoint.every_steps": "2", "train.eval_every": "0",
      "optim.schedule": "'constant'", **{f"train.{k}": repr(v) for k, v in train.items()}})
  C.validate(cfg)
  return cfg


@pytest.fixture(scope="module")
def source(tmp_path_factory):
  """A 4-step training run (checkpoints at 2 and 4) and the params of its step 4, exported."""
  root = tmp_path_factory.mktemp("init_from")
  result = loop_lib.train(_smoke(), str(root / "src"))
  workdir_lib.export_params(str(root / "src"), str(root / "exported"))
  return {"root": root, "src": root / "src", "exported": root / "exported", "result": result}


def _params(workdir, step=None):
  cfg = workdir_lib.load_config(str(workdir))
  return jax.device_get(workdir_lib.load_params(cfg, str(workdir), S.make_mesh(cfg.mesh), step)[2])


def _state_at(workdir, step):
  """(TrainState, metadata) of the run's checkpoint `step`, restored whole."""
  cfg = workdir_lib.load_config(str(workdir))
  checkpointer = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"), cfg.checkpoint)
  try:
    state, _, metadata = checkpointer.restore(step, build_trainer(cfg, S.make_mesh(cfg.mesh))
                                              .abstract_state())
    return jax.device_get(state), metadata
  finally:
    checkpointer.close()


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


def test_exported_params_start_the_run_with_a_fresh_optimizer(source, capsys):
  run = source["root"] / "from_export"
  result = loop_lib.train(_smoke(num_steps=0, init_from=str(source["exported"])), str(run))
  out = capsys.readouterr().out
  assert "initialized the parameters from" in out and "params-only checkpoint" in out
  assert "tokenizer.model copied from" in out
  state, metadata = _state_at(run, 0)  # num_steps=0: the checkpoint is the state before step 1
  assert int(state.step) == 0
  _assert_trees_equal(state.params, _params(source["exported"]))
  _assert_trees_equal(state.params, _params(source["src"], 4))
  # A fresh optimizer: every count and moment is zero.
  assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(state.opt_state))
  fresh = jax.device_get(build_trainer(_smoke(), S.make_mesh(_smoke().mesh)).init_state())
  np.testing.assert_array_equal(state.rng, fresh.rng)  # same training RNG as a random start
  assert metadata["initialized_from"] == {"path": str(source["exported"]), "step": 4,
                                          "params_only": True}
  assert metadata["data_batches_consumed"] == 0
  assert json.loads((run / "config.json").read_text())["train"]["init_from"] == str(
      source["exported"])
  assert (run / "tokenizer.model").read_bytes() == (source["src"] / "tokenizer.model").read_bytes()
  # Same weights, same tokenizer, same validation batches: the source's final validation loss.
  assert result.eval_loss == pytest.approx(source["result"].eval_loss, abs=1e-6)


@pytest.mark.parametrize("suffix, step", [("", 4), ("checkpoints/2", 2)])
def test_a_training_workdir_gives_its_params_only(source, suffix, step, capsys):
  run = source["root"] / f"from_training_{step}"
  loop_lib.train(_smoke(num_steps=0, init_from=str(source["src"] / suffix)), str(run))
  assert "(training checkpoint)" in capsys.readouterr().out
  state, metadata = _state_at(run, 0)
  _assert_trees_equal(state.params, _params(source["src"], step))
  assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(state.opt_state))
  assert metadata["initialized_from"]["step"] == step


def test_a_restart_resumes_its_own_checkpoint_and_ignores_init_from(source, capsys):
  run = source["root"] / "restarted"
  first = loop_lib.train(_smoke(num_steps=2, init_from=str(source["exported"])), str(run))
  assert first.resumed_from is None
  capsys.readouterr()
  # The source may be gone by the time a preempted fine-tuning job restarts.
  second = loop_lib.train(_smoke(num_steps=4, init_from=str(source["root"] / "deleted")), str(run))
  out = capsys.readouterr().out
  assert second.resumed_from == 2 and second.final_step == 4
  assert "resuming from them; train.init_from=" in out and "is ignored" in out
  assert "initialized the parameters" not in out
  state_2, _ = _state_at(run, 2)
  state_4, metadata = _state_at(run, 4)
  assert int(state_4.step) == 4
  moved = [np.any(a != b) for a, b in zip(jax.tree.leaves(state_2.params),
                                          jax.tree.leaves(_params(source["exported"])))]
  assert all(moved)  # step 2 trained on from the exported weights
  assert any(np.any(a != b) for a, b in zip(jax.tree.leaves(state_4.params),
                                            jax.tree.leaves(state_2.params)))
  assert metadata["initialized_from"]["path"] == str(source["exported"])  # origin kept
  assert sorted(r["step"] for r in metrics(run) if "loss" in r) == [1, 2, 3, 4]


def test_shape_mismatch_is_one_line_exit_2_naming_the_parameter(source, tmp_path):
  run = tmp_path / "run"
  proc = subprocess.run(
      [sys.executable, "-m", "mai_jax", "train", "--config", SMOKE, "--workdir", str(run),
       f"--config.train.init_from={source['exported']}", "--config.model.d_ff=96"],
      capture_output=True, text=True, env=cli_env(), cwd=REPO, timeout=300)
  assert proc.returncode == 2, proc.stderr[-3000:]
  err = proc.stderr.strip().splitlines()[-1]
  assert "Traceback" not in proc.stderr
  assert err.startswith("mai-jax: error: train.init_from=")
  assert "params/blocks/mlp/down_proj is (2, 128, 64)" in err and "(2, 96, 64)" in err
  assert "d_ff: 96 vs 128" in err
  assert not run.exists()  # refused before anything was written


def test_missing_or_empty_sources_are_config_errors(source, tmp_path):
  with pytest.raises(ConfigError, match="train.init_from=.*no such directory"):
    loop_lib.train(_smoke(init_from=str(tmp_path / "missing")), str(tmp_path / "a"))
  empty = tmp_path / "empty"
  empty.mkdir()
  (empty / "config.json").write_text((source["src"] / "config.json").read_text())
  with pytest.raises(ConfigError, match="holds no restorable checkpoint"):
    loop_lib.train(_smoke(init_from=str(empty)), str(tmp_path / "b"))
  with pytest.raises(ConfigError, match="step 3 is not a good checkpoint.*good steps: 2, 4"):
    loop_lib.train(_smoke(init_from=str(source["src"] / "checkpoints" / "3")), str(tmp_path / "c"))
  with pytest.raises(ConfigError, match="config.json not found"):
    loop_lib.train(_smoke(init_from=str(tmp_path)), str(tmp_path / "d"))


def test_a_model_config_that_changes_the_math_is_a_loud_warning(source, tmp_path, capsys):
  cfg = _smoke(num_steps=0, init_from=str(source["exported"]))
  cfg = C.apply_overrides(cfg, {"model.rope_theta": "500000.0", "model.norm_eps": "1e-6",
                                "model.remat": "'full'"})
  loop_lib.train(cfg, str(tmp_path / "run"))
  warning = [l for l in capsys.readouterr().out.splitlines() if "WARNING" in l]
  assert len(warning) == 1
  assert "rope_theta: 500000.0 vs 10000.0" in warning[0]
  assert "norm_eps: 1e-06 vs 1e-05" in warning[0]
  assert "remat" not in warning[0]  # how it is computed, not what


def test_a_source_trained_with_an_explicit_tokenizer_needs_it_named(source, tmp_path):
  src = tmp_path / "src"
  shutil.copytree(source["exported"], src)
  for name in ("tokenizer.model", "tokenizer_record.json"):
    os.remove(src / name)
  cfg = json.loads((src / "config.json").read_text())
  cfg["data"]["tokenizer_path"] = "/data/tok.model"
  (src / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(ConfigError, match="set --config.data.tokenizer_path=/data/tok.model"):
    loop_lib.train(_smoke(num_steps=0, init_from=str(src)), str(tmp_path / "run"))


def test_two_steps_from_an_imported_hf_checkpoint_with_its_tokenizer(tmp_path, capsys):
  pytest.importorskip("transformers")
  from test_convert_hf import VOCAB, make_hf_llama, write_hf_tokenizer
  from tokenizers import Tokenizer
  hf_dir, imported, run = tmp_path / "hf", tmp_path / "imported", tmp_path / "run"
  make_hf_llama(hf_dir)
  write_hf_tokenizer(hf_dir)
  tok = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))  # the model's vocab: exactly VOCAB
  tok.add_special_tokens([f"<|unused_{i}|>" for i in range(VOCAB - tok.get_vocab_size())])
  tok.save(str(hf_dir / "tokenizer.json"))
  assert cli.main(["convert", "from-hf", "--hf-dir", str(hf_dir), "--workdir", str(imported)]) == 0
  argv = ["train", "--config", str(imported / "config.json"), "--workdir", str(run),
          f"--config.train.init_from={imported}", "--config.train.num_steps=2",
          "--config.train.global_batch_size=8", "--config.data.seq_len=32",
          "--config.data.max_files=20", "--config.train.eval_batches=1",
          "--config.train.log_every=1", "--config.train.progress_bar=False",
          "--config.checkpoint.every_steps=1", "--config.optim.warmup_steps=1"]
  assert cli.main(argv) == 0
  out = capsys.readouterr().out
  assert "tokenizer.json copied from" in out and "WARNING" not in out
  assert (run / "tokenizer.json").read_bytes() == (imported / "tokenizer.json").read_bytes()
  record = json.loads((run / "tokenizer_record.json").read_text())
  assert record["kind"] == "HFTokenizer" and record["bos_id"] == 1
  losses = [r["loss"] for r in metrics(run) if "loss" in r]
  assert len(losses) == 2 and all(np.isfinite(losses))
  _, metadata = _state_at(run, 1)
  assert metadata["initialized_from"]["path"] == str(imported)
  state_1, _ = _state_at(run, 1)
  assert any(np.any(a != b) for a, b in zip(jax.tree.leaves(state_1.params),
                                            jax.tree.leaves(_params(imported))))
