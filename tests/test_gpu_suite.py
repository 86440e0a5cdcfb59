"""benchmarks/gpu_suite.py's dry run: the GPU suite's exact code path (one child process per
measurement, the planner next to the measured step, one JSON each) at toy size on CPU, so the
script a lent GPU runs cannot break unnoticed."""

import json
import os
import subprocess
import sys

import pytest
from cli_runs import xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUITE = os.path.join(REPO, "benchmarks", "gpu_suite.py")


@pytest.mark.slow
def test_dry_run_writes_every_measurement(tmp_path):
  env = dict(os.environ, XLA_FLAGS=xla_flags())  # one CPU device, as on a GPU
  proc = subprocess.run([sys.executable, SUITE, "--dry-run", "--out", str(tmp_path), "--steps",
                         "2", "--warmup", "1", "--budget-s", "3000"],
                        capture_output=True, text=True, env=env, timeout=3000, cwd=REPO)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  summary = json.loads((tmp_path / "summary.json").read_text())
  names = [r["name"] for r in summary["rows"]]
  assert names[0] == "ceilings" and "dense_cudnn_packed" in names and "moe_cudnn_full" in names
  assert all(r["status"] == "ok" for r in summary["rows"]), summary
  ceilings = json.loads((tmp_path / "ceilings.json").read_text())["result"]
  assert ceilings["matmul_tflops"] > 0 and ceilings["matmul_rel_error_vs_f32"] < 2e-2
  for name in names[1:]:
    record = json.loads((tmp_path / f"{name}.json").read_text())
    assert record["command"].startswith("python benchmarks/gpu_suite.py --one " + name)
    assert record["machine"]["backend"] == "cpu" and record["config"]["data"]["seq_len"] == 64
    if name == "attention_packed":
      continue
    if name == "torch_peer_dense":  # the peer has no planner figures; its model is ours
      peer = record["result"]
      assert peer["peer"] == "torch+transformers" and peer["tokens_per_step"] == 8 * 64
      assert peer["step_time_s_median"] > 0 and peer["gradient_checkpointing"]
      assert peer["params"] > 0  # torch_peer.run checks it equals our parameter count
      continue
    result = record["result"]
    assert result["step_time_s_median"] > 0 and result["tokens_per_step"] == 8 * 64
    assert result["planner"]["memory_per_device_bytes"]["total"] > 0
    assert result["planner"]["step_time_s"] > 0
  fp8 = json.loads((tmp_path / "dense_cudnn_full_fp8.json").read_text())
  assert fp8["config"]["model"]["fp8"] == "current"  # bf16 vs fp8 on a lent GPU
  packed = json.loads((tmp_path / "dense_cudnn_packed.json").read_text())
  assert packed["mean_doc_len"] == 16
  # The packed-attention comparison ran its code path: on CPU 'cudnn_packed' is its XLA
  # emulation from the cuDNN offsets, which must equal the float32 XLA mask path.
  attention = json.loads((tmp_path / "attention_packed.json").read_text())["result"]
  assert attention["seq_len"] == 64 and attention["segments_per_row_max"] > 1
  assert attention["paths"]["cudnn"]["status"].startswith("skipped")
  for path in ("xla", "cudnn_packed"):
    assert attention["paths"][path]["fwd_bwd_s_median"] > 0
    assert attention["paths"][path]["max_rel_error_vs_f32"] < 1e-5
  assert "dense_cudnn_offsets" not in names  # left out of the dry run (in_dry_run=False)
  assert "dense_xla_full" not in names and "dense_cudnn_none" not in names
  assert "torch_peer_dense" in names
  assert "rows" in summary and "measurement" in proc.stdout.splitlines()[-len(names) - 1]


def test_unknown_measurement_is_a_one_line_error(tmp_path):
  proc = subprocess.run([sys.executable, SUITE, "--out", str(tmp_path), "--only", "dense_fp9"],
                        capture_output=True, text=True, timeout=120, cwd=REPO)
  assert proc.returncode != 0
  assert "unknown measurement(s) dense_fp9" in proc.stderr and "Traceback" not in proc.stderr
  assert not os.listdir(tmp_path)  # refused before anything was written
