"""Test configuration shared by the unit tests and the doctests.

Tests that need several devices use the 8 host devices forced here, before JAX starts.
Doctests import what they use, so each runs as written when copied.
"""

import os

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
