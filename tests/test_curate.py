"""Data curation (mai_jax/data/curate): each rule on hand-computed cases, MinHash LSH against the
S-curve, and a messy corpus that must come out with exactly the expected survivors."""

import io
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("rensa")
pytest.importorskip("py3langid")

from mai_jax.config import ConfigError  # noqa: E402
from mai_jax.data.curate import (dedup, decontam, docfilter, langid, minhash, pipeline,  # noqa: E402
                                 quality, rules, settings, topcut)
from mai_jax.data.curate.textstats import DocText  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Common English words, so generated sentences read as English to the language identifier.
_VOCAB = ("the people who live in this small town have always said that the river is the "
          "heart of their community and many families walk along its banks every evening "
          "children play near old trees while parents talk about work school weather food "
          "to of with the and the history music books gardens markets bridges roads farms houses schools libraries "
          "teachers doctors farmers students writers painters builders workers neighbours "
          "friends visitors travellers morning afternoon summer winter spring autumn light "
          "water stone wood bread apples fish milk tea coffee letters stories songs games").split()


def _sentence(rng) -> str:
  words = [rng.choice(_VOCAB) for _ in range(rng.randint(9, 14))]
  return " ".join(words).capitalize() + "."


def _good_doc(seed: int, sentences: int = 12) -> str:
  rng = random.Random(seed)
  lines = [" ".join(_sentence(rng) for _ in range(2)) for _ in range(sentences // 2)]
  return "\n".join(lines)


def _shingle_set(text: str, n: int = 5) -> set:
  words = [w for w in "".join(c if c.isalnum() else " " for c in text.lower()).split()]
  return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def _jaccard(a: str, b: str) -> float:
  sa, sb = _shingle_set(a), _shingle_set(b)
  return len(sa & sb) / len(sa | sb)


# ------------------------------------------------------------------------------------------------
# Rules on hand-computed cases


def _apply(rule, text):
  return rule.apply(DocText(text))


def test_gopher_quality_each_check():
  rule = rules.GopherQuality()
  base = ("the cat sat with a dog and the bird " * 6).strip()  # 54 words, mean length 3.0
  assert _apply(rule, base) == rules.KEEP
  assert _apply(rule, " ".join(base.split()[:49]))[0] == "gopher_short_doc"   # 49 < 50
  assert _apply(rule, " ".join(["ab"] * 60) + " the and")[0] == "gopher_below_avg_word_length"
  assert _apply(rules.GopherQuality(min_avg_word_length=False), " ".join(["ab"] * 60)
                + " the")[0] == "gopher_enough_stop_words"  # 1 distinct stop word < 2
  # 54 words + 6 '#' tokens = 60 words: 6/60 = 0.1 is not > 0.1; 7 '#' of 61 is.
  assert _apply(rule, base + " #" * 6) == rules.KEEP
  assert _apply(rule, base + " #" * 7)[0] == "gopher_too_many_hashes"
  bullets = "\n".join(f"- {line}" for line in [base] * 10)  # 10/10 lines > 0.9
  assert _apply(rule, bullets)[0] == "gopher_too_many_bullets"
  no_stop = ("cat sat dog bird tree " * 12).strip()  # no stop word
  assert _apply(rule, no_stop)[0] == "gopher_enough_stop_words"


def test_gopher_quality_stop_words_are_case_sensitive_and_counted_distinct():
  rule = rules.GopherQuality(min_doc_words=1)
  assert _apply(rule, "The cat and the dog") == rules.KEEP  # {'and','the'}: 2
  assert _apply(rule, "The cat and dog")[0] == "gopher_enough_stop_words"  # {'and'}: 1


def test_gopher_repetition_hand_counts():
  rule = rules.GopherRepetition(dup_line_char_frac=False, top_n_grams=(), dup_n_grams=())
  # 10 lines; a line's repeats are its occurrences after the first: 3/10 = 0.3 is not > 0.3.
  unique = [f"line number {i} says something" for i in range(7)]
  assert _apply(rule, "\n".join(unique[:6] + ["x y z"] * 4)) == rules.KEEP
  assert _apply(rule, "\n".join(unique[:5] + ["x y z"] * 5))[0] == "dup_line_frac"  # 4/10
  # characters: 2 repeated lines of 20 chars in a text of 83 chars: 40/83 > 0.2
  line = "a" * 20
  text = "\n".join(["b" * 20, line, line, line])
  assert len(text) == 83 and _apply(rules.GopherRepetition(dup_line_frac=False, dup_para_frac=False,
                                                           dup_para_char_frac=False), text)[0] \
      == "dup_line_char_frac"
  # top 2-gram: 'buy now' 10 times = 70 chars over len(text)
  spam = "buy now " * 10 + "please read the rest of this long sentence about other things today"
  assert _apply(rules.GopherRepetition(dup_n_grams=()), spam)[0] == "top_2_gram"


def test_duplicated_ngram_chars_definition():
  # words a b c d e a b c d e f: the second 'abcde' (5 chars) repeats, counted once, skip past.
  assert rules._duplicated_ngram_chars(DocText("a b c d e a b c d e f"), 5) == 5  # pylint: disable=protected-access
  # overlapping repeats: 'a a a a a a a' has 5-grams at 0,1,2: the one at 1 repeats, skip to 6.
  assert rules._duplicated_ngram_chars(DocText("a a a a a a a"), 5) == 5  # pylint: disable=protected-access
  assert rules._top_ngram_chars(DocText("a b a b a"), 2) == 3 * 2  # 'a b' x2  # pylint: disable=protected-access
  # 'a bb' and 'bb cc' both twice: the first seen wins (Counter.most_common), 4 chars x 2
  assert rules._top_ngram_chars(DocText("a bb cc a bb cc"), 2) == 4 * 2  # pylint: disable=protected-access


def _reference_top(words, n):  # datatrove's definitions, on strings
  import collections
  gram, count = collections.Counter(" ".join(words[i:i + n])
                                    for i in range(len(words) - n + 1)).most_common(1)[0]
  return len(gram) * count


def _reference_dup(words, n):
  seen, chars, i = set(), 0, 0
  while i < len(words) - n + 1:
    gram = "".join(words[i:i + n])
    if gram in seen:
      chars, i = chars + len(gram), i + n
    else:
      seen.add(gram)
      i += 1
  return chars


def test_vectorized_ngram_counts_match_the_string_definitions():
  rng = random.Random(0)
  for trial in range(200):
    vocab = ["aa", "bb", "cc", "dd"][:rng.randint(1, 4)]  # equal lengths: no 'ab c' = 'a bc'
    words = [rng.choice(vocab) for _ in range(rng.randint(10, 60))]
    doc = DocText(" ".join(words))
    for n in (2, 3, 4):
      assert rules._top_ngram_chars(doc, n) == _reference_top(words, n), (trial, n)  # pylint: disable=protected-access
    for n in range(5, 11):
      assert rules._duplicated_ngram_chars(doc, n) == _reference_dup(words, n), (trial, n)  # pylint: disable=protected-access


def test_c4_lines_and_pages():
  rule = rules.C4Quality()
  good = [f"This is sentence number {i} of the page." for i in range(5)]
  text = "\n".join(good + ["Menu", "Enable JavaScript to see this page.",
                           "We use cookies to improve the site.", "A line that never ends"])
  reason, new_text = _apply(rule, text)
  assert reason is None and new_text == "\n".join(good)
  assert _apply(rule, "\n".join(good[:4]))[0] == "too_few_sentences"  # 4 < 5
  assert _apply(rule, "\n".join(good + ["Lorem ipsum dolor sit amet."]))[0] == "lorem_ipsum"
  assert _apply(rule, "\n".join(good + ["Use x = {1: 2} here."]))[0] == "curly_bracket"
  assert _apply(rule, "Wiki text here[1]. And more text here[citation needed].\n" * 5)[1] == \
      "\n".join(["Wiki text here. And more text here."] * 5)
  assert _apply(rules.C4Quality(rewrite_lines=False), text) == rules.KEEP


def test_c4_bad_words_needs_a_list_and_matches_whole_words():
  with pytest.raises(ValueError, match="words_file"):
    rules.C4BadWords()
  rule = rules.C4BadWords(words=("darn",))
  assert _apply(rule, "Well DARN it.")[0] == "bad_words"
  assert _apply(rule, "The darning needle.") == rules.KEEP


def test_fineweb_hand_counts():
  rule = rules.FineWebQuality()
  long_line = "this line is long enough to count as a real line of text"
  # 1 of 9 lines ends in punctuation: 0.111 < 0.12
  text = "\n".join([long_line + f" {i}" for i in range(8)] + [long_line + "."])
  assert _apply(rule, text)[0] == "line_punct_ratio"
  # 7 of 10 lines <= 30 chars: 0.7 > 0.67
  short = "\n".join([f"short line {i}." for i in range(7)] + [long_line + "."] * 0
                    + [long_line + f" {i}." for i in range(3)])
  assert _apply(rule, short)[0] == "short_line_ratio"
  dup = "\n".join([long_line + f" {i}." for i in range(20)] + [long_line + " 0."])
  assert _apply(rule, dup)[0] == "char_dup_ratio"  # 60 of 1241 chars > 0.01
  assert _apply(rule, "\n".join(long_line + f" {i}." for i in range(20))) == rules.KEEP


def test_language_identifies_english_and_german():
  english = _good_doc(0)
  german = ("Die Leute in dieser kleinen Stadt sagen immer, dass der Fluss das Herz ihrer "
            "Gemeinschaft ist, und viele Familien gehen jeden Abend an seinen Ufern spazieren.")
  assert langid.classify(english)[0] == "en"
  assert langid.classify(german)[0] == "de"
  assert _apply(langid.Language(), german)[0] == "lang_de"
  assert _apply(langid.Language(languages=("de",)), german) == rules.KEEP


def test_quality_features_and_one_sgd_step_by_hand():
  import zlib
  index, values = quality.features("A b a", 1 << 10)
  counts = {}
  for g in ["a", "b", "a", "a b", "b a"]:
    slot = zlib.crc32(g.encode()) % (1 << 10)
    counts[slot] = counts.get(slot, 0) + 1
  expected = np.log1p(np.array([counts[k] for k in sorted(counts)], np.float32))
  assert index.tolist() == sorted(counts)
  np.testing.assert_allclose(values, expected / np.linalg.norm(expected), rtol=1e-6)
  # one positive document, one step from zero: w = -lr * (sigmoid(0) - 1) * x = lr/2 * x
  w_B, bias = quality.train(["A b a"], [], buckets=1 << 10, epochs=1, lr=0.4, l2=0.0, seed=0)
  np.testing.assert_allclose(w_B[index], 0.2 * values, rtol=1e-6)
  assert bias == pytest.approx(0.2) and np.count_nonzero(w_B) == len(index)


def _jsonl_texts(path, texts):
  _write_jsonl(path, [{"text": t} for t in texts])
  return str(path)


def test_quality_classifier_separates_and_scores_into_meta(tmp_path):
  textbook = [_good_doc(i, 4) for i in range(200, 260)]
  rng = random.Random(1)
  spam_words = "click buy deal offer free win now cheap sale discount best price order".split()
  spam = [" ".join(rng.choice(spam_words) for _ in range(60)) + "." for _ in range(60)]
  pos = _jsonl_texts(tmp_path / "pos.jsonl", textbook[:40])
  neg = _jsonl_texts(tmp_path / "neg.jsonl", spam[:40])
  rule = quality.QualityClassifier(positives=(pos,), negatives=(neg,))
  held_out_pos = [rule.score(t) for t in textbook[40:]]
  held_out_neg = [rule.score(t) for t in spam[40:]]
  assert min(held_out_pos) > 0.9 and max(held_out_neg) < 0.1, (held_out_pos, held_out_neg)
  again = quality.QualityClassifier(positives=(pos,), negatives=(neg,))
  assert again.score(spam[50]) == rule.score(spam[50])  # seeded: same weights
  _jsonl_texts(tmp_path / "web.jsonl", textbook[40:45] + spam[40:45])
  cfg = settings.parse({"sources": [{"name": "web", "path": "web.jsonl"}],
                        "rules": {"quality_classifier": {"positives": ["pos.jsonl"],
                                                         "negatives": ["neg.jsonl"]}}},
                       "q.toml", str(tmp_path))
  report = pipeline.curate(cfg, str(tmp_path / "out"), log=lambda m: None)
  rows = _output(tmp_path / "out")
  assert [r["id"] for r in rows] == [f"web/web.jsonl:{i}" for i in range(5)]
  assert all(r["meta"]["quality_score"] > 0.9 for r in rows)
  assert report["stages"]["quality_classifier"]["reasons"] == {"below_threshold": 5}
  with pytest.raises(ConfigError, match="needs documents in both `positives`"):
    settings.parse({"sources": [{"name": "s", "path": "x"}],
                    "rules": {"quality_classifier": {"positives": [pos]}}}, "c")


# ------------------------------------------------------------------------------------------------
# MinHash, LSH and union-find


def test_lsh_candidate_rate_follows_the_s_curve():
  """Pairs of token sets with exact Jaccard s become LSH candidates at 1-(1-s^8)^14, within 5
  binomial standard deviations (fixed tokens and seed: the outcome is fixed, not random)."""
  pairs, union = 400, 100
  for s in (0.5, 0.7, 0.8, 0.9):
    shared = round(s * union)
    only = (union - shared) // 2  # each set's own tokens: |A u B| = shared + 2 * only = union
    sets_a, sets_b = [], []
    for p in range(pairs):
      tokens = [f"p{p}t{i}" for i in range(union)]
      sets_a.append(tokens[:shared] + tokens[shared:shared + only])
      sets_b.append(tokens[:shared] + tokens[shared + only:])
    a, b = set(sets_a[-1]), set(sets_b[-1])
    assert len(a & b) / len(a | b) == s
    sig_a = minhash.set_signatures(sets_a, 112, 1)
    sig_b = minhash.set_signatures(sets_b, 112, 1)
    hits = np.zeros(pairs, bool)
    for b in range(14):
      hits |= np.all(sig_a[:, b * 8:(b + 1) * 8] == sig_b[:, b * 8:(b + 1) * 8], axis=1)
    expected = minhash.candidate_probability(shared / union, 14, 8)
    sd = np.sqrt(expected * (1 - expected) / pairs)
    assert abs(hits.mean() - expected) <= 5 * sd + 1e-9, (s, hits.mean(), expected)
    assert abs(np.mean(sig_a == sig_b) - shared / union) < 0.02  # the Jaccard estimate


def test_union_find_root_is_smallest_member_whatever_the_order():
  for order in ([(3, 4), (4, 1), (5, 6)], [(5, 6), (1, 4), (4, 3)]):
    uf = dedup.UnionFind(7)
    for a, b in order:
      uf.union(a, b)
    assert [uf.find(i) for i in range(7)] == [0, 1, 2, 1, 1, 5, 5]


def test_decontam_matches_ngrams_and_whole_short_items(tmp_path):
  evals = tmp_path / "eval.jsonl"
  item = "what is the capital city of the country that lies north of spain and west of germany"
  evals.write_text(json.dumps({"question": item}) + "\n"
                   + json.dumps({"question": "two plus two is four , said ten people"}) + "\n"
                   + json.dumps({"question": "too short"}) + "\n")
  index = decontam.build_index([str(evals)], "", ngram=13, min_tokens=8)
  assert index.items == 3 and index.skipped_short == 1
  leak = "Quiz. Is the capital city of the country that lies north of Spain? Paris."
  assert index.match(leak) is None  # only 12 tokens of the item in a row
  assert index.match("Q: What is the capital city of the country that lies north of spain and "
                     "west ...")[0] == "eval.jsonl:0"
  assert index.match("Two plus two is four, said ten people.")[0] == "eval.jsonl:1"
  assert index.match("too short") is None


# ------------------------------------------------------------------------------------------------
# The messy corpus, end to end


def _write_jsonl(path, rows):
  with open(path, "wb") as f:
    for row in rows:
      f.write(row if isinstance(row, bytes) else (json.dumps(row) + "\n").encode())


BRACKET_ITEM = json.loads(open(os.path.join(REPO, "mai_jax/tasks/python_brackets.jsonl")).readlines()[-2])


@pytest.fixture(scope="module")
def messy(tmp_path_factory):
  """The corpus, its config, and the expected fate of every document."""
  root = tmp_path_factory.mktemp("messy")
  good = {i: _good_doc(i) for i in range(10)}
  near = good[2].split(" ")
  for k in (40, 80):
    near[k] = "bridges"
  near = " ".join(near)
  half = "\n".join(good[3].split("\n")[:3] + good[9].split("\n")[3:])
  eval_item = ("the lighthouse keeper counted forty two ships passing the northern rocks during "
               "one stormy night in march")
  web = [
      {"text": good[0], "url": "a"}, {"text": good[1]}, {"text": good[2]},
      {"text": "  " + good[1].replace(" ", "  ").replace(".", " !") + " "},  # exact dup of 1
      {"text": near},                                                        # near dup of 2
      {"text": half},                                                        # J~0.3 with 3, 9
      {"text": "Buy the best cheap pills now and get them with free delivery today.\n" * 20},
      {"text": "Share this page with your friends.\nClick here to read the rest of the story.\n"
               "Subscribe to our newsletter for the latest news and offers.\n" * 6},
      {"text": ("Die Leute in dieser kleinen Stadt sagen immer, dass der Fluss das Herz ihrer "
                "Gemeinschaft ist. ") * 6},                                  # German
      {"text": good[4] + "\nWe use cookies to improve your experience on this site."},
      {"text": good[5] + "\nThe notes say " + BRACKET_ITEM["context"]
               + BRACKET_ITEM["choices"][BRACKET_ITEM["answer"]] + " is how it works."},
      {"text": good[6] + "\nOur notes say " + eval_item + " and no more."},  # user eval leak
      b'{"text": "caf\xe9 invalid utf-8"}\n',
      b'{"text": "nul \\u0000 is fine in JSON but this is \x00 binary"}\n',
      b'{"text": not json}\n',
      {"no_text": "x"},
      {"text": good[7]},                                                     # dup of synthetic
  ]
  synthetic = [{"text": good[7], "generator": "mai-1-tiny", "prompt_id": "p7", "seed": 7},
               {"text": good[8], "generator": "mai-1-tiny", "prompt_id": "p8", "seed": 8}]
  (root / "web").mkdir()
  _write_jsonl(root / "web" / "part0.jsonl", web[:9])
  _write_jsonl(root / "web" / "part1.jsonl", web[9:])
  _write_jsonl(root / "synthetic.jsonl", synthetic)
  _write_jsonl(root / "evals.jsonl", [{"question": eval_item}])
  config = root / "curate.toml"
  config.write_text(f'''
workers = 1
[[sources]]
name = "synthetic"
path = "{root / 'synthetic.jsonl'}"
[[sources]]
name = "web"
path = "{root / 'web'}"
[rules.language]
[rules.gopher_repetition]
[rules.gopher_quality]
[rules.c4]
[rules.fineweb]
[decontamination]
files = ["{root / 'evals.jsonl'}"]
[output]
examples_per_rule = 100
shard_docs = 4
''')
  expected_kept = {"synthetic/synthetic.jsonl:0", "synthetic/synthetic.jsonl:1",
                   "web/part0.jsonl:0", "web/part0.jsonl:1", "web/part0.jsonl:2",
                   "web/part0.jsonl:5", "web/part1.jsonl:0"}
  expected_removed = {
      "web/part0.jsonl:3": "exact_dedup", "web/part0.jsonl:4": "near_dedup",
      "web/part0.jsonl:6": "gopher_repetition", "web/part0.jsonl:7": "gopher_repetition",
      "web/part0.jsonl:8": "language", "web/part1.jsonl:1": "decontamination",
      "web/part1.jsonl:2": "decontamination", "web/part1.jsonl:7": "exact_dedup"}
  jaccards = {"near": _jaccard(near, good[2]), "half3": _jaccard(half, good[3]),
              "half9": _jaccard(half, good[9])}
  return dict(root=root, config=str(config), kept=expected_kept, removed=expected_removed,
              jaccards=jaccards, good=good)


@pytest.fixture(scope="module")
def curated(messy):
  out = messy["root"] / "out"
  report = pipeline.curate(settings.load(messy["config"]), str(out), log=lambda m: None)
  return out, report


def _output(out):
  rows = []
  for name in sorted(os.listdir(out / "data")):
    rows += [json.loads(line) for line in open(out / "data" / name)]
  return rows


def test_messy_corpus_exact_survivors(messy, curated):
  out, report = curated
  j = messy["jaccards"]
  assert j["near"] > 0.85 and j["half3"] < 0.4 and j["half9"] < 0.4, j
  rows = _output(out)
  assert {r["id"] for r in rows} == messy["kept"]
  assert [r["id"] for r in rows] == sorted(messy["kept"], key=lambda i: (not i.startswith("syn"), i))
  removed = {ex["id"]: stage for stage, s in report["stages"].items() for ex in s["examples"]}
  assert removed == messy["removed"]
  assert report["sources"]["web"]["skipped"] == {"binary": 1, "invalid JSON": 1,
                                                 "invalid UTF-8": 1, "no text field": 1}
  assert report["stages"]["exact_dedup"]["examples"][1]["detail"] == \
      "kept synthetic/synthetic.jsonl:0"   # across sources: the earlier source survives
  assert report["duplicate_clusters_exact"] == 2 and report["duplicate_clusters_near"] == 1


def test_messy_corpus_provenance_rewrites_and_files(messy, curated):
  out, report = curated
  rows = {r["id"]: r for r in _output(out)}
  assert rows["synthetic/synthetic.jsonl:1"]["meta"] == {"generator": "mai-1-tiny",
                                                          "prompt_id": "p8", "seed": 8}
  assert rows["web/part0.jsonl:0"]["meta"] == {"url": "a"}
  assert rows["web/part1.jsonl:0"]["text"] == messy["good"][4]  # cookie line dropped by C4
  # C4 rewrote the cookie page, the bracket leak ('[1]' citation) and the spaced exact copy.
  assert report["rewritten_by_rule"] == {"c4": 3}
  assert sorted(os.listdir(out)) == ["data", "report.json", "signatures.npz", "summary.txt"]
  assert sorted(os.listdir(out / "data")) == ["part-00000.jsonl", "part-00001.jsonl"]
  assert "gopher_repetition" in (out / "summary.txt").read_text()
  web = report["sources"]["web"]
  assert web["in"]["docs"] == 17 and web["out"]["docs"] == 5
  assert not [p for p in os.listdir(messy["root"]) if ".partial" in p]


def test_signatures_dedup_a_later_corpus(messy, curated, tmp_path):
  out, _ = curated
  later = tmp_path / "later.jsonl"
  _write_jsonl(later, [{"text": messy["good"][0]}, {"text": _good_doc(100)}])
  cfg = settings.parse({"sources": [{"name": "later", "path": str(later)}],
                        "dedup": {"against": [str(out / "signatures.npz")]}}, "t.toml")
  report = pipeline.curate(cfg, str(tmp_path / "out2"), log=lambda m: None)
  assert [r["id"] for r in _output(tmp_path / "out2")] == ["later/later.jsonl:1"]
  assert report["stages"]["exact_dedup"]["examples"][0]["detail"] == "kept prior:web/part0.jsonl:0"


def test_cli_two_workers_same_bytes_and_tokenize_reads_it(messy, curated, tmp_path):
  out, _ = curated
  out2 = tmp_path / "out_cli"
  proc = subprocess.run([sys.executable, "-m", "mai_jax", "data", "curate", "--config",
                         messy["config"], "--out", str(out2), "--workers", "2",
                         "--no-progress"], cwd=REPO,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert "--config.data.sources=" in proc.stdout
  for name in ("part-00000.jsonl", "part-00001.jsonl"):
    assert (out / "data" / name).read_bytes() == (out2 / "data" / name).read_bytes()
  assert (out / "report.json").read_bytes() == (out2 / "report.json").read_bytes()
  from mai_jax.data import readers  # what `data tokenize` reads a jsonl source with
  docs = [d for rel in ("part-00000.jsonl", "part-00001.jsonl")
          for d in readers.read_file_documents("jsonl", "text", str(out2 / "data"), rel)]
  assert len(docs) == 7 and all(text for _, text, _ in docs)


def test_interrupted_run_resumes_file_by_file(messy, curated, tmp_path, monkeypatch):
  out, _ = curated
  real, calls = docfilter.filter_file, []

  def crash_on_third(cfg, index, job):
    if job.number == 2:
      raise KeyboardInterrupt
    return real(cfg, index, job)
  monkeypatch.setattr(docfilter, "filter_file", crash_on_third)
  with pytest.raises(KeyboardInterrupt):
    pipeline.curate(settings.load(messy["config"]), str(tmp_path / "out"), log=lambda m: None)
  assert sorted(os.listdir(tmp_path)) == ["out.partial"]
  assert sorted(n for n in os.listdir(tmp_path / "out.partial" / "stage")
                if n.endswith(".report.json")) == ["000000.report.json", "000001.report.json"]

  def count(cfg, index, job):
    calls.append(job.number)
    return real(cfg, index, job)
  monkeypatch.setattr(docfilter, "filter_file", count)
  pipeline.curate(settings.load(messy["config"]), str(tmp_path / "out"), log=lambda m: None)
  assert calls == [2]
  for name in ("data/part-00000.jsonl", "data/part-00001.jsonl", "report.json", "signatures.npz"):
    assert (out / name).read_bytes() == (tmp_path / "out" / name).read_bytes(), name
  assert sorted(os.listdir(tmp_path)) == ["out"]


def test_resume_with_another_config_is_refused(messy, tmp_path):
  (tmp_path / "out.partial").mkdir()
  (tmp_path / "out.partial" / "run.json").write_text('{"fingerprint": "other"}')
  with pytest.raises(ConfigError, match="another config or other inputs"):
    pipeline.curate(settings.load(messy["config"]), str(tmp_path / "out"), log=lambda m: None)
  assert os.listdir(tmp_path / "out.partial") == ["run.json"]


def test_parquet_output(messy, tmp_path):
  pq = pytest.importorskip("pyarrow.parquet")
  cfg = settings.load(messy["config"])
  import dataclasses
  cfg = dataclasses.replace(cfg, output=settings.Output(format="parquet", shard_docs=100))
  pipeline.curate(cfg, str(tmp_path / "pq"), log=lambda m: None)
  table = pq.read_table(tmp_path / "pq" / "data" / "part-00000.parquet")
  assert table.column_names == ["id", "source", "text", "meta"]
  assert set(table.column("id").to_pylist()) == messy["kept"]


# ------------------------------------------------------------------------------------------------
# Bad input


def test_empty_result_names_the_rule_and_writes_nothing(tmp_path):
  src = tmp_path / "short.jsonl"
  _write_jsonl(src, [{"text": f"Only a few words here, number {i}."} for i in range(3)])
  cfg = settings.parse({"sources": [{"name": "s", "path": str(src)}],
                        "rules": {"gopher_quality": {}}}, "t.toml")
  with pytest.raises(ConfigError, match="'gopher_quality' removed the most \\(3 of 3 documents: "
                     "gopher_short_doc 3\\); loosen rules.gopher_quality$"):
    pipeline.curate(cfg, str(tmp_path / "out"), log=lambda m: None)
  assert sorted(os.listdir(tmp_path)) == ["short.jsonl"]


def test_readme_config_parses():
  import re
  import tomllib
  readme = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
  section = readme[readme.index("## Data curation"):]
  raw = tomllib.loads(re.search(r"```toml\n(.*?)```", section, re.S).group(1))
  raw["decontamination"]["files"] = []  # names a file of the reader's
  cfg = settings.parse(raw, "README.md")
  assert [r.name for r in cfg.rules] == ["language", "gopher_repetition", "gopher_quality", "c4",
                                         "fineweb"]
  assert cfg.rules[3].filter_no_terminal_punct is False and cfg.workers == 2


def test_misspelled_rule_and_key_list_the_valid_ones():
  with pytest.raises(ConfigError, match="unknown rule 'gopher_qualty' \\(did you mean "
                     "'gopher_quality'.*valid rules: language, gopher_quality"):
    settings.parse({"sources": [{"name": "s", "path": "x"}], "rules": {"gopher_qualty": {}}}, "c")
  with pytest.raises(ConfigError, match="rules.c4.min_sentences.*valid keys: "):
    settings.parse({"sources": [{"name": "s", "path": "x"}], "rules": {"c4": {"min_sentences": 1}}},
                   "c")
  with pytest.raises(ConfigError, match="rules.gopher_quality.min_doc_words: expected an integer"):
    settings.parse({"sources": [{"name": "s", "path": "x"}],
                    "rules": {"gopher_quality": {"min_doc_words": "50"}}}, "c")
  with pytest.raises(ConfigError, match="c4_bad_words: needs `words` or `words_file`"):
    settings.parse({"sources": [{"name": "s", "path": "x"}], "rules": {"c4_bad_words": {}}}, "c")


def test_cli_knows_the_perplexity_rule_and_checks_its_workdir(tmp_path, capsys):
  from mai_jax import cli
  config = tmp_path / "c.toml"
  config.write_text('[[sources]]\nname = "s"\npath = "in.jsonl"\n[rules.perplexity]\n'
                    'workdir = "no_such_run"\n')
  (tmp_path / "in.jsonl").write_text('{"text": "x"}\n')
  assert cli.main(["data", "curate", "--config", str(config), "--out", str(tmp_path / "out")]) == 2
  assert capsys.readouterr().err.strip() == (
      f"mai-jax: error: {config}: rules.perplexity: workdir '{tmp_path / 'no_such_run'}' is not a "
      f"folder (a `mai-jax train` workdir)")
  assert sorted(os.listdir(tmp_path)) == ["c.toml", "in.jsonl"]


def test_existing_out_dir_is_refused_untouched(messy, tmp_path, capsys):
  from mai_jax import cli
  out = tmp_path / "exists"
  out.mkdir()
  (out / "keep.txt").write_text("mine")
  assert cli.main(["data", "curate", "--config", messy["config"], "--out", str(out)]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("mai-jax: error: --out") and "already exists" in err and "\n" not in err
  assert os.listdir(out) == ["keep.txt"] and sorted(os.listdir(tmp_path)) == ["exists"]


def test_synthesize_cli_errors_are_one_line(tmp_path, capsys):
  from mai_jax import cli
  assert cli.main(["data", "synthesize", "--workdir", str(tmp_path / "none"), "--prompts",
                   str(tmp_path / "p.jsonl"), "--out", str(tmp_path / "o")]) == 2
  err = capsys.readouterr().err
  assert err.startswith(f"mai-jax: error: --workdir {tmp_path / 'none'}: not found; it must be a "
                        f"run directory") and err.count("\n") == 1
  assert sorted(os.listdir(tmp_path)) == []


def _assert_same_files(out, other):
  names = sorted(os.listdir(out))
  assert sorted(os.listdir(other)) == names
  for name in ["data/" + n for n in sorted(os.listdir(out / "data"))] + names:
    if name != "data":
      assert (out / name).read_bytes() == (other / name).read_bytes(), name


class _Terminal(io.StringIO):
  def isatty(self):
    return True


def test_progress_bars_only_on_a_terminal_stderr_and_never_in_the_output(messy, curated,
                                                                         tmp_path, monkeypatch,
                                                                         capsys):
  out, _ = curated
  for progress in (True, False):
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    other = tmp_path / f"progress_{progress}"
    pipeline.curate(settings.load(messy["config"]), str(other), log=lambda m: None,
                    progress=progress)
    shown = terminal.getvalue()
    if progress:
      assert [stage in shown for stage in ("filter:", "near dedup:", "write:")] == [True] * 3
    else:
      assert shown == ""
    _assert_same_files(out, other)
  assert capsys.readouterr().out == ""


def test_cluster_plan_shards_by_hand():
  from mai_jax.data.curate import cluster_stages
  # survivors per file 3, 0, 5, 2 at 4 a shard: ranks 0-3, 4-7, 8-9
  assert cluster_stages.plan_shards([3, 0, 5, 2], 4) == [[(0, 0, 3), (2, 0, 1)], [(2, 1, 5)],
                                                         [(3, 0, 2)]]
  assert cluster_stages.plan_shards([4], 4) == [[(0, 0, 4)]]
  assert cluster_stages.plan_shards([0, 0], 4) == []


def _cluster_stages_curate(cfg, staging, priors):
  """The Ray engine's per-group and per-task functions (cluster_stages, cluster_cut) run in this
  process on the local engine's staged files: (report, shard names, shard plan, staged file
  paths)."""
  from mai_jax.data.curate import cluster_cut, cluster_stages, staging as staging_lib
  index = pipeline.eval_index(cfg)
  os.makedirs(staging / "stage")
  os.makedirs(staging / "data")
  jobs = [docfilter.FileJob(i, s, b, r, str(staging / "stage" / f"{i:06d}.jsonl"))
          for i, (s, b, r) in enumerate(pipeline.list_files(cfg))]
  report, staged, parts = docfilter.new_report(cfg), [], []
  for job in jobs:
    result = docfilter.filter_file(cfg, index, job)
    staging_lib.save_result(str(staging), result)
    report.merge(result.report)
    staged.append((staging_lib.result_path(str(staging), job.number), len(result.ids)))
    parts.append((job.number, len(result.ids), result.report.to_json()))
  resumed = staging_lib.load_reports(str(staging), jobs, cfg)  # what a resumed Ray run reads
  assert [(n, c, r.to_json()) for n, (c, r) in sorted(resumed.items())] == parts
  pieces, files, n_prior = cluster_stages.layout(priors, staged)
  paths = [j.staging_path for j in jobs]
  kept, clusters = cluster_stages.in_memory(pieces, paths, cfg, report, n_prior)
  kept, cut_parts, cuts = cluster_cut.run_cuts(cfg, files, paths, kept, docfilter.new_report(cfg),
                                               cluster_cut.in_process, chunks=2)
  for part in cut_parts:
    report.merge(part)
  names, plan = [], cluster_stages.plan_shards(kept, cfg.output.shard_docs)
  for number, segments in enumerate(plan):
    out = cluster_stages.write_shard(number, segments, paths, str(staging), cfg.output.format,
                                     docfilter.new_report(cfg))
    report.merge(report.from_json(json.loads(out["report"]), report.examples_per_rule))
    names.append(out["name"])
  cluster_stages.write_signatures(str(staging / "signatures.npz"), files, paths,
                                  cfg.dedup.signature_params())
  report.extra.update(clusters, **topcut.report_extra(cuts))
  return report.to_json(), names, plan, paths


def test_cluster_stages_decide_and_write_as_the_local_engine(messy, curated, tmp_path):
  """Survivors, removal reports, shard boundaries and bytes, signatures.npz: the Ray engine's
  functions against the local engine's output, without Ray; then against an earlier corpus."""
  from mai_jax.data.curate import cluster_stages
  out, want = curated
  cfg = settings.load(messy["config"])
  got, names, plan, paths = _cluster_stages_curate(cfg, tmp_path / "s", [])
  assert names == sorted(os.listdir(out / "data"))
  for name in names:
    assert (tmp_path / "s" / "data" / name).read_bytes() == (out / "data" / name).read_bytes()
  # resuming: a finished shard is not written again, a half-written one is
  first, second = (tmp_path / "s" / "data" / n for n in names)
  stamp = first.stat().st_mtime_ns
  second.write_bytes(second.read_bytes()[:10])
  again = [cluster_stages.write_shard(k, plan[k], paths, str(tmp_path / "s"), "jsonl",
                                      docfilter.new_report(cfg)) for k in (0, 1)]
  assert first.stat().st_mtime_ns == stamp
  assert second.read_bytes() == (out / "data" / names[1]).read_bytes()
  assert [sum(s["out"]["docs"] for s in json.loads(a["report"])["sources"].values())
          for a in again] == [4, 3]
  assert (tmp_path / "s" / "signatures.npz").read_bytes() == (out / "signatures.npz").read_bytes()
  for key in ("sources", "stages", "duplicate_clusters_exact", "duplicate_clusters_near"):
    assert got[key] == want[key], key
  later = tmp_path / "later.jsonl"  # one copy of an earlier output's document, one new
  _write_jsonl(later, [{"text": messy["good"][0]}, {"text": _good_doc(100)},
                       {"text": messy["good"][0] + " "}])
  cfg = settings.parse({"sources": [{"name": "later", "path": str(later)}],
                        "dedup": {"against": [str(out / "signatures.npz")]}}, "t.toml")
  want = pipeline.curate(cfg, str(tmp_path / "local"), log=lambda m: None)
  priors = [(str(out / "signatures.npz"), len(messy["kept"]))]
  got, names, _, _ = _cluster_stages_curate(cfg, tmp_path / "s2", priors)
  assert names == ["part-00000.jsonl"] and (tmp_path / "s2" / "data" / names[0]).read_bytes() == \
      (tmp_path / "local" / "data" / names[0]).read_bytes()
  assert got["stages"] == want["stages"] and got["duplicate_clusters_exact"] == 1
  assert want["stages"]["exact_dedup"]["examples"][1]["detail"] == "kept prior:web/part0.jsonl:0"


@pytest.mark.slow  # starts a local Ray instance (~35 s on 2 busy cores)
def test_ray_engine_same_bytes_as_local(messy, curated, tmp_path):
  """The messy corpus through `--engine ray` on a local Ray instance: every output file equal;
  Ray's connected components over random LSH buckets equal the local union-find's; and a later
  corpus deduplicated against the output and cut to its top half by quality_classifier
  (keep_top_fraction) the same on both engines."""
  pytest.importorskip("ray.data")
  from mai_jax.data.curate import ray_engine
  out, _ = curated
  out_ray = tmp_path / "out_ray"
  with ray_engine.session(2):  # one instance for both checks (curate joins it)
    pipeline.curate(settings.load(messy["config"]), str(out_ray), engine="ray", workers=2,
                    log=lambda m: None)
    rng = np.random.default_rng(0)
    n, members = 400, np.sort(rng.choice(500, 400, replace=False))  # like exact survivors
    keys = [rng.integers(0, 800, n) for _ in range(3)]  # 3 bands: chains across buckets
    want = dedup.local_components(keys, members, 500)
    sizes = np.unique(want, return_counts=True)[1]
    assert (sizes > 1).sum() > 20 and sizes.max() > 20  # many clusters, some long (6 rounds)
    np.testing.assert_array_equal(ray_engine.near_components(keys, members, 500), want)
    later = tmp_path / "later.jsonl"  # against the earlier output: priors read by the workers
    _write_jsonl(later, [{"text": messy["good"][0] + " "}]
                 + [{"text": _good_doc(i)} for i in range(100, 105)])
    root = messy["root"]  # and the top half by quality of the 5 new documents (3, rounded up)
    quality = {"positives": [str(root / "synthetic.jsonl")],
               "negatives": [str(root / "web" / "part0.jsonl")], "keep_top_fraction": 0.5}
    cfg = settings.parse({"sources": [{"name": "later", "path": str(later)}],
                          "rules": {"quality_classifier": quality},
                          "dedup": {"against": [str(out / "signatures.npz")]}}, "t.toml")
    for engine in ("local", "ray"):
      got = pipeline.curate(cfg, str(tmp_path / f"later_{engine}"), engine=engine,
                            log=lambda m: None)
      assert got["top_fraction"]["quality_classifier"]["docs_out"] == 3
  _assert_same_files(out, out_ray)
  _assert_same_files(tmp_path / "later_local", tmp_path / "later_ray")


@pytest.mark.slow  # compiles a tiny Decoder's forward (~30 s on 2 busy cores)
def test_perplexity_rule_against_a_direct_forward(tmp_path):
  import dataclasses
  from test_evaluate import CharTokenizer, direct_logprob, tiny_model
  from mai_jax import curate_perplexity
  model, tok = tiny_model(), CharTokenizer()
  texts = ["the river runs by the town.", "zzqx qxzz zqzq xqxq zzzz."]
  want = [float(np.exp(-direct_logprob(model, [tok.bos_id], tok.encode(t), 32) / len(t)))
          for t in texts]
  got = [curate_perplexity.perplexity(model, tok, t, 64, 32) for t in texts]
  np.testing.assert_allclose(got, want, rtol=1e-5)
  settings.register_rule(curate_perplexity.Perplexity)
  _jsonl_texts(tmp_path / "in.jsonl", texts)
  cfg = settings.parse({"sources": [{"name": "s", "path": "in.jsonl"}],
                        "rules": {"perplexity": {"workdir": str(tmp_path)}},
                        "decontamination": {"enabled": False}}, "p.toml", str(tmp_path))
  rule = dataclasses.replace(cfg.rules[0], max_perplexity=(got[0] + got[1]) / 2)
  object.__setattr__(rule, "_loaded_model", (model, tok, 32))  # instead of a trained workdir
  report = pipeline.curate(dataclasses.replace(cfg, rules=(rule,)), str(tmp_path / "out"),
                           log=lambda m: None)
  rows = _output(tmp_path / "out")
  low = int(np.argmin(got))
  assert [r["id"] for r in rows] == [f"s/in.jsonl:{low}"]
  assert rows[0]["meta"]["perplexity"] == pytest.approx(got[low], rel=1e-4)
  assert report["stages"]["perplexity"]["reasons"] == {"above_max_perplexity": 1}


class _LetterTokenizer:
  """a..z -> ids 4..29 both ways; bos 2, eos 3."""
  bos_id, eos_id, pad_id = 2, 3, 0

  def encode(self, text):
    return [4 + (ord(c) - 97) % 26 for c in text]

  def decode(self, ids):
    return "".join(chr(97 + (i - 4) % 26) for i in ids)


@pytest.mark.slow  # compiles the KV-cache sampler for a tiny Decoder (~20 s on 2 busy cores)
def test_synthesize_shards_provenance_resume_and_curate(tmp_path):
  import dataclasses
  from test_evaluate import tiny_model
  from mai_jax import config as config_lib, sample, synthesize
  model, tok, cfg = tiny_model(), _LetterTokenizer(), config_lib.Config()
  (tmp_path / "p.jsonl").write_text("".join(json.dumps({"id": f"q{i}", "prompt": p}) + "\n"
                                            for i, p in enumerate(["abcd", "efgh", "ijkl", "mnop"])))
  prompts = synthesize.read_prompts(str(tmp_path / "p.jsonl"))
  sampling = sample.SamplingConfig(max_new_tokens=5, temperature=1.0, seed=7)
  kw = dict(generator="tiny@step 0", shard_prompts=2, batch_size=2, log=lambda m: None)
  out = tmp_path / "syn"
  written = synthesize.synthesize(cfg, model, tok, prompts, str(out), sampling, **kw)
  assert [os.path.basename(p) for p in written] == ["part-00000.jsonl", "part-00001.jsonl"]
  rows = [json.loads(line) for n in ("part-00000.jsonl", "part-00001.jsonl")
          for line in open(out / n)]
  want = (sample.sample_text(cfg, model, tok, ["abcd", "efgh"], dataclasses.replace(sampling, seed=7))
          + sample.sample_text(cfg, model, tok, ["ijkl", "mnop"], dataclasses.replace(sampling, seed=8)))
  assert [r["text"] for r in rows] == want  # (eos may end a row early)
  assert [(r["prompt_id"], r["seed"], r["generator"]) for r in rows] == [
      ("q0", 7, "tiny@step 0"), ("q1", 7, "tiny@step 0"), ("q2", 8, "tiny@step 0"),
      ("q3", 8, "tiny@step 0")]
  first = (out / "part-00001.jsonl").read_bytes()
  os.remove(out / "part-00001.jsonl")  # an interrupted run: the same call makes only that shard
  assert synthesize.synthesize(cfg, model, tok, prompts, str(out), sampling, **kw) == [
      str(out / "part-00001.jsonl")]
  assert (out / "part-00001.jsonl").read_bytes() == first
  other = synthesize.synthesize(cfg, model, tok, prompts, str(tmp_path / "p1"), sampling,
                                process_index=1, process_count=2, **kw)
  assert [os.path.basename(p) for p in other] == ["part-00001.jsonl"]
  assert (tmp_path / "p1" / "part-00001.jsonl").read_bytes() == first
  with pytest.raises(ConfigError, match="made with other sampling"):
    synthesize.synthesize(cfg, model, tok, prompts, str(out),
                          dataclasses.replace(sampling, temperature=0.5), **kw)
  ccfg = settings.parse({"sources": [{"name": "syn", "path": "syn/part-*.jsonl"}], "rules": {},
                         "dedup": {"near": False}, "decontamination": {"enabled": False}},
                        "c.toml", str(tmp_path))
  pipeline.curate(ccfg, str(tmp_path / "cur"), log=lambda m: None)
  meta = [r["meta"] for r in _output(tmp_path / "cur")]
  assert [m["prompt_id"] for m in meta] == ["q0", "q1", "q2", "q3"]
  assert meta[0]["generator"] == "tiny@step 0" and meta[0]["seed"] == 7


def test_synthesize_bad_prompts_file_names_the_line(tmp_path):
  from mai_jax import synthesize
  (tmp_path / "p.jsonl").write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
  with pytest.raises(ConfigError, match=r"p.jsonl:2: expected an object with a string 'prompt'"):
    synthesize.read_prompts(str(tmp_path / "p.jsonl"))
