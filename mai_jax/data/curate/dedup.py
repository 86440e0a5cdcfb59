"""Exact and near-duplicate removal across every source, with one deterministic survivor.

Documents are numbered in priority order (sources in config order, files sorted, records in file
order; documents of earlier corpora loaded with `dedup.against` come first of all). Each cluster's
survivor is its smallest number, its first member in that order, whatever order the edges come in:
put the source you trust most first. Locally clusters are built by union-find where the smaller
number always becomes the root; the Ray engine finds the same minima by Ray Data group-bys (the
exact hash's, then rounds over the LSH edges: cluster_stages.py, components.py), as its
documents need not fit one machine. Exact dedup (8-byte
blake2b of the normalized text, textstats.normalize_for_hash) runs first; near dedup (MinHash
LSH, minhash.py) runs on the exact survivors, any shared band joins two documents (FineWeb's
rule, no pairwise Jaccard check).

Signatures of the output are saved (`signatures.npz`: ids, exact hashes, MinHash signatures, and
the parameters, numpy arrays only, loaded with allow_pickle=False) so a later corpus dedups
against this one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import zipfile
from typing import Callable, Iterable

import numpy as np

from mai_jax.config import ConfigError
from mai_jax.data.curate import minhash
from mai_jax.data.curate.progress import OFF, Progress
from mai_jax.data.curate.textstats import normalize_for_hash


class UnionFind:
  """Disjoint sets over 0..n-1; the root of a set is always its smallest member."""

  def __init__(self, n: int):
    self.parent = list(range(n))

  def find(self, x: int) -> int:
    parent = self.parent
    while parent[x] != x:
      parent[x] = parent[parent[x]]  # path halving
      x = parent[x]
    return x

  def union(self, a: int, b: int) -> None:
    ra, rb = self.find(a), self.find(b)
    if ra != rb:
      lo, hi = (ra, rb) if ra < rb else (rb, ra)
      self.parent[hi] = lo


def exact_hash(text: str) -> int:
  digest = hashlib.blake2b(normalize_for_hash(text).encode("utf-8"), digest_size=8).digest()
  return int.from_bytes(digest, "little")


@dataclasses.dataclass
class DedupResult:
  """`survivor[i]`: the document number that survives document i's cluster (i itself if kept)."""
  exact_survivor: np.ndarray   # int64 [N]
  near_survivor: np.ndarray    # int64 [N], over exact survivors (others: their exact survivor)

  def removed_exact(self) -> np.ndarray:
    return self.exact_survivor != np.arange(len(self.exact_survivor))

  def removed_near(self) -> np.ndarray:
    return ~self.removed_exact() & (self.near_survivor != np.arange(len(self.near_survivor)))


def same_key_pairs(keys: list[np.ndarray], members: np.ndarray) -> Iterable[tuple[int, int]]:
  """For each key array (a band, or the exact hashes), pairs of `members` sharing a key: enough
  edges to connect every group (consecutive members after a stable sort). The Ray engine
  joins each group to its smallest member instead; any edges that connect each group give the
  same clusters, and so the same survivors."""
  for key_N in keys:
    order = np.argsort(key_N, kind="stable")
    same = np.nonzero(key_N[order][1:] == key_N[order][:-1])[0]
    for j in same.tolist():
      yield int(members[order[j]]), int(members[order[j + 1]])


def _roots(n: int, pairs: Iterable[tuple[int, int]]) -> np.ndarray:
  uf = UnionFind(n)
  for a, b in pairs:
    uf.union(a, b)
  return np.array([uf.find(i) for i in range(n)], np.int64)


# (band keys, their members, n, progress) -> each of 0..n-1's cluster minimum
ComponentsFn = Callable[[list, np.ndarray, int, Progress], np.ndarray]


def local_components(keys: list, members: np.ndarray, n: int, progress: Progress = OFF
                     ) -> np.ndarray:
  """The local engine's near clusters: union-find over same_key_pairs, one band at a time."""
  return _roots(n, same_key_pairs(progress(keys, len(keys), "near dedup", "band"), members))


def deduplicate(exact_N: np.ndarray, sig_NP: np.ndarray, *, exact: bool, near: bool,
                bands: int, rows: int, components: ComponentsFn = local_components,
                progress: Progress = OFF) -> DedupResult:
  """Clusters documents 0..N-1 (priority order) and returns each one's survivor. `components`
  clusters the LSH band groups (locally, or on Ray); exact groups are one sort of N hashes,
  done here."""
  n = len(exact_N)
  all_N = np.arange(n)
  exact_survivor = all_N.copy()
  if exact and n:
    exact_survivor = _roots(n, same_key_pairs([exact_N.astype(np.uint64)], all_N))
  near_survivor = exact_survivor.copy()
  if near and n:
    kept = np.nonzero(exact_survivor == all_N)[0]
    kept = kept[~np.all(sig_NP[kept] == np.iinfo(np.uint32).max, axis=1)]  # wordless: no shingles
    band_keys = minhash.band_keys(sig_NP[kept], bands, rows) if len(kept) else []
    near_survivor = components(band_keys, kept, n, progress)[exact_survivor]
  return DedupResult(exact_survivor, near_survivor)


SIGNATURE_PARAMS = ("ngram", "num_perm", "seed")


def save_signatures(path: str, ids: list[str], exact_N: np.ndarray, sig_NP: np.ndarray,
                    params: dict) -> None:
  with open(path, "wb") as f:
    np.savez(f, ids=np.array(ids, dtype=np.str_), exact=exact_N.astype(np.uint64),
             sig=sig_NP.astype(np.uint32),
             **{k: np.array(params[k], np.int64) for k in SIGNATURE_PARAMS})


def npz_rows(path: str, member: str) -> int:
  """Rows of one array of an .npz, from its .npy header only (the array stays on disk)."""
  with zipfile.ZipFile(path) as z, z.open(member + ".npy") as f:
    version = np.lib.format.read_magic(f)
    read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
            else np.lib.format.read_array_header_2_0)
    shape = read(f)[0]
  return int(shape[0])


def _open_signatures(path: str, params: dict, arrays: bool):
  """(ids, exact, sig) or, without `arrays`, the row count, of an earlier output's
  signatures.npz whose MinHash parameters must match `params`."""
  try:
    with np.load(path, allow_pickle=False) as z:
      saved = {k: int(z[k]) for k in SIGNATURE_PARAMS}
      got = ([str(s) for s in z["ids"]], z["exact"], z["sig"]) if arrays else None
    got = got or npz_rows(path, "exact")
  except (OSError, KeyError, ValueError, zipfile.BadZipFile) as e:
    raise ConfigError(f"dedup.against {path!r}: not a signatures.npz written by `mai-jax data "
                      f"curate` ({e})") from e
  wanted = {k: int(params[k]) for k in SIGNATURE_PARAMS}
  if saved != wanted:
    raise ConfigError(f"dedup.against {path!r}: signatures made with {saved}, this run uses "
                      f"{wanted}; set dedup.ngram/bands/rows/seed to match")
  return got


def load_signatures(path: str, params: dict) -> tuple[list[str], np.ndarray, np.ndarray]:
  """(ids, exact hashes, signatures) of an earlier output; its MinHash parameters must match."""
  return _open_signatures(path, params, arrays=True)


def signature_rows(path: str, params: dict) -> int:
  """load_signatures' checks, but only the number of documents comes back (the Ray engine's
  workers read the arrays)."""
  return _open_signatures(path, params, arrays=False)
