"""`python -m mai_jax` is the same as the `mai-jax` console script."""

import sys

from mai_jax.cli import main

sys.exit(main())
