"""Portable workdirs: a run trained with mesh.tensor=2 (or a model sharded with mesh.expert=2) on 8
devices is evaluated, sampled and exported on 1 device with no mesh override."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from cli_runs import REPO, SMOKE, cli_env
from mai_jax import checkpoint as checkpoint_lib
from mai_jax import config as C
from mai_jax import sharding as S
from mai_jax import workdir as workdir_lib
from mai_jax.train import loop as loop_lib
from mai_jax.train.trainer import build_trainer

TINY = {"model.num_layers": "1", "model.d_model": "32", "model.num_heads": "2",
        "model.num_kv_heads": "2", "model.head_dim": "16", "model.d_ff": "64",
        "model.remat": "'none'", "data.seq_len": "16", "data.max_files": "10",
        "data.tokenizer_train_chars": "60000", "train.eval_every": "0", "train.eval_batches": "1",
        "train.num_steps": "0"}


def _cfg(**changes) -> C.Config:
  cfg = C.apply_overrides(C.load_experiment(SMOKE), {**TINY, **changes})
  C.validate(cfg)
  return cfg


@pytest.mark.parametrize("mesh,devices,want", [
    (dict(tensor=2), 8, dict(data=1, stage=1, fsdp=-1, expert=1, tensor=2)),  # fits: kept
    (dict(tensor=2), 1, dict(data=1, stage=1, fsdp=-1, expert=1, tensor=1)),
    (dict(data=2, expert=2, tensor=2), 1, dict(data=1, stage=1, fsdp=-1, expert=1, tensor=1)),
    (dict(data=2, expert=2, tensor=2), 4, dict(data=1, stage=1, fsdp=-1, expert=2, tensor=2)),
    (dict(expert=4, fsdp=2), 2, dict(data=1, stage=1, fsdp=-1, expert=2, tensor=1)),
    (dict(stage=2, fsdp=2), 1, dict(data=1, stage=1, fsdp=-1, expert=1, tensor=1)),
])
def test_fit_mesh_keeps_a_fitting_mesh_and_shrinks_the_others(mesh, devices, want):
  cfg = _cfg(**{"model.num_experts": "4"})
  cfg = dataclasses.replace(cfg, mesh=dataclasses.replace(cfg.mesh, **mesh))
  fitted = workdir_lib.fit_mesh(cfg, devices).mesh
  assert {a: getattr(fitted, a) for a in C.MESH_AXES} == want
  C.validate(dataclasses.replace(cfg, mesh=fitted), devices)


_READ_ON_ONE_DEVICE = """
import json, sys
from mai_jax import cli
run, moe, out = sys.argv[1:4]
rcs = [cli.main(["eval", "--workdir", run, "--tasks"]),
       cli.main(["sample", "--workdir", run, "--prompt", "def", "--max-new-tokens", "3",
                 "--temperature", "0"]),
       cli.main(["convert", "to-hf", "--workdir", run, "--out", out + "/hf", "--step", "0"]),
       cli.main(["checkpoints", "--workdir", run, "--export-params", out + "/exported"]),
       cli.main(["eval", "--workdir", out + "/exported", "--tasks", "--step", "0"]),
       cli.main(["sample", "--workdir", moe, "--prompt", "def", "--max-new-tokens", "2"]),
       cli.main(["convert", "to-hf", "--workdir", moe, "--out", out + "/moe_hf"])]
print("RCS " + json.dumps(rcs))
"""


@pytest.mark.slow  # a tiny run on 8 devices, then one 1-device process that reads it (~60 s)
def test_a_tensor_2_run_reads_on_one_device(tmp_path):
  transformers = pytest.importorskip("transformers")
  torch = pytest.importorskip("torch")
  run = tmp_path / "run"
  result = loop_lib.train(_cfg(**{"mesh.tensor": "2"}), str(run))
  # An MoE model whose params were born sharded over mesh.expert=2 (and tensor=2).
  moe = tmp_path / "moe"
  cfg = _cfg(**{"mesh.tensor": "2", "mesh.expert": "2", "model.num_experts": "4"})
  params = build_trainer(cfg, S.make_mesh(cfg.mesh)).init_state().params
  checkpoint_lib.save_params(str(moe / "checkpoints"), 0, params, C.to_dict(cfg), {})
  (moe / "config.json").write_text(C.to_json(cfg))
  shutil.copyfile(run / "tokenizer.model", moe / "tokenizer.model")

  proc = subprocess.run([sys.executable, "-c", _READ_ON_ONE_DEVICE, str(run), str(moe),
                         str(tmp_path)], capture_output=True, text=True, cwd=REPO,
                        env=cli_env(devices=1), timeout=600)
  assert "RCS [0, 0, 0, 0, 0, 0, 0]" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert "does not fit the 1 device(s) here" in proc.stderr
  exported = C.load_json(str(tmp_path / "exported" / "config.json"))
  assert exported.mesh.tensor == 2  # the run's mesh, not the one fitted for reading
  # Same params, same held-out batch: the loop's eval loss, recomputed on one device.
  for workdir in (run, tmp_path / "exported"):
    with open(workdir / "eval.json") as f:
      assert json.load(f)["validation"]["loss"] == pytest.approx(result.eval_loss, rel=1e-5)
  assert "=== 'def'\ndef" in proc.stdout
  # The 1-device export computes what the tensor=2 model computes on 8 devices.
  _, model, _, _ = workdir_lib.load_model(str(run))
  tokens_BT = np.random.RandomState(0).randint(0, 512, (2, 8))
  ours = np.asarray(jax.device_get(model(jax.numpy.asarray(tokens_BT))))
  ref = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
  with torch.no_grad():
    theirs = ref(torch.tensor(tokens_BT)).logits.numpy()
  np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
  assert (tmp_path / "moe_hf" / "config.json").is_file()
