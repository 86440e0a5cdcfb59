"""Test setup: 8 fake CPU devices (set before jax is imported) and strict rank promotion."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  (must follow the XLA_FLAGS above)
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: long end-to-end tests (run by .ci/run via `make test`)")


@pytest.fixture(autouse=True)
def _reset_mesh():
  """Each test starts with no mesh set, whatever the previous test did."""
  yield
