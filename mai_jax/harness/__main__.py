"""`python -m mai_jax.harness ARGS`: lm_eval's own command line with the `mai_jax` model
registered (lm_eval 0.4.13 loads no model plugins by itself), e.g.

  python -m mai_jax.harness --model mai_jax --model_args workdir=runs/tiny \\
      --tasks arc_easy,hellaswag --batch_size 16

A bad workdir or model argument is one line `mai-jax: error: ...`, exit 2.
"""

from __future__ import annotations

import sys

from mai_jax.config import ConfigError


def main() -> int:
  import mai_jax.harness.model  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  from lm_eval.__main__ import cli_evaluate  # pylint: disable=import-outside-toplevel
  try:
    cli_evaluate()
  except ConfigError as e:
    print(f"mai-jax: error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
