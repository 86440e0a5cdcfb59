"""Bytes the all-to-alls of a compiled program move, read from its HLO text (`compiled.as_text()`).

Why from the compiled text: what crosses the wire is what XLA emits after its own passes, not what
the jaxpr asks for (XLA:CPU, for one, widens a float8 all-to-all to f16; model/fp8_dispatch.py).
benchmarks/moe_layer.py reports these per device and tests/test_moe_fp8.py checks the fp8 dispatch
with them.
"""

from __future__ import annotations

import math
import re

DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2,
               "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}
_SHAPE = re.compile(r"\b(" + "|".join(DTYPE_BYTES) + r")\[([\d,]*)\]")
_OPS = (" all-to-all(", " all-to-all-start(")


def all_to_all_bytes(hlo_text: str) -> list[tuple[str, int]]:
  """[(dtype, bytes)] for each all-to-all of one device's program, in program order: the bytes
  of its result (the same as its operands'); XLA:CPU splits a tiled all-to-all into one operand
  per destination, whose bytes are summed. An all-to-all of mixed dtypes is an error."""
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
    out.append((dtypes.pop(), nbytes))
  return out
