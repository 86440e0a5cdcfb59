"""Checkpoints through orbax's CheckpointManager: async, sharded, atomic, verified.

One checkpoint step holds four items: `state` (the TrainState pytree, each process writing its own
shards), `data` (the data iterator's state as JSON), `config` (the resolved config) and `metadata`
(versions, mesh, process count, tokenizer hash, data position). Orbax writes into a temporary
directory and renames it when every item is finalized, so a crash mid-save never leaves a step that
`latest_step()` would pick. Restoring into an abstract state whose leaves carry *new* shardings
reshards on the fly: a checkpoint from one mesh loads onto another.

Why the data state is plain JSON rather than grain's own checkpoint handler: grain's handler writes
one file per process named after the process count, so a checkpoint written by 2 processes could
not be restored by 1 or 4. Our global batch does not depend on the process count (see
data/pipeline.py), so the iterator state is the same on every host and one JSON copy restores any
process count.

Integrity: after orbax finalizes a step, process 0 writes `mai_jax_manifest.json` into it (every
file's size and, with `checkpoint.checksums`, its CRC32) from a background thread. Restore checks
the manifest and falls back to the previous good step when the latest is truncated or corrupted,
moving the bad one aside as `STEP.corrupt` (never deleting it). A step finalized but killed before
its manifest was written is "unverified": it is restored, and a read error still triggers the
fallback. Checksumming costs one read of the checkpoint by process 0 (about 1 s per GB).

This module stores pytrees; it never imports model classes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import threading
import time
import zlib
from typing import Any, Callable, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from mai_jax.config import CheckpointConfig, ConfigError

MANIFEST = "mai_jax_manifest.json"
CORRUPT_SUFFIX = ".corrupt"
ITEMS = ("state", "data", "config", "metadata")
REQUIRED_ITEMS = ("state",)  # a params-only checkpoint (save_params) has no data state
_TMP_MARKER = ".orbax-checkpoint-tmp"
_CRC_CHUNK = 1 << 22


class CheckpointError(RuntimeError):
  """A checkpoint could not be written or no usable checkpoint could be read."""


@dataclasses.dataclass(frozen=True)
class StepStatus:
  """One entry of a checkpoint directory, as `mai-jax checkpoints` lists it."""
  name: str
  step: Optional[int]
  status: str  # ok | unverified | corrupt | incomplete | quarantined
  detail: str
  size_bytes: int


@dataclasses.dataclass(frozen=True)
class Restored:
  step: int
  state: Any
  data_state: dict  # the data iterator's get_state() at this step
  metadata: dict
  lost: tuple[tuple[int, str], ...]  # newer steps that were corrupt, with the reason


# ------------------------------------------------------------------------------------- manifest

def _files(step_dir: str) -> list[str]:
  out = []
  for root, _, names in os.walk(step_dir):
    for name in names:
      rel = os.path.relpath(os.path.join(root, name), step_dir)
      if rel != MANIFEST and not rel.endswith(".tmp"):
        out.append(rel)
  return sorted(out)


def _bytes_on_disk(step_dir: str) -> int:
  """Total size of a step directory's files. A save still running (or a failed one that orbax is
  cleaning up) may delete a file between the walk and its stat: it no longer counts."""
  total = 0
  for rel in _files(step_dir):
    try:
      total += os.path.getsize(os.path.join(step_dir, rel))
    except FileNotFoundError:
      pass
  return total


def _crc32(path: str) -> int:
  crc = 0
  with open(path, "rb") as f:
    while chunk := f.read(_CRC_CHUNK):
      crc = zlib.crc32(chunk, crc)
  return crc


def write_manifest(step_dir: str, checksums: bool) -> None:
  """Records every file's size (and CRC32) of a finalized step; written atomically, last."""
  entries = {}
  for rel in _files(step_dir):
    path = os.path.join(step_dir, rel)
    entries[rel] = {"size": os.path.getsize(path)}
    if checksums:
      entries[rel]["crc32"] = _crc32(path)
  tmp = os.path.join(step_dir, MANIFEST + ".tmp")
  with open(tmp, "w") as f:
    json.dump({"files": entries}, f)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, os.path.join(step_dir, MANIFEST))


def verify_step(step_dir: str) -> tuple[str, str]:
  """(status, detail) of a finalized step directory: ok, unverified or corrupt."""
  missing_items = [i for i in REQUIRED_ITEMS if not os.path.isdir(os.path.join(step_dir, i))]
  if missing_items:
    return "corrupt", f"missing item(s) {', '.join(missing_items)}"
  path = os.path.join(step_dir, MANIFEST)
  if not os.path.exists(path):
    return "unverified", "no manifest (the run stopped right after this save)"
  try:
    with open(path) as f:
      entries = json.load(f)["files"]
  except (OSError, ValueError, KeyError) as e:
    return "corrupt", f"unreadable manifest: {e}"
  for rel, want in entries.items():
    file = os.path.join(step_dir, rel)
    if not os.path.exists(file):
      return "corrupt", f"missing file {rel}"
    size = os.path.getsize(file)
    if size != want["size"]:
      return "corrupt", f"{rel} has {size} bytes, {want['size']} were written"
    if "crc32" in want and _crc32(file) != want["crc32"]:
      return "corrupt", f"{rel} fails its CRC32 check"
  return "ok", f"{len(entries)} files match the manifest"


def list_checkpoints(directory: str) -> list[StepStatus]:
  """Every step-like entry of a checkpoint directory with its status, oldest first."""
  if not os.path.isdir(directory):
    raise ConfigError(f"no checkpoint directory {directory}")
  out = []
  for name in os.listdir(directory):
    path = os.path.join(directory, name)
    if not os.path.isdir(path):
      continue
    head = name.split(".", 1)[0]
    step = int(head) if head.isdigit() else None
    if step is None:
      continue
    size = _bytes_on_disk(path)
    if name.isdigit():
      status, detail = verify_step(path)
    elif name.endswith(CORRUPT_SUFFIX):
      status, detail = "quarantined", _read_text(os.path.join(path, "REASON"))
    elif _TMP_MARKER in name:
      status, detail = "incomplete", "never finalized (the save was interrupted)"
    else:
      continue
    out.append(StepStatus(name, step, status, detail, size))
  return sorted(out, key=lambda s: (s.step, s.name))


def _remove_tree(path: str, attempts: int = 5) -> None:
  """rmtree that tolerates files still appearing (stray writer threads of a failed save in this
  process finish within moments)."""
  for attempt in range(attempts):
    try:
      shutil.rmtree(path)
      return
    except FileNotFoundError:
      return
    except OSError:
      if attempt == attempts - 1:
        raise
      time.sleep(0.2 * (attempt + 1))


def _read_text(path: str) -> str:
  try:
    with open(path) as f:
      return f.read().strip()
  except OSError:
    return ""


def _path_name(path) -> str:
  """'opt_state/1/0/mu/embed' for a tree path, whether its parts are keys, indices or fields
  (orbax's metadata tree turns named-tuple fields into dict keys)."""
  parts = []
  for entry in path:
    for attr in ("key", "idx", "name"):
      if hasattr(entry, attr):
        parts.append(str(getattr(entry, attr)))
        break
  return "/".join(parts)


# ----------------------------------------------------------------------------- multi-process

def _agree_all(ok: bool) -> bool:
  """True only if `ok` holds on every process (a collective: every process must call it)."""
  if jax.process_count() == 1:
    return ok
  return bool(np.all(multihost_utils.process_allgather(np.asarray(ok, np.int32))))


def _from_process_0(compute: Callable[[], str]) -> str:
  """Runs `compute` on process 0 and gives its (short string) answer to every process."""
  if jax.process_count() == 1:
    return compute()
  text = compute() if jax.process_index() == 0 else ""
  data = np.zeros(4096, np.uint8)
  raw = text.encode()[:4096]
  data[:len(raw)] = np.frombuffer(raw, np.uint8)
  data = multihost_utils.broadcast_one_to_all(data)
  return bytes(np.asarray(data)).rstrip(b"\0").decode(errors="replace")


# ------------------------------------------------------------------------------- checkpointer

class Checkpointer:
  """Saves and restores train state + data iterator state under WORKDIR/checkpoints."""

  def __init__(self, directory: str, cfg: CheckpointConfig):
    self.directory = os.path.abspath(directory)
    self.cfg = cfg
    self._manifest_thread: Optional[threading.Thread] = None
    self._manifest_error: Optional[BaseException] = None
    self._remove_unfinished_saves()
    self._manager = self._open()

  def _remove_unfinished_saves(self) -> None:
    """Deletes the temporary directories of saves that never finalized (killed mid-save): they
    are never restorable, and a new save of the same step needs the name."""
    if jax.process_index() == 0 and os.path.isdir(self.directory):
      for name in os.listdir(self.directory):
        if _TMP_MARKER in name and name.split(".", 1)[0].isdigit():
          _remove_tree(os.path.join(self.directory, name))
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("mai_jax checkpoint tmp cleanup")

  def _open(self) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=self.cfg.max_to_keep,
        keep_period=self.cfg.keep_period or None,
        enable_async_checkpointing=self.cfg.async_save,
        # Leftovers of interrupted saves are removed by _remove_unfinished_saves instead:
        # orbax's background cleanup races with a failing save's own cleanup.
        cleanup_tmp_directories=False,
        create=True,
    )
    return ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={
            "state": ocp.StandardCheckpointHandler(),
            "data": ocp.JsonCheckpointHandler(),
            "config": ocp.JsonCheckpointHandler(),
            "metadata": ocp.JsonCheckpointHandler(),
        })

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def _reloaded_steps(self) -> list[int]:
    """The steps on disk now (another process or a failed save may have changed them)."""
    self._manager.reload()
    return sorted(self._manager.all_steps())

  def should_save(self, step: int) -> bool:
    return self.cfg.every_steps > 0 and step % self.cfg.every_steps == 0

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def save(self, step: int, state: Any, data_state: dict, config: dict, metadata: dict) -> None:
    """Starts a save of `step` (async when configured); returns once the state is copied off the
    devices, so the caller may donate/overwrite `state` right away. `data_state` is the data
    iterator's `get_state()`. Raises CheckpointError if this or the previous save failed."""
    self._raise_manifest_error()
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data_state),
        config=ocp.args.JsonSave(config),
        metadata=ocp.args.JsonSave(metadata),
    )
    try:
      self._manager.save(step, args=args, force=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the step and the intact fallback
      raise self._save_error(step, e) from e
    if jax.process_index() == 0:
      self._start_manifest(step)

  def wait(self) -> None:
    """Blocks until the last save is finalized and its manifest written."""
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001
      raise self._save_error(None, e) from e
    if self._manifest_thread is not None:
      self._manifest_thread.join()
      self._manifest_thread = None
    self._raise_manifest_error()

  def _save_error(self, step: Optional[int], error: Exception) -> CheckpointError:
    kept = [s for s in self._reloaded_steps() if s != step]
    intact = (f"the previous checkpoint (step {max(kept)}) is intact" if kept
              else "no earlier checkpoint exists")
    which = f"step {step}" if step is not None else "the last step"
    return CheckpointError(f"saving checkpoint {which} in {self.directory} failed: "
                           f"{type(error).__name__}: {error}; {intact}. Free disk space or fix "
                           f"the storage, then rerun the same command to resume.")

  def _start_manifest(self, step: int) -> None:
    if self._manifest_thread is not None:
      self._manifest_thread.join()

    def run():
      try:
        self._manager.wait_until_finished()
        if os.path.isdir(self.step_dir(step)):
          write_manifest(self.step_dir(step), self.cfg.checksums)
      except BaseException as e:  # noqa: BLE001 - handed to the main thread by _raise_...
        self._manifest_error = e

    self._manifest_thread = threading.Thread(target=run, name=f"manifest-{step}", daemon=True)
    self._manifest_thread.start()

  def _raise_manifest_error(self) -> None:
    if self._manifest_error is not None:
      error, self._manifest_error = self._manifest_error, None
      raise CheckpointError(f"finishing a checkpoint in {self.directory} failed: "
                            f"{type(error).__name__}: {error}") from error

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict, dict]:
    """(state, data iterator state, metadata) of `step`, in `abstract_state`'s shardings."""
    self._check_structure(step, abstract_state)
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=ocp.args.JsonRestore(),
        metadata=ocp.args.JsonRestore(),
    ))
    return restored["state"], restored["data"], dict(restored["metadata"] or {})

  def _check_structure(self, step: int, abstract_state: Any) -> None:
    """A checkpoint whose arrays differ from the config's (a changed model or optimizer) is a
    config error, not corruption: say which array differs instead of falling back."""
    try:
      stored = self._manager.item_metadata(step)["state"]
    except Exception:  # noqa: BLE001 - unreadable metadata is corruption, found by restore
      return
    if stored is None:
      return
    mismatch = first_shape_mismatch(stored, abstract_state)
    if mismatch is not None:
      raise mismatch_error(self.directory, step, mismatch)

  def restore_latest(self, abstract_state: Any, log: Callable[[str], None]) -> Optional[Restored]:
    """Restores the newest good step, moving corrupt newer ones aside; None without checkpoints.

    Process 0 verifies manifests and decides; every process then restores, and a read error on
    any process counts as corruption of that step.
    """
    lost = []
    for step in sorted(self._reloaded_steps(), reverse=True):
      problem = _from_process_0(lambda: self._problem(step))
      restored = None
      if not problem:
        try:
          restored = self.restore(step, abstract_state)
        except ConfigError:
          raise
        except Exception as e:  # noqa: BLE001 - reported, and the step is moved aside
          problem = f"restore failed: {type(e).__name__}: {str(e)[:300]}"
      if _agree_all(not problem):
        state, data_state, metadata = restored
        if lost:
          log(f"mai-jax: restored step {step} instead of the corrupt newer checkpoint(s) "
              f"{', '.join(str(s) for s, _ in lost)}: steps {step + 1}..{lost[0][0]} are lost "
              f"and will be recomputed")
        return Restored(step, state, data_state, metadata, tuple(lost))
      problem = problem or "restore failed on another process"
      log(f"mai-jax: checkpoint step {step} is corrupt ({problem}); moved to "
          f"{self.step_dir(step)}{CORRUPT_SUFFIX}")
      self._quarantine(step, problem)
      lost.append((step, problem))
    if lost:
      raise CheckpointError(
          f"no restorable checkpoint in {self.directory}: "
          + "; ".join(f"step {s}: {p}" for s, p in lost)
          + f". They were moved aside as STEP{CORRUPT_SUFFIX}; rerun to start from scratch, or "
            f"restore them by hand")
    return None

  def _problem(self, step: int) -> str:
    status, detail = verify_step(self.step_dir(step))
    return detail if status == "corrupt" else ""

  def _quarantine(self, step: int, reason: str) -> None:
    """Renames a corrupt step out of orbax's sight (keeps its bytes), then reopens the manager."""
    if jax.process_index() == 0:
      target = self.step_dir(step) + CORRUPT_SUFFIX
      suffix = 1
      while os.path.exists(target):
        target = f"{self.step_dir(step)}{CORRUPT_SUFFIX}{suffix}"
        suffix += 1
      os.replace(self.step_dir(step), target)
      with open(os.path.join(target, "REASON"), "w") as f:
        f.write(reason + "\n")
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"mai_jax quarantine {step}")
    self._manager.close()
    self._manager = self._open()

  def close(self) -> None:
    try:
      self.wait()
    finally:
      self._manager.close()


def mismatch_error(directory: str, step: int, mismatch: tuple, hint: str = "",
                   advice: str = "the run's own config (its config.json)") -> ConfigError:
  """The one wording for 'this checkpoint is not this config', wherever the check runs."""
  key, have, want = mismatch
  return ConfigError(
      f"checkpoint step {step} in {directory} does not match the config: state/{key} is {have} in "
      f"the checkpoint and {want} in the config{hint}; resume with {advice} or use a new --workdir")


def first_shape_mismatch(stored: Any, wanted: Any) -> Optional[tuple[str, Any, Any]]:
  """(path, stored shape, wanted shape) of the first array, by path, whose shape differs between
  a checkpoint's metadata tree and a target tree ('absent' where one side lacks it); else None."""
  want = {_path_name(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(wanted)}
  have = {_path_name(p): tuple(getattr(x, "shape", ()) or ())
          for p, x in jax.tree_util.tree_leaves_with_path(stored)}
  for key in sorted(set(want) | set(have)):
    if want.get(key) != have.get(key):
      return key, have.get(key, "absent"), want.get(key, "absent")
  return None


def _read_only_manager(directory: str) -> ocp.CheckpointManager:
  """A manager for reading: creates nothing, cleans nothing (readers leave a workdir as it is)."""
  handlers = {"state": ocp.PyTreeCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
              "config": ocp.JsonCheckpointHandler(), "metadata": ocp.JsonCheckpointHandler()}
  options = ocp.CheckpointManagerOptions(create=False)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options,
                               item_handlers=handlers)


def stored_state_tree(directory: str, step: int) -> Any:
  """The array metadata tree (shapes, dtypes) of item `state` of checkpoint `step`: nothing is
  read but metadata, so a reader can compare shapes before it restores anything."""
  manager = _read_only_manager(directory)
  try:
    return manager.item_metadata(step)["state"]
  finally:
    manager.close()


def stored_json(directory: str, step: int, item: str) -> Optional[dict]:
  """The JSON item `item` ('config' or 'metadata') of checkpoint `step`; None where the step has
  none (an old params-only checkpoint). The `config` item is the config the arrays were written
  with, so it, not WORKDIR/config.json, is the source of truth for what the checkpoint holds."""
  if not os.path.isdir(os.path.join(os.path.abspath(directory), str(step), item)):
    return None
  manager = _read_only_manager(directory)
  try:
    value = manager.restore(step, args=ocp.args.Composite(**{item: ocp.args.JsonRestore()}))[item]
  finally:
    manager.close()
  return dict(value) if value is not None else None


def params_shape_mismatch(directory: str, step: int,
                          abstract_params: Any) -> Optional[tuple[str, Any, Any]]:
  """`first_shape_mismatch` between `state.params` of checkpoint `step` (a training or a
  params-only checkpoint) and `abstract_params`, read from the checkpoint's metadata alone."""
  stored = stored_state_tree(directory, step)
  return first_shape_mismatch(dict(stored)["params"], abstract_params)


def stored_param_shapes(directory: str, step: int, like: Any) -> Any:
  """The shapes (tuples) of `state.params` of checkpoint `step`, as a tree shaped like `like`
  (read from metadata alone)."""
  stored = dict(stored_state_tree(directory, step))["params"]
  have = {_path_name(p): tuple(getattr(x, "shape", ()) or ())
          for p, x in jax.tree_util.tree_leaves_with_path(stored)}
  return jax.tree_util.tree_map_with_path(lambda p, _: have[_path_name(p)], like)


def good_steps(directory: str) -> list[int]:
  """The finalized steps of a checkpoint directory that are ok or unverified, oldest first."""
  return sorted(s.step for s in list_checkpoints(directory)
                if s.status in ("ok", "unverified") and s.name.isdigit())


def restore_params(directory: str, step: int, abstract_params: Any) -> Any:
  """Restores only `state.params` of checkpoint `step` into `abstract_params`' shapes/shardings.

  Evaluation and sampling need no optimizer state, so they never build or read it: orbax's
  partial restore reads the params subtree alone, from a training checkpoint (a full TrainState)
  or from a params-only one written by `save_params`.
  """
  manager = ocp.CheckpointManager(os.path.abspath(directory),
                                  item_handlers={"state": ocp.PyTreeCheckpointHandler()})
  target = {"params": abstract_params}
  args = ocp.args.PyTreeRestore(target, partial_restore=True,
                                restore_args=ocp.checkpoint_utils.construct_restore_args(target))
  try:
    return manager.restore(step, args=ocp.args.Composite(state=args))["state"]["params"]
  finally:
    manager.close()


def save_params(directory: str, step: int, params: Any, config: dict, metadata: dict) -> None:
  """Writes a params-only checkpoint (item `state` = {'params': ...}), e.g. imported weights;
  `restore_params` reads it. Synchronous: returns once it is on disk."""
  manager = ocp.CheckpointManager(
      os.path.abspath(directory), options=ocp.CheckpointManagerOptions(create=True),
      item_handlers={"state": ocp.StandardCheckpointHandler(),
                     "config": ocp.JsonCheckpointHandler(),
                     "metadata": ocp.JsonCheckpointHandler()})
  manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave({"params": params}),
                                             config=ocp.args.JsonSave(config),
                                             metadata=ocp.args.JsonSave(metadata)), force=True)
  manager.wait_until_finished()
  manager.close()
  if jax.process_index() == 0:
    write_manifest(os.path.join(os.path.abspath(directory), str(step)), checksums=True)


def latest_step(directory: str) -> Optional[int]:
  """The newest finalized step under `directory`, or None (no manager with write options)."""
  if not os.path.isdir(directory):
    return None
  manager = ocp.CheckpointManager(os.path.abspath(directory))
  try:
    return manager.latest_step()
  finally:
    manager.close()
