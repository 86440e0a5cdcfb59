"""Document sources: where raw text comes from, and the deterministic train/validation split.

A source is a grain random-access data source of documents (`len(src)`, `src[i] -> str`), so the
pipeline wraps it with `grain.MapDataset.source(src)` and gets global shuffling, repetition and
checkpointable iteration for free. Each source has stable document ids (relative paths), and the
split is a pure function of the id, so a document never moves between train and validation when
other files come or go.

A run's sources are the entries of data.sources (config.SourceSpec: name, kind, path, weight,
field), or the single data.source when that list is empty. File kinds (text, JSONL, Parquet,
ArrayRecord) are read by readers.py one file at a time (`file_documents`, which the token cache
writer streams too); `spec_documents` holds a raw source's documents in host memory, so corpora
larger than that go through the token cache (cache.py), which is read lazily.

The default source, 'stdlib', is the running interpreter's own standard library: its `.py` modules
plus the documentation text that ships with it (the pydoc topics, one document per topic, and the
`.txt`/`.rst` notes). It is on every machine that runs Python, so a fresh checkout trains on real
text with nothing downloaded.

Left out of 'stdlib', and why:
  * `test/`, `tests/`, `idle_test/`: about 60% of the bytes, dominated by deliberately odd inputs
    (invalid encodings, huge generated tables, binary blobs in string literals), and Linux
    distributions often ship them as a separate package, so including them would make the corpus
    differ from machine to machine.
  * `site-packages/`: third-party code, different on every machine.
  * `_sysconfigdata_*.py`: build paths and compiler flags of this particular installation.
  * the modules that Linux distributions ship as separate packages or drop (`_DISTRIBUTION_SPLIT`:
    IDLE, tkinter and turtle, distutils, lib2to3, ensurepip, ctypes' macOS loader, Debian's own
    additions). Without them Debian's python3.11 and a python.org/pyenv build of the same minor
    version see the same file set; what still differs is what the patch releases changed, so the
    loss figures of a run differ a little from one interpreter to another (as they do anyway from
    one jax/XLA version to another, and pip picks jax by Python version).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import hashlib
import os
import sysconfig
from typing import Callable, Iterator, Optional, Sequence

from mai_jax import config as config_lib
from mai_jax.config import ConfigError, DataConfig
from mai_jax.data import readers

SPLITS = ("train", "validation")

_STDLIB_SUFFIXES = (".py", ".txt", ".rst")
_STDLIB_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "test", "tests",
                                   "idle_test", "lib-dynload"})
_PYDOC_TOPICS = "pydoc_data/topics.py"
# Top-level stdlib modules and packages that distributions split out or drop: Debian/Ubuntu move
# idlelib, tkinter, turtle(demo) to python3-tk / idle packages, older Ubuntu distutils and lib2to3
# to python3-distutils / python3-lib2to3, Fedora ensurepip's helpers; Debian drops ctypes/macholib
# and adds _distutils_system_mod.py. Left out so the corpus is the same file set everywhere.
_DISTRIBUTION_SPLIT = frozenset({"idlelib", "tkinter", "turtle.py", "turtledemo", "distutils",
                                 "lib2to3", "ensurepip", "_distutils_system_mod.py",
                                 "sitecustomize.py", "ctypes/macholib"})


class SourceError(ConfigError):
  """A data source produced nothing usable; the message names the source and the fix."""


@dataclasses.dataclass(frozen=True)
class DocumentSource:
  """Documents held in memory, addressable by index (a grain RandomAccessDataSource).

  Attributes:
    name: what the documents came from, for messages (e.g. "stdlib at /usr/lib/python3.11").
    doc_ids: stable ids (relative paths, `path:topic` for expanded files), one per document.
    texts: the documents, same order as `doc_ids`.
    files_scanned: files looked at (before skipping).
    skipped: (relative path, reason) for every file that was not used, e.g. invalid UTF-8.
  """
  name: str
  doc_ids: tuple[str, ...]
  texts: tuple[str, ...]
  files_scanned: int = 0
  skipped: tuple[tuple[str, str], ...] = ()

  def __len__(self) -> int:
    return len(self.texts)

  def __getitem__(self, index: int) -> str:
    return self.texts[index]

  def __repr__(self) -> str:  # grain prints sources in pipeline summaries; keep it one line.
    return (f"DocumentSource({self.name!r}, {len(self)} documents, "
            f"{len(self.skipped)} files skipped)")

  @property
  def num_chars(self) -> int:
    return sum(len(t) for t in self.texts)

  def skipped_counts(self) -> dict[str, int]:
    """Reason -> number of files skipped for it."""
    counts: dict[str, int] = {}
    for _, reason in self.skipped:
      counts[reason] = counts.get(reason, 0) + 1
    return counts

  def select(self, indices: Sequence[int], name: str) -> "DocumentSource":
    return DocumentSource(name=name, doc_ids=tuple(self.doc_ids[i] for i in indices),
                          texts=tuple(self.texts[i] for i in indices),
                          files_scanned=self.files_scanned, skipped=self.skipped)


# ----------------------------------------------------------------------------------------------
# Reading files


def list_text_files(root: str, *, suffixes: Sequence[str], excluded_dirs=frozenset(),
                    max_files: int = 0) -> list[str]:
  """Relative POSIX paths of files under `root` ending in `suffixes`, sorted; the first
  `max_files` of them when max_files > 0. Sorting makes the list identical on every host."""
  paths = []
  for folder, dirs, files in os.walk(root):
    dirs[:] = [d for d in dirs if d not in excluded_dirs]
    for name in files:
      if name.endswith(tuple(suffixes)):
        paths.append(os.path.relpath(os.path.join(folder, name), root).replace(os.sep, "/"))
  paths.sort()
  return paths[:max_files] if max_files > 0 else paths


def read_text(path: str) -> tuple[Optional[str], str]:
  """Returns (text, "") or (None, reason) for files that cannot be used as text."""
  try:
    with open(path, "rb") as f:
      raw = f.read()
  except OSError as e:
    return None, f"unreadable ({type(e).__name__})"
  return readers.decode_text(raw)


def read_documents(name: str, root: str, relpaths: Sequence[str],
                   expand: Optional[Callable[[str, str], Optional[list[tuple[str, str]]]]] = None,
                   ) -> DocumentSource:
  """Reads `relpaths` under `root`, skipping (and recording) files that are not usable text.

  `expand(relpath, text)` may turn one file into several (id, text) documents; returning None
  keeps the file as one document.
  """
  doc_ids, texts, skipped = [], [], []
  for rel in relpaths:
    text, reason = read_text(os.path.join(root, rel))
    if text is None:
      skipped.append((rel, reason))
      continue
    docs = expand(rel, text) if expand else None
    for doc_id, doc_text in docs if docs is not None else [(rel, text)]:
      doc_ids.append(doc_id)
      texts.append(doc_text)
  return DocumentSource(name=name, doc_ids=tuple(doc_ids), texts=tuple(texts),
                        files_scanned=len(relpaths), skipped=tuple(skipped))


# ----------------------------------------------------------------------------------------------
# The 'stdlib' source


def stdlib_root() -> str:
  return sysconfig.get_paths()["stdlib"]


def _distribution_independent(rel: str) -> bool:
  parts = rel.split("/")
  return (parts[0] not in _DISTRIBUTION_SPLIT and "/".join(parts[:2]) not in _DISTRIBUTION_SPLIT
          and not parts[-1].startswith("_sysconfigdata_"))


def stdlib_files(root: str) -> list[str]:
  """The sorted relative paths the 'stdlib' source reads under `root` (see the module docstring
  for what is left out and why)."""
  return [p for p in list_text_files(root, suffixes=_STDLIB_SUFFIXES,
                                     excluded_dirs=_STDLIB_EXCLUDED_DIRS)
          if _distribution_independent(p)]


def _expand_pydoc_topics(rel: str, text: str) -> Optional[list[tuple[str, str]]]:
  """pydoc_data/topics.py is the language reference as a dict literal of plain-text topics; the
  topics themselves are documentation, the Python string quoting around them is noise."""
  if rel != _PYDOC_TOPICS:
    return None
  try:
    for node in ast.parse(text).body:
      if (isinstance(node, ast.Assign) and len(node.targets) == 1
          and getattr(node.targets[0], "id", None) == "topics"):
        topics = ast.literal_eval(node.value)
        return [(f"{rel}:{key}", value) for key, value in sorted(topics.items())
                if isinstance(value, str) and value.strip()]
  except (SyntaxError, ValueError):
    pass
  return None  # unexpected layout: keep the file as source code


@functools.lru_cache(maxsize=4)
def stdlib_documents(max_files: int = 0, root: Optional[str] = None) -> DocumentSource:
  """Every document of the 'stdlib' source (both splits); cached, since the tokenizer trainer,
  the train iterator and the eval batches all read it."""
  root = root or stdlib_root()
  relpaths = stdlib_files(root)
  if max_files > 0:
    relpaths = relpaths[:max_files]
  return read_documents(f"stdlib at {root}", root, relpaths, expand=_expand_pydoc_topics)


# Source name (DataConfig.source) -> function(data_cfg, root) returning every document.
SOURCES: dict[str, Callable[[DataConfig, Optional[str]], DocumentSource]] = {
    "stdlib": lambda data, root: stdlib_documents(data.max_files, root),
}


# ----------------------------------------------------------------------------------------------
# Configured sources (data.sources)

SOURCE_KINDS = config_lib.SOURCE_KINDS
SourceSpec = config_lib.SourceSpec
source_specs = config_lib.data_sources


def spec_files(spec: SourceSpec, max_files: int = 0,
               root: Optional[str] = None) -> tuple[str, list[str]]:
  """(base folder, relative paths) of the files a (non-cache) source reads, first `max_files`."""
  if spec.kind == "stdlib":
    base = root or stdlib_root()
    files = stdlib_files(base)
  else:
    base, files = readers.source_files(spec.path)
  return base, files[:max_files] if max_files > 0 else files


def file_documents(spec: SourceSpec, base: str, rel: str) -> Iterator[readers.Document]:
  """The documents of one file of `spec` (see readers.Document)."""
  if spec.kind != "stdlib":
    yield from readers.read_file_documents(spec.kind, spec.field, base, rel)
    return
  text, reason = read_text(os.path.join(base, rel))
  docs = _expand_pydoc_topics(rel, text) if text is not None else None
  if text is None:
    yield rel, None, reason
  else:
    yield from ((i, t, "") for i, t in (docs if docs is not None else [(rel, text)]))


@functools.lru_cache(maxsize=16)
def spec_documents(spec: SourceSpec, max_files: int = 0,
                   root: Optional[str] = None) -> DocumentSource:
  """Every document of a raw source, read into memory (cached: the tokenizer trainer, the train
  iterator and the eval batches all read it). Large corpora go through the token cache instead,
  which is read lazily."""
  if spec.kind == "stdlib":
    return stdlib_documents(max_files, root)
  if spec.kind == "cache":
    raise SourceError(f"source {spec.name!r} is a token cache; it has tokens, not documents")
  base, files = spec_files(spec, max_files, root)
  if not files:
    raise SourceError(f"data.sources {spec.name!r}: path {spec.path!r} matches no files; "
                      f"point it at a file, a folder or a glob such as '/data/web/**/*.jsonl'")
  doc_ids, texts, skipped = [], [], []
  for rel in files:
    for doc_id, text, reason in file_documents(spec, base, rel):
      if text is None:
        skipped.append((doc_id, reason))
      else:
        doc_ids.append(doc_id)
        texts.append(text)
  return DocumentSource(name=f"{spec.name} ({spec.kind} at {spec.path})", doc_ids=tuple(doc_ids),
                        texts=tuple(texts), files_scanned=len(files), skipped=tuple(skipped))


# ----------------------------------------------------------------------------------------------
# Split


def split_fraction(doc_id: str) -> float:
  """A stable number in [0, 1) per document id (sha256, so identical on every host and run)."""
  digest = hashlib.sha256(doc_id.encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big") / 2.0**64


def split_indices(doc_ids: Sequence[str], val_fraction: float) -> dict[str, list[int]]:
  """Indices of each split: a document is validation iff split_fraction(id) < val_fraction.

  With val_fraction > 0 and at least two documents, validation gets at least the one document
  with the smallest hash, so tiny corpora (tests, max_files=40) still have something to evaluate.
  """
  fractions = [split_fraction(d) for d in doc_ids]
  val = [i for i, f in enumerate(fractions) if f < val_fraction]
  if not val and val_fraction > 0 and len(doc_ids) >= 2:
    val = [min(range(len(doc_ids)), key=fractions.__getitem__)]
  val_set = set(val)
  return {"train": [i for i in range(len(doc_ids)) if i not in val_set], "validation": val}


def split_records(data: DataConfig, spec: SourceSpec, split: str,
                  read: Callable[[str, str], Iterator], kind: str) -> list:
  """The records of `split` of one JSONL source (conversations, preference pairs), in file order.

  `read(base, rel)` yields records with a `.record` name ('rel:line') that the split hashes, so a
  record stays in its split however the files are listed or sharded."""
  base, files = readers.source_files(spec.path)
  if data.max_files > 0:
    files = files[:data.max_files]
  if not files:
    raise SourceError(f"data.sources {spec.name!r}: path {spec.path!r} matches no files; point it "
                      f"at a JSONL file of {kind}, a folder or a glob")
  records = [r for rel in files for r in read(base, rel)]
  picked = split_indices([r.record for r in records], data.val_fraction)[split]
  if not picked:
    hint = "raise data.val_fraction" if split == "validation" and records else f"add {kind}"
    raise SourceError(f"data.sources {spec.name!r}: no {split} {kind} among {len(records)} in "
                      f"{len(files)} files; {hint}")
  return [records[i] for i in picked]


def load_split(data: DataConfig, split: str, *, root: Optional[str] = None) -> DocumentSource:
  """The documents of `split` ('train' or 'validation') of the run's only (or first) source.

  `root` overrides where a file-based source reads from (tests point it at a temporary folder).
  Raises SourceError naming the source when the split has no documents.
  """
  return load_splits(data, split, root=root)[0]


def load_splits(data: DataConfig, split: str, *,
                root: Optional[str] = None) -> list[DocumentSource]:
  """The documents of `split` of every configured source, in data.sources order."""
  if split not in SPLITS:
    raise ValueError(f"split={split!r} must be one of {SPLITS}")
  if not data.sources and data.source not in SOURCES:
    raise SourceError(f"data.source={data.source!r} is not a known source; "
                      f"known sources: {', '.join(sorted(SOURCES))}")
  return [_split_of(spec, data, split, root) for spec in source_specs(data)]


def _split_of(spec: SourceSpec, data: DataConfig, split: str,
              root: Optional[str]) -> DocumentSource:
  everything = spec_documents(spec, data.max_files, root)
  docs = everything.select(split_indices(everything.doc_ids, data.val_fraction)[split],
                           name=f"{everything.name} [{split}]")
  if not len(docs):
    skipped = ", ".join(f"{n} {r}" for r, n in sorted(everything.skipped_counts().items()))
    hint = ("raise data.val_fraction or data.max_files" if split == "validation" and len(everything)
            else "point the source at UTF-8 text (or the right 'field') or raise data.max_files")
    which = (f"data.source={spec.name!r}" if not data.sources
             else f"data.sources {spec.name!r}")
    raise SourceError(
        f"{which} ({everything.name}) yielded no {split} documents: "
        f"{everything.files_scanned} files scanned, {len(everything)} documents in all"
        f"{', skipped: ' + skipped if skipped else ''}; {hint}")
  return docs
