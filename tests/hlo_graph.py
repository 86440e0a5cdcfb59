"""Compiled HLO text (`jax.jit(f).lower(...).compile().as_text()`) read as a graph, for tests that
check a program's structure: its computations, each instruction's opcode, operands, called
computations and jax op name, and what an instruction transitively depends on.

Why the compiled HLO: it is what XLA's scheduler orders (after CSE and fusion), so a dependency
that is absent here cannot keep two computations from overlapping."""

import dataclasses
import re

# Operations that compute matrix products (a fusion or loop containing one counts through `calls`).
DOT_OPS = ("dot", "ragged-dot", "convolution")

_HEAD = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = ")
_OPCODE = re.compile(r" ([a-z][a-z0-9\-]*)\(")
_CALLS = re.compile(r"(?:calls|to_apply|body|condition|branch_computations)="
                    r"\{?(%?[\w.\-]+(?:, ?%[\w.\-]+)*)")


def computations(hlo: str) -> dict:
  """Compiled HLO text -> {computation name: its instruction lines}."""
  comps, name = {}, None
  for line in hlo.splitlines():
    head = _HEAD.match(line)
    if head:
      name = head.group(1)
      comps[name] = []
    elif name:
      comps[name].append(line)
  return comps


@dataclasses.dataclass(frozen=True)
class Instruction:
  name: str
  opcode: str
  operands: tuple  # names of the instructions (same computation) it reads
  calls: tuple  # computations it runs (fusion bodies, loop bodies, reducers)
  op_name: str  # jax's name stack (named scopes, jvp / transpose), '' if none


def _operand_text(rest: str) -> str:
  """The text between the opcode's parentheses (operands may nest parentheses in their types)."""
  depth = 0
  for i, ch in enumerate(rest):
    depth += ch == "("
    depth -= ch == ")"
    if depth == 0:
      return rest[1:i]
  return rest[1:]


def parse(hlo: str) -> dict:
  """Compiled HLO text -> {computation: {instruction name: Instruction}}."""
  out = {}
  for comp, lines in computations(hlo).items():
    instrs = {}
    for line in lines:
      head = _INSTRUCTION.match(line)
      if not head:
        continue
      rest = line[head.end():]
      opcode = _OPCODE.search(rest)
      if not opcode:
        continue
      args = _operand_text(rest[opcode.end() - 1:])
      calls = tuple(c.strip().lstrip("%") for m in _CALLS.findall(rest) for c in m.split(","))
      op_name = re.search(r'op_name="([^"]*)"', rest)
      instrs[head.group(1)] = Instruction(
          name=head.group(1), opcode=opcode.group(1),
          operands=tuple(re.findall(r"%([\w.\-]+)", args)), calls=tuple(c for c in calls if c),
          op_name=op_name.group(1) if op_name else "")
    out[comp] = instrs
  return out


def ancestors(instrs: dict, name: str) -> set:
  """Names of the instructions `name` transitively reads, inside its computation."""
  seen, todo = set(), list(instrs[name].operands)
  while todo:
    n = todo.pop()
    if n not in seen and n in instrs:
      seen.add(n)
      todo += instrs[n].operands
  return seen


def dot_names(graph: dict, instr: Instruction) -> list:
  """The jax op names of the matrix products `instr` is or runs (through fusions, loops, calls)."""
  names = [instr.op_name] if instr.opcode in DOT_OPS else []
  todo, seen = list(instr.calls), set()
  while todo:
    comp = todo.pop()
    if comp in seen or comp not in graph:
      continue
    seen.add(comp)
    for inner in graph[comp].values():
      if inner.opcode in DOT_OPS:
        names.append(inner.op_name)
      todo += inner.calls
  return names
