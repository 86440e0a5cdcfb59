"""Discoverability: `config show` (and --diff), --version, --help with defaults."""

import argparse
import json
import os

import pytest

import mai_jax
from mai_jax import cli
from mai_jax import config as C

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(REPO, "experiments", "tiny.py") + ":smoke"


def test_config_show_prints_the_resolved_config_with_overrides(capsys):
  assert cli.main(["config", "show", "--config", SMOKE, "--config.train.num_steps=3"]) == 0
  shown = json.loads(capsys.readouterr().out)
  assert shown["train"]["num_steps"] == 3 and shown["model"]["d_model"] == 64  # override, variant
  assert C.from_dict(shown) == C.apply_overrides(C.load_experiment(SMOKE), {"train.num_steps": "3"})


def test_config_show_diff_lists_what_differs_from_the_defaults_as_replayable_overrides(capsys):
  assert cli.main(["config", "show", "--config", SMOKE, "--diff", "--config.train.seed=7"]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert "--config.train.seed=7  # default 0" in lines
  assert not any(line.startswith("--config.model.num_heads=") for line in lines)  # 4 = default
  # Replaying the lines on the defaults rebuilds the resolved config: the diff is complete.
  _, overrides = cli.split_overrides([line.split("  # ")[0] for line in lines])
  expected = C.apply_overrides(C.load_experiment(SMOKE), {"train.seed": "7"})
  assert C.apply_overrides(C.Config(), overrides) == expected


def test_config_show_reads_a_workdir(tmp_path, capsys):
  cfg = C.apply_overrides(C.Config(), {"model.d_model": "96"})
  (tmp_path / "config.json").write_text(C.to_json(cfg))
  assert cli.main(["config", "show", "--workdir", str(tmp_path)]) == 0
  assert C.from_dict(json.loads(capsys.readouterr().out)) == cfg
  assert cli.main(["config", "show"]) == 2
  assert "needs --config" in capsys.readouterr().err


def test_version(capsys):
  with pytest.raises(SystemExit) as exit_info:
    cli.main(["--version"])
  assert exit_info.value.code == 0
  assert capsys.readouterr().out.strip() == f"mai-jax {mai_jax.__version__}"


def _commands(parser, prefix=()):
  for action in parser._actions:  # pylint: disable=protected-access
    if isinstance(action, argparse._SubParsersAction):  # pylint: disable=protected-access
      for name, child in action.choices.items():
        yield from _commands(child, prefix + (name,))
        if not any(isinstance(a, argparse._SubParsersAction) for a in child._actions):
          yield prefix + (name,)


COMMANDS = sorted(set(_commands(cli._parser())))  # pylint: disable=protected-access


def test_every_command_is_covered():
  assert {("train",), ("data", "inspect"), ("distill", "cache")} <= set(COMMANDS)
  assert len(COMMANDS) == 15


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_help_points_at_the_config_table_and_shows_defaults(command, capsys):
  with pytest.raises(SystemExit):
    cli.main(list(command) + ["--help"])
  text = capsys.readouterr().out
  assert "'Config sections' table of README.md" in text
  parser = cli._parser()  # pylint: disable=protected-access
  for name in command:
    parser = next(a for a in parser._actions  # pylint: disable=protected-access
                  if isinstance(a, argparse._SubParsersAction)).choices[name]
  for action in parser._actions:  # pylint: disable=protected-access
    if action.default not in (None, False, argparse.SUPPRESS) and not action.required:
      assert f"(default: {action.default})" in text, (command, action.dest)
