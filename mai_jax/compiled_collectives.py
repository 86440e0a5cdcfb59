"""Bytes the all-to-alls of a compiled program move, read from its HLO text (`compiled.as_text()`).

Why from the compiled text: what crosses the wire is what XLA emits after its own passes, not what
the jaxpr asks for (XLA:CPU, for one, widens a float8 all-to-all to f16; model/fp8_dispatch.py).
benchmarks/moe_layer.py reports these per device and tests/test_moe_fp8.py checks the fp8 dispatch
with them, and tests/test_moe_hierarchical.py checks the replica groups of the hierarchical
dispatch's two stages (`all_to_alls`).
"""

from __future__ import annotations

import math
import re

import numpy as np

DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2,
               "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}
_SHAPE = re.compile(r"\b(" + "|".join(DTYPE_BYTES) + r")\[([\d,]*)\]")
_OPS = (" all-to-all(", " all-to-all-start(")
_GROUPS = re.compile(r"replica_groups=(\{(?:\{[\d,]*\},?)*\}"  # explicit
                     r"|\[[\d,]+\]<=\[[\d,]+\](?:T\([\d,]+\))?)")  # iota


def all_to_all_bytes(hlo_text: str) -> list[tuple[str, int]]:
  """[(dtype, bytes)] for each all-to-all of one device's program, in program order: the bytes
  of its result (the same as its operands'); XLA:CPU splits a tiled all-to-all into one operand
  per destination, whose bytes are summed. An all-to-all of mixed dtypes is an error."""
  return [(dtype, nbytes) for dtype, nbytes, _ in all_to_alls(hlo_text)]


def all_to_alls(hlo_text: str) -> list[tuple[str, int, tuple]]:
  """[(dtype, bytes, replica groups)] for each all-to-all, as all_to_all_bytes; the groups are a
  tuple of tuples of device ids (() when the op names none: all devices)."""
  out = []
  for line in hlo_text.splitlines():
    op = next((op for op in _OPS if op in line), None)
    if op is None:
      continue
    shapes = _SHAPE.findall(line.split(op)[0].split("=", 1)[-1])
    dtypes = {dtype for dtype, _ in shapes}
    if len(dtypes) != 1:
      raise ValueError(f"all-to-all of dtypes {sorted(dtypes)}: {line.strip()[:200]}")
    nbytes = sum(math.prod(int(n) for n in dims.split(",") if n) * DTYPE_BYTES[dtype]
                 for dtype, dims in shapes)
    groups = _GROUPS.search(line)
    out.append((dtypes.pop(), nbytes, replica_groups(groups.group(1)) if groups else ()))
  return out


def replica_groups(text: str) -> tuple:
  """An HLO replica_groups value -> tuple of tuples of device ids. Both spellings: explicit
  `{{0,4},{1,5}}` and iota `[G,S]<=[dims]T(perm)` (arange(prod dims) reshaped to dims, transposed
  by perm, reshaped to G groups of S)."""
  if text.startswith("{"):
    return tuple(tuple(int(d) for d in g.split(",") if d)
                 for g in re.findall(r"\{([\d,]*)\}", text[1:-1]))
  shape, dims, perm = re.fullmatch(r"\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", text).groups()
  ints = lambda s: [int(n) for n in s.split(",")]
  ids = np.arange(math.prod(ints(dims))).reshape(ints(dims))
  if perm:
    ids = ids.transpose(ints(perm))
  return tuple(tuple(int(d) for d in g) for g in ids.reshape(ints(shape)))
