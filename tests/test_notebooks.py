"""Every notebook in notebooks/ runs top to bottom in a fresh kernel on 8 fake CPU devices.

With nbclient/nbformat/ipykernel installed (the `test` extra) each notebook runs in a real Jupyter
kernel; without them its code cells run in order as one script (the notebooks use no IPython
magics), so the check never silently disappears. Either way a cell that raises fails the test.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
TIMEOUT_S = 600
HAVE_NBCLIENT = all(importlib.util.find_spec(m) for m in ("nbclient", "nbformat", "ipykernel"))


def _kernel_env(tmp_path: pathlib.Path) -> dict:
  """The 8-device CPU setup the notebooks expect, the checkout on the path, temp files in tmp."""
  env = dict(os.environ)
  flags = env.get("XLA_FLAGS", "")
  if "--xla_force_host_platform_device_count" not in flags:
    env["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=8").strip()
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
  env["TMPDIR"] = str(tmp_path)
  env["MPLBACKEND"] = "Agg"
  return env


def _code_cells(path: pathlib.Path) -> list[str]:
  with open(path) as f:
    notebook = json.load(f)
  return ["".join(c["source"]) for c in notebook["cells"] if c["cell_type"] == "code"]


def _run_in_kernel(path: pathlib.Path, env: dict) -> None:
  import nbclient
  import nbformat
  notebook = nbformat.read(path, as_version=4)
  client = nbclient.NotebookClient(notebook, timeout=TIMEOUT_S, kernel_name="python3",
                                   resources={"metadata": {"path": str(path.parent)}})
  client.execute(env=env)  # raises CellExecutionError naming the cell that failed


def _run_as_script(path: pathlib.Path, env: dict, tmp_path: pathlib.Path) -> None:
  script = tmp_path / (path.stem + ".py")
  script.write_text("\n\n".join(_code_cells(path)) + "\n")
  proc = subprocess.run([sys.executable, str(script)], cwd=path.parent, env=env,
                        capture_output=True, text=True, timeout=TIMEOUT_S)
  assert proc.returncode == 0, f"{path.name} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"


def test_there_are_notebooks():
  assert {p.name for p in NOTEBOOKS} >= {"quickstart.ipynb", "sharding_playground.ipynb"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_committed_without_outputs(path):
  """Outputs stay out of git: diffs stay small and no stale results are shown as current."""
  with open(path) as f:
    notebook = json.load(f)
  assert notebook["nbformat"] == 4
  for i, cell in enumerate(notebook["cells"]):
    if cell["cell_type"] == "code":
      assert cell["outputs"] == [] and cell["execution_count"] is None, \
          f"{path.name} cell {i} has outputs; clear them before committing"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom(path, tmp_path):
  env = _kernel_env(tmp_path)
  if HAVE_NBCLIENT:
    _run_in_kernel(path, env)
  else:
    _run_as_script(path, env, tmp_path)


def _install_cell(path: pathlib.Path) -> str:
  return next(c for c in _code_cells(path) if "REPO_URL" in c)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_has_a_colab_badge_for_its_own_repository(path):
  with open(path) as f:
    first = "".join(json.load(f)["cells"][0]["source"])
  repo_url = _install_cell(path).split('os.environ.get("MAI_JAX_REPO_URL", "')[1].split('"')[0]
  owner_repo = repo_url.removeprefix("https://github.com/")
  assert ("[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
          f"(https://colab.research.google.com/github/{owner_repo}/blob/main/notebooks/"
          f"{path.name})") in first


def _exec_install_cell(path, cwd, monkeypatch) -> list:
  """Runs the notebook's install cell in `cwd` with subprocess.run recorded, not run (a recorded
  `git clone` creates the checkout's two marker folders)."""
  calls = []

  def fake_run(cmd, check=False):
    calls.append(cmd)
    if cmd[:2] == ["git", "clone"]:
      os.makedirs(os.path.join(cmd[-1], "mai_jax"))
      os.makedirs(os.path.join(cmd[-1], "experiments"))

  monkeypatch.setattr(subprocess, "run", fake_run)
  monkeypatch.setattr(sys, "path", list(sys.path))
  monkeypatch.chdir(cwd)
  exec(compile(_install_cell(path), str(path), "exec"), {"__name__": "notebook"})  # noqa: S102
  return calls


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_install_cell_is_a_no_op_inside_the_repository(path, monkeypatch):
  assert _exec_install_cell(path, REPO / "notebooks", monkeypatch) == []
  assert os.getcwd() == str(REPO)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_install_cell_clones_and_installs_the_public_repository_elsewhere(path, monkeypatch,
                                                                         tmp_path):
  monkeypatch.setenv("HOME", str(tmp_path))
  monkeypatch.setenv("MAI_JAX_REPO_URL", "https://example.invalid/fork/mai_jax")
  (tmp_path / "elsewhere").mkdir()
  calls = _exec_install_cell(path, tmp_path / "elsewhere", monkeypatch)
  clone = str(tmp_path / "mai_jax")
  assert calls == [["git", "clone", "--depth=1", "https://example.invalid/fork/mai_jax", clone],
                   [sys.executable, "-m", "pip", "install", "-q", "-e", clone + "[track]"]]
  assert os.getcwd() == clone
