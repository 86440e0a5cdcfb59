"""Numerical fault policy: which steps are bad, and when to go back to a checkpoint.

The train step already refuses non-finite updates (train/step.py). This monitor watches the
metrics the loop reads back: `train.max_consecutive_bad_steps` skipped updates in a row, or one loss
spike (a loss above `train.loss_spike_ratio` x the mean of the previous `train.loss_spike_window`
good losses), make the loop restore its last checkpoint and skip the batches those steps used
(PaLM's remedy for spikes: the same batches would fail the same way, since the data order is
deterministic).
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Optional

from mai_jax.config import TrainConfig


@dataclasses.dataclass(frozen=True)
class Verdict:
  bad: bool
  reason: str = ""
  restore: bool = False


class FaultMonitor:
  """Feeds on (step, batch position, loss, update_skipped); says when to restore and what to skip."""

  def __init__(self, cfg: TrainConfig):
    self.cfg = cfg
    self._recent = collections.deque(maxlen=max(cfg.loss_spike_window, 1))
    self._bad_positions: list[int] = []  # batch positions of the current run of bad steps
    self.skipped_updates = 0
    self.spikes = 0

  def observe(self, step: int, position: int, loss: float, update_skipped: bool) -> Verdict:
    if update_skipped:
      self.skipped_updates += 1
      self._bad_positions.append(position)
      limit = self.cfg.max_consecutive_bad_steps
      restore = bool(limit) and len(self._bad_positions) >= limit
      return Verdict(True, f"non-finite loss or gradient at step {step} (update skipped)", restore)
    spike = self._spike(loss)
    if spike:
      self.spikes += 1
      self._bad_positions.append(position)
      return Verdict(True, f"loss spike at step {step}: {spike}", True)
    self._bad_positions.clear()
    self._recent.append(loss)
    return Verdict(False)

  def _spike(self, loss: float) -> Optional[str]:
    ratio = self.cfg.loss_spike_ratio
    if not ratio or len(self._recent) < self._recent.maxlen:
      return None
    mean = sum(self._recent) / len(self._recent)
    if loss > ratio * mean:
      return f"{loss:.4f} > {ratio} x {mean:.4f} (mean of the previous {len(self._recent)})"
    return None

  @property
  def in_bad_streak(self) -> bool:
    return bool(self._bad_positions)

  def take_bad_positions(self) -> list[int]:
    """The batch positions to skip after a restore; forgets them and the loss history."""
    positions, self._bad_positions = self._bad_positions, []
    self._recent.clear()
    return positions
