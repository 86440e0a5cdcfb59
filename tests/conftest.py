"""Test setup: 8 fake CPU devices and fast-compile XLA flags (set before jax is imported), a
shared compilation cache and strict rank promotion."""

import os

from cli_runs import xla_flags  # a plain module: importing it does not import jax

os.environ["XLA_FLAGS"] = xla_flags(8, os.environ.get("XLA_FLAGS", ""))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# XLA's CPU compiles are most of the suite's time, and many tests (and the CLI runs they start, which
# inherit this environment) compile the same tiny programs: a persistent compilation cache in the
# checkout (gitignored; CI's fresh clone starts it cold) compiles each of them once per suite.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".jax_test_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax  # noqa: E402  (must follow the XLA_FLAGS above)
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: long end-to-end tests (run by .ci/run via `make test`)")


@pytest.fixture(autouse=True)
def _reset_mesh():
  """Each test starts with no mesh set, whatever the previous test did."""
  yield
