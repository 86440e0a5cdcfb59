"""What a curation run did: report.json (machine-readable) and summary.txt (for people).

Counts are documents, words (textstats.word_count, the token proxy: no tokenizer is chosen at
this stage) and UTF-8 bytes, per source in and out, and per stage removed (each read skip reason,
each rule in order, decontamination, exact and near dedup), with each stage's sub-reasons and the
first few removed examples (id and opening characters). A keep_top_fraction rule's removals
(after dedup) count under the rule, and `top_fraction` gives its documents in and out and the
cut score (topcut.py). Merging is addition, so per-file partial reports from any number of
workers combine into the same totals.
"""

from __future__ import annotations

import collections
import json
import os
from typing import Optional

from mai_jax.config import ConfigError

EXAMPLE_CHARS = 200


def _counts() -> dict:
  return {"docs": 0, "words": 0, "bytes": 0}


def _add_counts(total: dict, part: dict) -> None:
  for k in total:
    total[k] += part[k]


class Report:
  """Accumulates counts; `stage_order` fixes the order stages appear in."""

  def __init__(self, source_names, stage_order, examples_per_rule: int):
    self.sources = {n: {"in": _counts(), "out": _counts(), "skipped": collections.Counter()}
                    for n in source_names}
    self.stages = {s: {"removed": _counts(), "reasons": collections.Counter(), "examples": []}
                   for s in stage_order}
    self.rewritten = collections.Counter()
    self.examples_per_rule = examples_per_rule
    self.extra: dict = {}

  def doc_in(self, source: str, counts: dict) -> None:
    _add_counts(self.sources[source]["in"], counts)

  def doc_out(self, source: str, counts: dict) -> None:
    _add_counts(self.sources[source]["out"], counts)

  def skipped(self, source: str, reason: str) -> None:
    self.sources[source]["skipped"][reason] += 1
    self.stages["read"]["reasons"][reason] += 1
    self.stages["read"]["removed"]["docs"] += 1

  def removed(self, stage: str, reason: str, doc_id: str, text: str, counts: dict,
              detail: Optional[str] = None) -> None:
    entry = self.stages[stage]
    _add_counts(entry["removed"], counts)
    entry["reasons"][reason] += 1
    if len(entry["examples"]) < self.examples_per_rule:
      example = {"id": doc_id, "reason": reason, "text": text[:EXAMPLE_CHARS]}
      if detail:
        example["detail"] = detail
      entry["examples"].append(example)

  def merge(self, other: "Report") -> None:
    for name, s in other.sources.items():
      _add_counts(self.sources[name]["in"], s["in"])
      _add_counts(self.sources[name]["out"], s["out"])
      self.sources[name]["skipped"].update(s["skipped"])
    for stage, s in other.stages.items():
      mine = self.stages[stage]
      _add_counts(mine["removed"], s["removed"])
      mine["reasons"].update(s["reasons"])
      mine["examples"].extend(s["examples"][:self.examples_per_rule - len(mine["examples"])])
    self.rewritten.update(other.rewritten)

  @classmethod
  def from_json(cls, state: dict, examples_per_rule: int) -> "Report":
    """The inverse of to_json (engines that ship partial reports between processes as JSON)."""
    report = cls(list(state["sources"]), list(state["stages"]), examples_per_rule)
    for name, s in state["sources"].items():
      report.sources[name] = {"in": dict(s["in"]), "out": dict(s["out"]),
                              "skipped": collections.Counter(s["skipped"])}
    for name, s in state["stages"].items():
      report.stages[name] = {"removed": dict(s["removed"]),
                             "reasons": collections.Counter(s["reasons"]),
                             "examples": list(s["examples"])}
    report.rewritten = collections.Counter(state["rewritten_by_rule"])
    return report

  def worst_stage(self) -> tuple[str, int]:
    """(stage, documents) of the stage that removed the most documents."""
    return max(((s, v["removed"]["docs"]) for s, v in self.stages.items()), key=lambda x: x[1])

  def nothing_left(self, rule_names) -> ConfigError:
    """The error of a run that kept no document: the stage that removed the most, and the fix."""
    stage, count = self.worst_stage()
    total_in = sum(s["in"]["docs"] for s in self.sources.values())
    fix = f"loosen rules.{stage}" if stage in set(rule_names) else "check the input"
    reasons = sorted(self.stages[stage]["reasons"].items(), key=lambda rc: (-rc[1], rc[0]))
    return ConfigError(f"no documents left after curation: {stage!r} removed the most ({count} of "
                       f"{total_in} documents: {', '.join(f'{r} {c}' for r, c in reasons[:3])}); "
                       f"{fix}")

  def to_json(self) -> dict:
    return {
        "sources": {n: {"in": s["in"], "out": s["out"], "skipped": dict(sorted(s["skipped"].items()))}
                    for n, s in self.sources.items()},
        "stages": {n: {"removed": s["removed"], "reasons": dict(sorted(s["reasons"].items())),
                       "examples": s["examples"]} for n, s in self.stages.items()},
        "rewritten_by_rule": dict(sorted(self.rewritten.items())),
        **self.extra,
    }

  def summary(self) -> str:
    lines = ["source            docs in  docs out   words in  words out"]
    for name, s in self.sources.items():
      lines.append(f"{name:<16} {s['in']['docs']:>8} {s['out']['docs']:>9} "
                   f"{s['in']['words']:>10} {s['out']['words']:>10}")
    lines += ["", "stage               removed docs  removed words  top reasons"]
    for name, s in self.stages.items():
      top = ", ".join(f"{r} {c}" for r, c in sorted(s["reasons"].items(),
                                                     key=lambda rc: (-rc[1], rc[0]))[:3])
      lines.append(f"{name:<20} {s['removed']['docs']:>12} {s['removed']['words']:>14}  {top}")
    for key, value in self.extra.items():
      if isinstance(value, (int, float, str)):
        lines.append(f"{key}: {value}")
    for name, cut in self.extra.get("top_fraction", {}).items():
      best = "highest" if cut["higher_is_better"] else "lowest"
      lines.append(f"{name}: keep_top_fraction {cut['keep_top_fraction']} ({best} scores) of "
                   f"{cut['docs_in']} documents after dedup: {cut['docs_out']} kept, cut score "
                   f"{cut['cut_score']}")
    return "\n".join(lines) + "\n"

  def write(self, folder: str) -> None:
    with open(os.path.join(folder, "report.json"), "w", encoding="utf-8") as f:
      json.dump(self.to_json(), f, indent=2, ensure_ascii=False)
      f.write("\n")
    with open(os.path.join(folder, "summary.txt"), "w", encoding="utf-8") as f:
      f.write(self.summary())
