"""keep_top_fraction (mai_jax/data/curate/topcut.py, cluster_cut.py): the rank keys and both
engines' selections against Python's sorted(), a hand-computed corpus with ties through the local
engine and the Ray engine's functions (same survivors, bytes and report), and the config errors."""

import dataclasses
import random
from typing import ClassVar, Optional

import numpy as np
import pytest

from test_curate import _cluster_stages_curate, _good_doc, _output, _write_jsonl

from mai_jax.config import ConfigError
from mai_jax.data.curate import pipeline, settings, topcut
from mai_jax.data.curate.rules import KEEP


def test_keys_rank_best_first_with_one_nan_last_and_no_negative_zero():
  scores = np.array([1.0, -0.0, 0.0, np.nan, np.inf, -np.inf, -2.5, -np.nan], np.float32)
  high = topcut.score_keys(scores, higher_is_better=True)
  # best first: inf, 1, (-0 = 0), -2.5, -inf, then both NaNs
  assert np.argsort(high, kind="stable").tolist() == [4, 0, 1, 2, 6, 5, 3, 7]
  assert high[1] == high[2] and high[3] == high[7]
  low = topcut.score_keys(scores, higher_is_better=False)
  assert np.argsort(low, kind="stable").tolist() == [5, 6, 1, 2, 0, 4, 3, 7]
  for i in (0, 2, 4, 5, 6):
    for higher, keys in ((True, high), (False, low)):
      assert topcut.key_score(int(keys[i]), higher) == float(scores[i])
  assert str(topcut.key_score(int(high[1]), True)) == "0.0"   # -0.0 reads back as 0.0
  assert topcut.show(np.float32(0.1)) == "0.1" and topcut.show(3.0) == "3.0"
  assert [topcut.keep_count(f, n) for f, n in ((0.45, 10), (0.25, 10), (0.1, 4), (1.0, 7),
                                               (0.1, 25))] == [5, 3, 0, 7, 3]  # halves up


def _reference_keep(scores, alive, k, higher):
  """The k best alive positions by Python's sort: score (NaN last), then position."""
  def rank(i):
    s = float(scores[i])
    return (np.isnan(s), -s if higher else s, i)
  return set(sorted((i for i in range(len(scores)) if alive[i]), key=rank)[:k])


@pytest.mark.parametrize("higher", [True, False])
def test_local_sort_and_radix_cut_keep_the_same_k_as_python_sorted(higher):
  rng = np.random.default_rng(3)
  n = 300
  scores = rng.choice(np.array([0.25, 0.5, 0.5001, -1.0, 7.0, np.nan], np.float32), n)  # ties
  scores[:40] = rng.normal(size=40).astype(np.float32)
  alive = rng.random(n) < 0.8
  keys = topcut.score_keys(scores, higher)
  docs = 1000 + np.arange(n)  # priority numbers after 1000 earlier documents

  def histogram(shift, prefix, tie):
    chosen = keys[alive] if tie is None else docs[alive][keys[alive] == tie].astype(np.uint64)
    return topcut.digit_counts(chosen, shift, prefix)
  for k in (1, 2, 37, 150, int(alive.sum()) - 1, int(alive.sum())):
    want = _reference_keep(scores, alive, k, higher)
    assert set(np.nonzero(topcut.local_keep(keys, alive, k))[0]) == want
    cut = topcut.select_cut(histogram, k, int(docs[-1] + 1).bit_length())
    assert set(np.nonzero(alive & topcut.kept_by_cut(keys, docs, cut))[0]) == want, k


@dataclasses.dataclass(frozen=True)
class _DeclaredScore:
  """A scoring rule whose score is the number the text starts with (hand-computed cases)."""
  name: ClassVar[str] = "declared"
  keep_top_fraction: Optional[float] = None
  higher_is_better: ClassVar[bool] = True

  def rank_score(self, doc):
    return float(doc.text.split()[1])

  def apply(self, doc):
    return KEEP


@dataclasses.dataclass(frozen=True)
class _DeclaredLow(_DeclaredScore):
  """The same score, lower first (as perplexity)."""
  name: ClassVar[str] = "declared_low"
  higher_is_better: ClassVar[bool] = False


# (id, score) in priority order; b/b0.jsonl:1 is an exact copy of a.jsonl:2 (dedup removes it
# first, so the fraction is of 10 documents, not 11).
_CORPUS = {"a.jsonl": [5, 3, 9, 3, 7], "b/b0.jsonl": [3, "copy", 1, 3], "b/b1.jsonl": [8, 3]}


@pytest.fixture(scope="module")
def declared(tmp_path_factory):
  root = tmp_path_factory.mktemp("declared")
  (root / "b").mkdir()
  texts, seed = {}, 0
  for name, scores in _CORPUS.items():
    rows = []
    for score in scores:
      seed += 1
      rows.append(texts["a.jsonl:2"] if score == "copy" else f"Score {score} " + _good_doc(seed))
    texts.update({f"{name}:{i}": t for i, t in enumerate(rows)})
    _write_jsonl(root / name, [{"text": t} for t in rows])
  cfg = settings.parse({"sources": [{"name": "a", "path": "a.jsonl"},
                                    {"name": "b", "path": "b"}],
                        "rules": {}, "decontamination": {"enabled": False},
                        "output": {"shard_docs": 2, "examples_per_rule": 2}}, "t.toml",
                       str(root))
  return root, cfg


@pytest.mark.parametrize("fraction, kept, cut", [
    # 9, 8, 7, 5 and the first of the five 3s: the tie split by priority order
    (0.45, ["a/a.jsonl:0", "a/a.jsonl:1", "a/a.jsonl:2", "a/a.jsonl:4", "b/b1.jsonl:0"], 3.0),
    # 9, 8, 7, 5: the cut falls between scores
    (0.4, ["a/a.jsonl:0", "a/a.jsonl:2", "a/a.jsonl:4", "b/b1.jsonl:0"], 5.0)])
def test_hand_corpus_survivors_report_and_both_engines(declared, tmp_path, fraction, kept, cut):
  _, cfg = declared
  cfg = dataclasses.replace(cfg, rules=(_DeclaredScore(keep_top_fraction=fraction),))
  report, rows = _both_engines(cfg, tmp_path)
  assert [r["id"] for r in rows] == kept
  assert report["top_fraction"] == {"declared": {
      "keep_top_fraction": fraction, "higher_is_better": True, "docs_in": 10,
      "docs_out": len(kept), "cut_score": cut}}
  stage = report["stages"]["declared"]
  assert stage["removed"]["docs"] == 10 - len(kept)
  assert stage["reasons"] == {topcut.REASON: 10 - len(kept)}
  first = [e["id"] for e in stage["examples"]]
  assert first == (["a/a.jsonl:3", "b/b0.jsonl:0"] if cut == 3.0 else
                   ["a/a.jsonl:1", "a/a.jsonl:3"])
  assert stage["examples"][0]["detail"] == f"score 3.0, cut {cut}"
  assert report["stages"]["exact_dedup"]["reasons"] == {"duplicate": 1}
  assert report["sources"]["a"]["out"]["docs"] + report["sources"]["b"]["out"]["docs"] == len(kept)
  summary = (tmp_path / "out" / "summary.txt").read_text()
  assert f"declared: keep_top_fraction {fraction} (highest scores) of 10 documents after dedup: " \
         f"{len(kept)} kept, cut score {cut}" in summary
  with np.load(tmp_path / "ray" / "stage" / "000001.npz") as z:  # b/b0.jsonl, staged per file
    assert z["scores"].tolist() == [[3.0], [9.0], [1.0], [3.0]]


def _both_engines(cfg, tmp_path):
  """The local engine's (report, output rows); the Ray engine's functions (histograms, radix
  cut, removed.npz: cluster_cut) on their own staged files must give the same bytes and report."""
  report = pipeline.curate(cfg, str(tmp_path / "out"), log=lambda m: None)
  got, names, _, _ = _cluster_stages_curate(cfg, tmp_path / "ray", [])
  assert names == sorted(p.name for p in (tmp_path / "out" / "data").iterdir())
  for name in names:
    assert (tmp_path / "ray" / "data" / name).read_bytes() == \
        (tmp_path / "out" / "data" / name).read_bytes()
  assert (tmp_path / "ray" / "signatures.npz").read_bytes() == \
      (tmp_path / "out" / "signatures.npz").read_bytes()
  for key in ("sources", "stages", "top_fraction"):
    assert got[key] == report[key], key
  return report, _output(tmp_path / "out")


def test_two_cuts_run_in_config_order_each_over_what_the_last_kept(declared, tmp_path):
  _, cfg = declared
  # highest half of 10: 9, 8, 7, 5, 3 (a.jsonl:1); then the lowest 0.4 of those 5: 3, 5
  cfg = dataclasses.replace(cfg, rules=(_DeclaredScore(keep_top_fraction=0.5),
                                        _DeclaredLow(keep_top_fraction=0.4)))
  report, rows = _both_engines(cfg, tmp_path)
  assert [r["id"] for r in rows] == ["a/a.jsonl:0", "a/a.jsonl:1"]
  cuts = report["top_fraction"]
  assert [(c["docs_in"], c["docs_out"], c["cut_score"]) for c in cuts.values()] == \
      [(10, 5, 3.0), (5, 2, 5.0)]
  example = report["stages"]["declared_low"]["examples"][0]
  assert (example["id"], example["detail"]) == ("a/a.jsonl:2", "score 9.0, cut 5.0")
  assert example["text"].startswith("Score 9 ")
  assert report["stages"]["declared"]["removed"]["docs"] == 5
  assert report["stages"]["declared_low"]["removed"]["docs"] == 3


def test_a_fraction_that_keeps_nothing_is_the_empty_result_error(declared, tmp_path):
  _, cfg = declared
  cfg = dataclasses.replace(cfg, rules=(_DeclaredScore(keep_top_fraction=0.01),))
  with pytest.raises(ConfigError, match="'declared' removed the most .10 of 11"):
    pipeline.curate(cfg, str(tmp_path / "out"), log=lambda m: None)
  assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("rule, params, message", [
    ("quality_classifier", {"keep_top_fraction": 0.1, "threshold": 0.5},
     "rules.quality_classifier: keep_top_fraction=0.1 and threshold=0.5: set one of them"),
    ("quality_classifier", {"keep_top_fraction": 0},
     r"rules.quality_classifier: keep_top_fraction=0.0 must be in \(0, 1\]"),
    ("quality_classifier", {"keep_top_fraction": 1.5},
     r"rules.quality_classifier: keep_top_fraction=1.5 must be in \(0, 1\]"),
    ("perplexity", {"keep_top_fraction": 0.5, "max_perplexity": 300},
     "rules.perplexity: keep_top_fraction=0.5 and max_perplexity=300.0: set one of them")])
def test_invalid_keep_top_fraction_is_one_line_naming_the_key(tmp_path, rule, params, message):
  from mai_jax import curate_perplexity
  settings.register_rule(curate_perplexity.Perplexity)
  extra = {"workdir": str(tmp_path)} if rule == "perplexity" else {
      "positives": ["missing.jsonl"], "negatives": ["missing.jsonl"]}  # checked before reading
  with pytest.raises(ConfigError, match=message) as e:
    settings.parse({"sources": [{"name": "s", "path": "x"}], "rules": {rule: {**params, **extra}}},
                   "c.toml", str(tmp_path))
  assert "\n" not in str(e.value)


def test_quality_classifier_keep_top_fraction_keeps_the_best_scored(tmp_path):
  rng = random.Random(1)
  spam_words = "click buy deal offer free win now cheap sale discount best price order".split()
  spam = [" ".join(rng.choice(spam_words) for _ in range(60)) + "." for _ in range(30)]
  good = [_good_doc(i, 4) for i in range(300, 330)]
  _write_jsonl(tmp_path / "pos.jsonl", [{"text": t} for t in good[:20]])
  _write_jsonl(tmp_path / "neg.jsonl", [{"text": t} for t in spam[:20]])
  web = good[20:26] + spam[20:26]
  _write_jsonl(tmp_path / "web.jsonl", [{"text": t} for t in web])
  cfg = settings.parse({"sources": [{"name": "web", "path": "web.jsonl"}],
                        "rules": {"quality_classifier": {"positives": ["pos.jsonl"],
                                                         "negatives": ["neg.jsonl"],
                                                         "keep_top_fraction": 0.25}},
                        "decontamination": {"enabled": False}}, "q.toml", str(tmp_path))
  rule = cfg.rules[0]
  assert rule.threshold is None
  report = pipeline.curate(cfg, str(tmp_path / "out"), log=lambda m: None)
  scores = np.array([rule.score(t) for t in web], np.float32)
  want = sorted(range(len(web)), key=lambda i: (-scores[i], i))[:3]  # round(0.25 x 12)
  rows = _output(tmp_path / "out")
  assert [r["id"] for r in rows] == [f"web/web.jsonl:{i}" for i in sorted(want)]
  assert report["top_fraction"]["quality_classifier"]["cut_score"] == \
      pytest.approx(float(scores[want[-1]]), rel=1e-6)
  assert all(r["meta"]["quality_score"] >= scores[want[-1]] - 1e-6 for r in rows)
