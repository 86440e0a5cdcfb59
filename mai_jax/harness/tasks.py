"""Running lm-eval tasks on a mai_jax model: the code `mai-jax eval --tasks` and train.eval_tasks
share.

Tasks are found in `include_path` (a folder of lm-eval YAML files, e.g. with `dataset_path: json`
and local `data_files`) and, only when a name is not there, among lm-eval's own ~10k task
definitions (indexing them takes ~20 s; their datasets download from the Hub on first use).
Whatever goes wrong in finding or loading a task (unknown name, unreadable YAML, missing data
file) is one ConfigError naming the task and the fix, raised before any model is scored.

lm_eval.evaluator.evaluate is called directly rather than simple_evaluate: the latter imports
torch to seed it and collects environment information, seconds that buy nothing here.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

from mai_jax.config import Config, ConfigError

FEWSHOT_SEED = 1234  # lm-eval's default few-shot sampling seed


def _import_lm_eval():
  try:
    import lm_eval.evaluator  # noqa: F401  pylint: disable=import-outside-toplevel
    from lm_eval.tasks import TaskManager  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ConfigError(f"lm-evaluation-harness tasks need the `lmeval` extra ({e}): "
                      f"pip install 'mai_jax[lmeval]'") from None
  return TaskManager


def split_names(specs: Sequence[str]) -> list[str]:
  """['a,b', 'c'] -> ['a', 'b', 'c'] (the CLI accepts both spellings)."""
  return [n.strip() for spec in specs for n in str(spec).split(",") if n.strip()]


def task_manager(names: Sequence[str], include_path: Optional[str] = None):
  """A TaskManager that knows every name: include_path alone when it holds them all."""
  TaskManager = _import_lm_eval()
  if include_path and not os.path.isdir(include_path):
    raise ConfigError(f"--include-path {include_path}: no such directory (a folder of lm-eval "
                      f"task YAML files)")
  manager = TaskManager(include_path=include_path, include_defaults=False) if include_path \
      else None
  local = set(manager.all_tasks) if manager is not None else set()
  elsewhere = [n for n in names if n not in local]
  unknown = [n for n in elsewhere if n not in _mentioned_by_defaults(elsewhere)]
  if elsewhere and not unknown:
    manager = TaskManager(include_path=include_path)
    unknown = [n for n in names if n not in manager.all_tasks]
  if unknown:
    broken = _unparsable(include_path, unknown) if include_path else None
    if broken:
      raise ConfigError(f"unknown lm-eval task(s) {', '.join(unknown)}: {broken[0]} does not "
                        f"parse as YAML ({broken[1]}); fix it")
    where = f"in {include_path} or " if include_path else ""
    raise ConfigError(f"unknown lm-eval task(s) {', '.join(unknown)}: none is defined "
                      f"{where}among lm-eval's tasks; check the name (`lm_eval ls tasks`) or "
                      f"the YAML's `task:` key, and pass its folder with --include-path")
  return manager


def _unparsable(include_path: str, names: Sequence[str]) -> Optional[tuple[str, str]]:
  """(file, error) of the first YAML file in include_path that mentions one of `names` and does
  not parse (lm-eval skips such files silently, so the task just looks unknown)."""
  import glob  # pylint: disable=import-outside-toplevel

  import yaml  # pylint: disable=import-outside-toplevel

  class AnyTag(yaml.SafeLoader):  # lm-eval YAML uses tags such as !function
    pass
  AnyTag.add_multi_constructor("", lambda loader, suffix, node: None)
  for path in sorted(glob.glob(os.path.join(include_path, "**", "*.y*ml"), recursive=True)):
    with open(path, encoding="utf-8", errors="replace") as f:
      text = f.read()
    if not any(n in text for n in names):
      continue
    try:
      yaml.load(text, Loader=AnyTag)  # noqa: S506  (a SafeLoader subclass)
    except yaml.YAMLError as e:
      return path, " ".join(str(e).split())[:160]
  return None


def _mentioned_by_defaults(names: Sequence[str]) -> set[str]:
  """The names some YAML file of lm-eval's own tasks mentions: a plain text scan (~1 s), so an
  unknown name is refused without the ~20 s TaskManager index of those files."""
  import glob  # pylint: disable=import-outside-toplevel
  import re  # pylint: disable=import-outside-toplevel

  import lm_eval.tasks  # pylint: disable=import-outside-toplevel
  if not names:
    return set()
  pattern = re.compile(r"(?<![\w-])(" + "|".join(map(re.escape, names)) + r")(?![\w-])")
  found: set[str] = set()
  root = os.path.dirname(lm_eval.tasks.__file__)
  for path in glob.glob(os.path.join(root, "**", "*.yaml"), recursive=True):
    with open(path, encoding="utf-8", errors="replace") as f:
      found.update(pattern.findall(f.read()))
    if len(found) == len(set(names)):
      break
  return found


def _first_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


def load_tasks(names: Sequence[str], include_path: Optional[str] = None, *,
               num_fewshot: Optional[int] = None, manager=None):
  """lm-eval's loaded task dict for `names`, datasets read; a bad task is a ConfigError.
  `manager`: a task_manager(names, include_path) to reuse (indexing lm-eval's tasks is slow)."""
  manager = manager if manager is not None else task_manager(names, include_path)
  loaded = {"tasks": {}}
  for name in names:  # one at a time, so an error names its task
    try:
      one = manager.load([name])
    except Exception as e:  # pylint: disable=broad-except  (YAML, datasets, jinja: many kinds)
      raise ConfigError(f"lm-eval task {name} does not load ({_first_line(e)}); fix its YAML or "
                        f"data files" + (f" in {include_path}" if include_path else "")) from None
    if not loaded["tasks"]:
      loaded = one
    else:
      for key, value in one.items():
        loaded[key].update(value) if isinstance(value, dict) else loaded[key].extend(value)
  for task in loaded["tasks"].values():
    if num_fewshot is not None and task.get_config("num_fewshot") != 0:
      task.set_config(key="num_fewshot", value=num_fewshot)
    elif task.get_config("num_fewshot") is None:
      task.set_config(key="num_fewshot", value=0)
    task.set_fewshot_seed(seed=FEWSHOT_SEED)
  return loaded


def run(lm, loaded, *, limit: Optional[int] = None, log_samples: bool = False) -> dict:
  """lm_eval's results dict ('results', 'samples' with log_samples, ...) of `lm` on `loaded`."""
  from lm_eval import evaluator  # pylint: disable=import-outside-toplevel
  results = evaluator.evaluate(lm=lm, task_dict=loaded, limit=limit or None,
                               log_samples=log_samples, bootstrap_iters=0, verbosity="WARNING")
  if results is None:
    raise RuntimeError("lm_eval returned no results on this process")
  return results


def summarize(results: dict) -> dict[str, dict[str, float]]:
  """{task: {metric: value}}: numeric metrics, lm-eval's 'acc,none' keys as 'acc' (a filter
  other than 'none' stays as 'exact_match,strict-match'), stderr dropped."""
  out = {}
  for task, metrics in results["results"].items():
    row = {}
    for key, value in metrics.items():
      if not isinstance(value, (int, float)) or isinstance(value, bool) or "_stderr" in key:
        continue
      metric, _, filt = key.partition(",")
      row[metric if filt in ("", "none") else key] = float(value)
    out[task] = row
  return out


def format_table(step: int, summary: dict[str, dict[str, float]]) -> str:
  lines = [f"step {step}: lm-eval tasks"]
  width = max((len(t) for t in summary), default=4)
  for task, metrics in summary.items():
    shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "sample_len")
    lines.append(f"{task:<{width}}  {shown}")
  return "\n".join(lines)


def evaluate_workdir(workdir: str, tasks: Sequence[str], *, include_path: Optional[str] = None,
                     cfg: Optional[Config] = None, step: Optional[int] = None,
                     limit: Optional[int] = None, num_fewshot: Optional[int] = None,
                     batch_size: Optional[int] = None, progress: bool = True) -> dict:
  """`mai-jax eval --tasks`: lm-eval tasks on checkpoint `step` (default: the latest good one);
  {'step', 'tasks': {task: {metric: value}}}, also written to WORKDIR/eval.json."""
  from mai_jax import evaluate as evaluate_lib  # pylint: disable=import-outside-toplevel
  from mai_jax import workdir as workdir_lib  # pylint: disable=import-outside-toplevel
  from mai_jax.harness.model import MaiJaxLM  # pylint: disable=import-outside-toplevel

  loaded = load_tasks(split_names(tasks), include_path, num_fewshot=num_fewshot)
  cfg, model, step, mesh = workdir_lib.load_model(workdir, cfg=cfg, step=step)
  lm = MaiJaxLM.from_model(cfg, model, workdir_lib.load_tokenizer(cfg, workdir), mesh, step,
                           batch_size=batch_size, progress=progress)
  summary = summarize(run(lm, loaded, limit=limit))
  results = {"step": step, "harness": summary}
  evaluate_lib.write_results(workdir, results)
  return results


class TrainEvals:
  """train.eval_tasks during training: the tasks are loaded (and so checked) when the run is
  built; `run(model)` scores the current params and returns {'tasks/TASK/METRIC': value}."""

  def __init__(self, cfg: Config, mesh, tokenizer):
    import jax  # pylint: disable=import-outside-toplevel
    t = cfg.train
    if jax.process_count() > 1:
      raise ConfigError("train.eval_tasks runs on one process only for now; drop it for "
                        "multi-host runs and evaluate checkpoints with `mai-jax eval --tasks`")
    self.cfg, self.mesh, self.tokenizer = cfg, mesh, tokenizer
    self.names = split_names(t.eval_tasks)
    self.include_path = t.eval_tasks_path or None
    self.limit = t.eval_tasks_limit or None
    self.manager = task_manager(self.names, self.include_path)
    load_tasks(self.names, self.include_path, manager=self.manager)  # a bad task refuses the run

  def run(self, model) -> dict[str, float]:
    from mai_jax.harness.model import MaiJaxLM  # pylint: disable=import-outside-toplevel
    lm = MaiJaxLM.from_model(self.cfg, model, self.tokenizer, self.mesh,
                             batch_size=self.cfg.train.global_batch_size, progress=False)
    loaded = load_tasks(self.names, self.include_path, manager=self.manager)
    summary = summarize(run(lm, loaded, limit=self.limit))
    return {f"tasks/{task}/{metric}": value for task, metrics in summary.items()
            for metric, value in metrics.items() if metric != "sample_len"}
