"""Test configuration shared by the unit tests, the doctests and the notebooks.

Tests that need several devices use the 8 host devices forced here, before JAX starts.
"""

import os

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
import pytest  # noqa: E402

import optaxderived as od  # noqa: E402


@pytest.fixture(autouse=True)
def _doctest_namespace(doctest_namespace):
  """Doctests see `jax`, `jnp`, `optax` and `od` without importing them."""
  doctest_namespace.update(jax=jax, jnp=jnp, optax=optax, od=od)
