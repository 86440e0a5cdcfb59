"""Progress bars on the long stages of a curation run (filter, near dedup, write).

tqdm on stderr only, so they never reach stdout, the report or the output shards; shown only
when stderr is a terminal and the run asked for them (`mai-jax data curate --no-progress` or
`pipeline.curate(progress=False)` turns them off), and Ray Data's own bars follow the same switch.
"""

from __future__ import annotations

import sys
from typing import Iterable, Optional


class Progress:
  """`progress(iterable, total, desc, unit)`: a tqdm bar, or a silent one when off."""

  def __init__(self, enabled: bool = True):
    isatty = getattr(sys.stderr, "isatty", None)
    self.on = bool(enabled and isatty and isatty())

  def __call__(self, iterable: Optional[Iterable] = None, total: Optional[int] = None,
               desc: str = "", unit: str = "it"):
    from tqdm import tqdm  # pylint: disable=import-outside-toplevel
    return tqdm(iterable, total=total, desc=desc, unit=unit, file=sys.stderr,
                disable=not self.on, leave=False, dynamic_ncols=True)


OFF = Progress(enabled=False)
