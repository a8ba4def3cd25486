"""The public surface: every exported name exists and the package carries its version."""

import optaxderived as od


def test_all_names_are_exported():
  assert len(od.__all__) == len(set(od.__all__))
  for name in od.__all__:
    assert hasattr(od, name), name


def test_version():
  assert od.__version__.count(".") == 2
