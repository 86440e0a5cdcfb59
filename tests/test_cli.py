"""CLI error paths: one line on stderr naming the problem, exit code 2, no traceback."""

import os
import subprocess
import sys

import pytest
from cli_runs import cli_env

from mai_jax import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "experiments", "tiny.py")


@pytest.mark.parametrize("argv, message", [
    (["train", "--config", TINY, "--workdir", "W", "--config.train.num_stepz=3"],
     "unknown config key train.num_stepz (did you mean 'num_steps'?)"),
    (["train", "--config", TINY, "--workdir", "W", "--config.train.num_steps=abc"],
     "--config.train.num_steps='abc': expected int"),
    (["train", "--config", TINY + ":nope", "--workdir", "W"], "unknown variant 'nope'"),
    (["train", "--config", "experiments/missing.py", "--workdir", "W"], "not found"),
    (["train", "--workdir", "W"], "no config: pass --config"),
    (["train", "--config", TINY, "--workdir", "W", "--config.model.num_kv_heads=3"],
     "model.num_kv_heads=3 must divide model.num_heads=4"),
    (["train", "--config", TINY, "--workdir", "W", "--config.train"], "--config.train needs a value"),
])
def test_errors_are_one_line_exit_2(argv, message, capsys, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert cli.main(argv) == 2
  err = capsys.readouterr().err
  assert message in err
  assert err.count("\n") == 1 and "Traceback" not in err


def test_split_overrides_accepts_both_forms():
  rest, overrides = cli.split_overrides(
      ["train", "--config.train.seed=3", "--workdir", "w", "--config.model.remat", "full"])
  assert rest == ["train", "--workdir", "w"]
  assert overrides == {"train.seed": "3", "model.remat": "full"}


def test_impossible_mesh_through_the_real_entry_point(tmp_path):
  """The device count is only known once jax starts: still one line and exit 2."""
  env = cli_env()
  proc = subprocess.run(
      [sys.executable, "-m", "mai_jax", "train", "--config", TINY, "--workdir", str(tmp_path / "w"),
       "--config.mesh.fsdp=3"], capture_output=True, text=True, env=env, timeout=300)
  assert proc.returncode == 2, proc.stderr
  assert "multiply to 3 but there are 8 devices" in proc.stderr
  assert "Traceback" not in proc.stderr
