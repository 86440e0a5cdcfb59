"""`mai-jax ... --help`: every (sub)command shows its defaults and points at the config table.

argparse's ArgumentDefaultsHelpFormatter alone prints '(default: None)' for required flags and
nothing for arguments without help text; this fills both gaps once for the whole parser tree.
"""

from __future__ import annotations

import argparse


CONFIG_TABLE = ("config keys: the 'Config sections' table of README.md (fields and defaults: "
                "mai_jax/config.py; `mai-jax config show --config ...` prints a resolved config)")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
  """Shows '(default: X)' where there is a default to show (not for None, flags or required)."""

  def _get_help_string(self, action):
    if action.default is None or action.default is False or action.required:
      return action.help
    return super()._get_help_string(action)

  def _fill_text(self, text, width, indent):  # keep the epilogs' paragraphs
    fill = super()._fill_text  # zero-argument super() does not work inside a generator
    return "\n\n".join(fill(p, width, indent) for p in text.split("\n\n"))


def with_defaults_in_help(parser: argparse.ArgumentParser) -> None:
  """Every (sub)command's --help shows defaults and points at the config table."""
  parser.formatter_class = _HelpFormatter
  for action in parser._actions:  # pylint: disable=protected-access
    if action.help is None and action.default is not None and not action.required:
      action.help = "(default: %(default)s)"  # argparse shows no line at all for help=None
    if isinstance(action, argparse._SubParsersAction):  # pylint: disable=protected-access
      for child in action.choices.values():
        child.epilog = f"{child.epilog}\n\n{CONFIG_TABLE}" if child.epilog else CONFIG_TABLE
        with_defaults_in_help(child)
