"""The public surface: the names of the API contract, exported once each, and the version."""

import inspect

import optax

import optaxderived as od

# Every name `../shared/API.md` promises at the package root.
CONTRACT = """
  AccumulateState BOSH3 ButcherTableau ClipNormState DOPRI5 EULER HEUN LookaheadState MIDPOINT
  RALSTON RK4 RowSparse accumulate apply_updates as_transformation clip_norm derive
  eg_plus_minus eg_step_size ema_params euler exponentiated_gradient has_updated heun
  layer_adaptation lazy lookahead lookahead_params midpoint param_ema path_mask
  piecewise_linear ralston rk23 rk4 rk45 row_sparse_grad runge_kutta scale_by_path
  transform_by_path weight_decay
""".split()


def test_the_contract_is_exported():
  missing = [name for name in CONTRACT if name not in od.__all__ or not hasattr(od, name)]
  assert not missing


def test_all_names_are_exported_once():
  assert len(od.__all__) == len(set(od.__all__))
  for name in od.__all__:
    assert hasattr(od, name), name


def test_every_public_function_is_documented_with_an_example():
  for name in od.__all__:
    obj = getattr(od, name)
    if inspect.isfunction(obj) and not isinstance(obj, optax.GradientTransformation):
      assert obj.__doc__ and ">>>" in obj.__doc__, f"od.{name} has no doctest example"


def test_version():
  assert od.__version__.count(".") == 2
