"""Console progress lines for batch jobs, and the optional W&B tracking's up-front check (the
W&B history itself is checked end to end in test_train_e2e.py)."""

import importlib.util

import pytest

from mai_jax import config as C
from mai_jax import metrics as M


def test_console_lines_carry_step_loss_throughput_mfu_and_an_eta_from_the_mean_step_time():
  times, lines = iter([100.0, 110.0, 120.0, 150.0]), []
  log = M.ConsoleLog(num_steps=10, enabled=True, clock=lambda: next(times), out=lines.append)
  log.step(1, 5.0, 1234.6, None)  # the first step carries the compile: no rate yet
  log.step(2, 4.5, 2000.0, 0.4123)  # 10 s per step so far, 8 steps left
  log.step(3, 4.25, 2000.0, 0.4123)  # 20 s / 2 steps x 7 left
  log.step(4, 4.0, 2000.0, 0.4123)  # 50 s / 3 steps x 6 left
  log.eval(4, 3.98766)
  assert lines == [
      "mai-jax: step 1/10  loss 5.0000  1,235 tok/s  MFU n/a  ETA n/a",
      "mai-jax: step 2/10  loss 4.5000  2,000 tok/s  MFU 41.2%  ETA 1m20s",
      "mai-jax: step 3/10  loss 4.2500  2,000 tok/s  MFU 41.2%  ETA 1m10s",
      "mai-jax: step 4/10  loss 4.0000  2,000 tok/s  MFU 41.2%  ETA 1m40s",
      "mai-jax: step 4/10  eval loss 3.9877",
  ]


@pytest.mark.parametrize("seconds, text", [(0, "0s"), (59.4, "59s"), (61, "1m01s"),
                                           (3725, "1h02m"), (90061, "25h01m")])
def test_eta_durations(seconds, text):
  assert M._duration(seconds) == text  # pylint: disable=protected-access


def test_only_process_zero_prints():
  lines = []
  M.ConsoleLog(num_steps=4, enabled=False, out=lines.append).step(1, 1.0, 1.0, None)
  assert lines == []


def test_a_wandb_project_without_wandb_installed_is_a_config_error(monkeypatch):
  cfg = C.apply_overrides(C.Config(), {"train.wandb_project": "p"})
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "wandb" else real(name, *a))
  with pytest.raises(C.ConfigError, match=r'train.wandb_project=.p. needs wandb: pip install -e ".\[track\]"'):
    M.check_tracking(cfg)
  M.check_tracking(C.Config())  # no project: nothing to check


def test_wandb_mode_is_checked():
  with pytest.raises(C.ConfigError, match="train.wandb_mode='ofline' is not one of"):
    C.validate(C.apply_overrides(C.Config(), {"train.wandb_mode": "ofline"}))
