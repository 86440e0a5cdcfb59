"""A sweep of bad input over every subcommand: one `mai-jax: error:` line, exit 2, no traceback,
nothing written. One test per class of mistake, parametrized over the subcommands it applies to;
all run in-process and fail before any jax computation (the argument checks come first)."""

import json
import os
import signal
import subprocess
import sys

import pytest

from mai_jax import checkpoint as checkpoint_lib
from mai_jax import cli
from mai_jax import config as C

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "experiments", "tiny.py")


def _one_line_error(argv, capsys) -> str:
  assert cli.main(argv) == 2
  captured = capsys.readouterr()
  assert captured.err.startswith("mai-jax: error: "), captured.err
  assert captured.err.count("\n") == 1 and "Traceback" not in captured.err, captured.err
  return captured.err


def _tree(root) -> dict:
  """path -> bytes of every file below root: 'nothing was written' is this staying equal."""
  out = {}
  for folder, _, names in os.walk(root):
    for name in names:
      path = os.path.join(folder, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, root)] = f.read()
  return out


@pytest.fixture
def place(tmp_path, monkeypatch):
  """cwd with a plain file `afile`, an empty folder `empty` and a run folder `run` whose
  config.json is valid."""
  monkeypatch.chdir(tmp_path)
  (tmp_path / "afile").write_text("not a directory\n")
  (tmp_path / "empty").mkdir()
  (tmp_path / "run").mkdir()
  (tmp_path / "run" / "config.json").write_text(C.to_json(C.Config()))
  return tmp_path


FILE_FOR_DIR = [
    ["train", "--config", TINY, "--workdir", "afile"],
    ["eval", "--workdir", "afile"],
    ["sample", "--workdir", "afile", "--prompt", "x"],
    ["checkpoints", "--workdir", "afile"],
    ["checkpoints", "--workdir", "run", "--export-params", "afile"],
    ["convert", "to-hf", "--workdir", "afile", "--out", "out"],
    ["convert", "to-hf", "--workdir", "run", "--out", "afile"],
    ["convert", "from-hf", "--hf-dir", "afile", "--workdir", "out"],
    ["convert", "from-hf", "--hf-dir", "empty", "--workdir", "afile"],
    ["data", "tokenize", "--config", TINY, "--out", "afile"],
    ["data", "inspect", "afile"],
    ["data", "train-tokenizer", "--config", TINY, "--out", "afile/tok.json"],
]


@pytest.mark.parametrize("argv", FILE_FOR_DIR, ids=lambda a: " ".join(a[:2]))
def test_a_file_where_a_directory_belongs(argv, place, capsys):
  before = _tree(place)
  assert "afile" in _one_line_error(argv, capsys)
  assert _tree(place) == before


MISSING = [
    ["eval", "--workdir", "runs/nope"],
    ["eval", "--workdir", "run", "--tasks", "runs/nope"],
    ["sample", "--workdir", "runs/nope", "--prompt", "x"],
    ["checkpoints", "--workdir", "runs/nope"],
    ["convert", "to-hf", "--workdir", "runs/nope", "--out", "out"],
    ["convert", "from-hf", "--hf-dir", "runs/nope", "--workdir", "out"],
    ["data", "inspect", "runs/nope"],
]


@pytest.mark.parametrize("argv", MISSING, ids=lambda a: " ".join(a[:2]))
def test_a_missing_input_directory(argv, place, capsys):
  err = _one_line_error(argv, capsys)
  assert "runs/nope: not found" in err
  assert "pass --config" not in err  # eval/sample/convert take no --config
  assert not os.path.exists(place / "out")


@pytest.mark.parametrize("argv", [["eval", "--workdir", "empty"],
                                  ["sample", "--workdir", "empty", "--prompt", "x"],
                                  ["convert", "to-hf", "--workdir", "empty", "--out", "out"]],
                         ids=lambda a: " ".join(a[:2]))
def test_a_directory_that_is_no_run(argv, place, capsys):
  err = _one_line_error(argv, capsys)
  assert "holds no config.json" in err and "pass --config" not in err


@pytest.mark.parametrize("argv", [
    ["train", "--config", TINY, "--workdir", "locked/run"],
    ["convert", "to-hf", "--workdir", "run", "--out", "locked/hf"],
    ["data", "tokenize", "--config", TINY, "--out", "locked/cache"],
    ["data", "train-tokenizer", "--config", TINY, "--out", "locked/tok.json"],
    ["checkpoints", "--workdir", "run", "--export-params", "locked/params"],
], ids=lambda a: " ".join(a[:2]))
def test_an_unwritable_output(argv, place, capsys, monkeypatch):
  (place / "locked").mkdir()
  real_access = os.access
  # chmod does not stop root (as in CI containers): make `locked` unwritable to os.access alone.
  monkeypatch.setattr(os, "access", lambda p, mode: (not str(p).endswith("locked")
                                                     and real_access(p, mode)))
  before = _tree(place)
  assert "locked is not writable" in _one_line_error(argv, capsys)
  assert _tree(place) == before


@pytest.mark.parametrize("argv, message", [
    (["plan", "--config", TINY, "--gpus", "-8"], "--gpus -8 must be positive"),
    (["plan", "--config", TINY, "--gpus", "8", "--top", "0"], "--top 0 must be positive"),
    (["plan", "--config", TINY, "--gpus", "8", "--compile-devices", "0"],
     "--compile-devices 0 must be positive"),
    (["sample", "--workdir", "run", "--prompt", "x", "--max-new-tokens", "0"],
     "--max-new-tokens 0 must be positive"),
    (["chat", "--workdir", "run", "--max-context", "0"], "--max-context 0 must be positive"),
    (["data", "tokenize", "--config", TINY, "--out", "cache", "--workers", "0"],
     "--workers 0 must be positive"),
    (["checkpoints", "--workdir", "run", "--step", "-1"], "--step -1 must be >= 0"),
    (["train", "--config", TINY, "--workdir", "w", "--num-processes", "0"],
     "--num-processes 0 must be positive"),
], ids=lambda a: " ".join(a[:2]) if isinstance(a, list) else "")
def test_a_bad_count(argv, message, place, capsys):
  err = _one_line_error(argv, capsys)
  assert message in err and "target_num_gpus" not in err


TRUNCATED, NOT_SECTIONS = '{"model": {"d_model": 64', ["[1, 2]", '{"model": 3}']
RUN_CONFIG_READERS = [
    ["train", "--workdir", "run"],
    ["train", "--config", "run/config.json", "--workdir", "other"],
    ["config", "show", "--workdir", "run"],
]
# Readers of a checkpoint take its own config (workdir.open_checkpoint), never config.json: with a
# broken config.json and no checkpoint they say there is no checkpoint.
CHECKPOINT_READERS = [
    ["eval", "--workdir", "run"],
    ["sample", "--workdir", "run", "--prompt", "x"],
    ["convert", "to-hf", "--workdir", "run", "--out", "out"],
]


@pytest.mark.parametrize("broken, argv, text, named", [
    *[("run/config.json", argv, text, "run/config.json") for argv in RUN_CONFIG_READERS
      for text in [TRUNCATED] + NOT_SECTIONS],
    *[("run/config.json", argv, TRUNCATED, "no restorable checkpoint")
      for argv in CHECKPOINT_READERS],
    ("hf/config.json", ["convert", "from-hf", "--hf-dir", "hf", "--workdir", "out"], TRUNCATED,
     "hf/config.json"),
    ("cache/manifest.json", ["data", "inspect", "cache"], TRUNCATED, "cache/manifest.json"),
], ids=lambda a: " ".join(a[:2]) if isinstance(a, list) else None)
def test_a_broken_json_file(broken, argv, text, named, place, capsys):
  os.makedirs(place / os.path.dirname(broken), exist_ok=True)
  (place / broken).write_text(text)
  before = _tree(place)
  assert named in _one_line_error(argv, capsys)
  assert _tree(place) == before


EXPERIMENTS = {
    "syntax.py": ("from mai_jax.config import Config\n\ndef get_config(variant=None)\n"
                  "  return Config()\n", "syntax.py:3: syntax error"),
    "field.py": ("from mai_jax.config import Config, ModelConfig\n\ndef get_config(variant=None):\n"
                 "  return Config(model=ModelConfig(d_modle=64))\n",
                 "field.py:4: TypeError: ModelConfig.__init__() got an unexpected keyword "
                 "argument 'd_modle' (did you mean 'd_model'?)"),
    "raises.py": ("import os\nSIZE = int(os.environ.get('NOPE', 'x'))\n",
                  "raises.py:2: ValueError: invalid literal for int()"),
}


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
@pytest.mark.parametrize("command", [
    ["train", "--workdir", "w"], ["plan", "--gpus", "8"],
    ["data", "train-tokenizer", "--out", "tok.json"], ["data", "tokenize", "--out", "cache"],
], ids=lambda a: " ".join(a[:2]))
def test_a_bad_experiment_file(name, command, place, capsys):
  text, message = EXPERIMENTS[name]
  (place / name).write_text(text)
  before = _tree(place)
  assert message in _one_line_error(command + ["--config", name], capsys)
  assert _tree(place) == before


def test_more_tensor_shards_than_heads_is_refused():
  """tensor=8 with 4 heads would replicate attention on all 8 devices, silently."""
  cfg = C.load_experiment(TINY + ":smoke")
  cfg = C.apply_overrides(cfg, {"mesh.tensor": "8", "mesh.fsdp": "1"})
  with pytest.raises(C.ConfigError, match="model.num_heads=4 must be divisible by the 8 devices"):
    C.validate(cfg, 8)
  C.validate(C.apply_overrides(cfg, {"mesh.tensor": "4", "mesh.fsdp": "2"}), 8)  # kv_heads=2 ok


def test_plan_into_a_closed_pipe_exits_quietly():
  """`mai-jax plan --json | head -3`: the reader leaves early; no BrokenPipeError traceback."""
  proc = subprocess.Popen([sys.executable, "-m", "mai_jax", "plan", "--config", TINY,
                           "--gpus", "8", "--json"], cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  proc.stdout.close()  # before the plan is printed: its first write hits a closed pipe
  err = proc.stderr.read().decode()
  assert proc.wait(timeout=300) == 128 + signal.SIGPIPE, err  # as `yes | head` leaves `yes`
  assert err == ""


def _step_dir(root, name, good=True):
  os.makedirs(root / name / "state")
  (root / name / "state" / "params").write_bytes(b"\x01" * 64)
  checkpoint_lib.write_manifest(str(root / name), checksums=True)
  if not good:
    (root / name / "state" / "params").write_bytes(b"\x02" * 64)  # fails its CRC32


@pytest.mark.parametrize("layout, code, summary", [
    ({"4": True, "8.corrupt": None}, 0, "resumes from step 4 (1 quarantined: see above)"),
    ({"4": True, "8": True}, 0, "resumes from step 8"),
    ({"4": False, "8": True}, 0, "resumes from step 8 (1 corrupt"),
    ({"4": True, "8": False}, 1, "the newest step 8 is corrupt: a resume falls back to step 4"),
    ({"4.corrupt": None}, 1, "no restorable checkpoint"),
])
def test_checkpoints_exit_code_is_about_the_latest_restorable_state(layout, code, summary,
                                                                     tmp_path, capsys):
  root = tmp_path / "run" / "checkpoints"
  for name, good in layout.items():
    if good is None:
      os.makedirs(root / name / "state")
      (root / name / "REASON").write_text("restore failed\n")
    else:
      _step_dir(root, name, good)
  assert cli.main(["checkpoints", "--workdir", str(tmp_path / "run")]) == code
  out = capsys.readouterr().out
  assert out.strip().splitlines()[-1].startswith(summary), out


def test_experiment_errors_name_the_file_and_line(tmp_path):
  path = tmp_path / "exp.py"
  path.write_text("def get_config(variant=None):\n  return {'a': 1}['b']\n")
  with pytest.raises(C.ConfigError, match=r"exp.py:2: KeyError: 'b'"):
    C.load_experiment(str(path))
  with open(tmp_path / "c.json", "w") as f:
    json.dump({"model": {"d_model": 64}}, f)
  assert C.load_json(str(tmp_path / "c.json")).model.d_model == 64
