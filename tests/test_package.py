"""The public surface: the namespace of the API contract, each name once, and the version."""

import inspect
import subprocess
import sys

import optax

import optaxderived as od

# What the root holds: what goes into optax.chain, its states and accessors, the path helpers,
# the schedules (piecewise_linear, the EMA decays) and derive.
ROOT = """
  AccumulateState ClipNormState EGPlusMinusState EGStepSizeState ExponentiatedGradientState
  LazyState LearningRateState LookaheadState ParamEmaState Patterns ScaleByPathState
  WeightDecayState accumulate clip_norm derive eg_plus_minus eg_step_size ema_params
  exponentiated_gradient has_updated layer_adaptation lazy learning_rate lookahead
  lookahead_params param_ema path_mask piecewise_linear scale_by_path transform_by_path
  tree_paths weight_decay
  AutoClipState LossScaleState SkipSpikesState ZClipState adaptive_grad_clip autoclip
  dynamic_loss_scale has_skipped loss_scale skip_spikes zclip
  SWAState ema_warmup power_ema_decay swa swa_params
  shard_state
""".split()
SUBMODULES = {
  "ode": """
    ButcherTableau EULER HEUN MIDPOINT RALSTON RK4 BOSH3 DOPRI5 Stepper StepperState StepInfo
    runge_kutta euler heun midpoint ralston rk4 rk23 rk45 as_transformation apply_gradients
  """.split(),
  "sparse": "RowSparse apply_updates row_sparse_grad".split(),
  "regularizers": """
    gradient_penalty rademacher_gradient_penalty vat_perturbation vat_loss
  """.split(),
}


def test_the_root_holds_exactly_the_chainable_pieces_and_their_helpers():
  assert sorted(od.__all__) == sorted(ROOT)


def test_each_submodule_holds_its_names_and_none_is_in_two_places():
  seen = set(od.__all__)
  for name, names in SUBMODULES.items():
    module = getattr(od, name)
    assert sorted(module.__all__) == sorted(names), name
    assert not seen & set(names), seen & set(names)
    seen |= set(names)
    for n in names:
      assert hasattr(module, n), f"od.{name}.{n}"


def test_all_names_are_exported_once():
  for module in (od, od.ode, od.sparse, od.regularizers):
    assert len(module.__all__) == len(set(module.__all__))
    for name in module.__all__:
      assert hasattr(module, name), name


def test_every_public_function_is_documented_with_an_example():
  for module in (od, od.ode, od.sparse, od.regularizers):
    for name in module.__all__:
      obj = getattr(module, name)
      if inspect.isfunction(obj) and not isinstance(obj, optax.GradientTransformation):
        assert obj.__doc__ and ">>>" in obj.__doc__, f"{module.__name__}.{name} has no example"


def test_signatures_show_short_type_names():
  """``help(od.derive)`` shows ``paths.Patterns``, not the expanded union of every type."""
  for module in (od, od.ode, od.sparse, od.regularizers):
    for name in module.__all__:
      obj = getattr(module, name)
      if inspect.isfunction(obj):
        for parameter in inspect.signature(obj).parameters.values():
          annotation = str(parameter.annotation)
          assert len(annotation) <= 60, (name, parameter.name, annotation)
          assert "typing.Union" not in annotation and "jax._src" not in annotation, name


def test_the_submodules_import_on_their_own():
  code = "import optaxderived.ode, optaxderived.sparse, optaxderived.regularizers"
  subprocess.run([sys.executable, "-c", code], check=True)


def test_version():
  assert od.__version__.count(".") == 2
