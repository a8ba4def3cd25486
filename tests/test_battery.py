"""The production battery: every public transformation under the conditions of real runs.

One parametrised battery over every transformation of the library (and representative
``od.derive`` recipes), in the spirit of optax's ``_common_test.py``: abstract and jitted init,
sharding over the 8 host devices, orbax checkpoints, dtypes and recompilation, bad inputs
(hyperparameters, trees, NaN/Inf gradients) and property tests of each family's invariants.

Every case runs the same loss: ``L(θ) = ½ Σ m ⊙ (θ − t)²`` over a small tree, where the mask
``m`` zeroes every other row of the embedding table (so ``od.lazy`` sees untouched rows) and
``grad_fn = ∇L`` is the gradient the ODE steppers evaluate at their stage points.
"""

import functools
import math
import re
from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from helpers import assert_trees_close
from helpers import shapes_and_dtypes
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import optaxderived as od

# ---------------------------------------------------------------------------------------------
# The cases.


class Case(NamedTuple):
  make: Callable[[], optax.GradientTransformation]
  # The transformation names an error about mismatched trees may carry (None: the
  # transformation neither reads params nor keeps param-shaped state, nothing to mismatch).
  names: tuple[str, ...] | None
  positive: bool = False  # positive params (exponentiated gradient)
  grad_fn: bool = False  # update needs grad_fn= (ODE steppers)
  nan: str = "nonfinite"  # what a NaN gradient does without apply_if_finite (documented)


_ADAM = lambda: optax.adam(1e-2)  # noqa: E731

CASES = {
  "accumulate": Case(lambda: od.accumulate(_ADAM(), 2), ("od.accumulate",)),
  "accumulate_skip_nonfinite": Case(
    lambda: od.accumulate(_ADAM(), 2, skip_nonfinite=True), ("od.accumulate",), nan="skipped"
  ),
  "accumulate_skip_if_sum": Case(
    lambda: od.accumulate(
      _ADAM(), 2, skip_if=lambda g, p: optax.tree.norm(g) > 1e6, reduction="sum"
    ),
    ("od.accumulate",),
  ),
  "lookahead": Case(lambda: od.lookahead(_ADAM(), 2, 0.5), ("od.lookahead",)),
  "param_ema": Case(lambda: optax.chain(optax.sgd(0.1), od.param_ema(0.9)), ("od.param_ema",)),
  "param_ema_scheduled": Case(
    lambda: optax.chain(
      optax.sgd(0.1),
      od.param_ema(od.ema_warmup(0.99), debias=False, start_step=1, every=2, overwrite_every=3),
    ),
    ("od.param_ema",),
  ),
  "param_ema_power": Case(
    lambda: optax.chain(
      optax.sgd(0.1), od.param_ema(od.power_ema_decay(0.1), every=2, overwrite_every=2)
    ),
    ("od.param_ema",),
  ),
  "swa": Case(lambda: optax.chain(optax.sgd(0.1), od.swa(start_step=1, every=2)), ("od.swa",)),
  "lazy": Case(lambda: od.lazy(_ADAM()), ("od.lazy",)),
  "lazy_freeze": Case(lambda: od.lazy(_ADAM(), include="emb", freeze_state=True), ("od.lazy",)),
  "clip_norm": Case(lambda: od.clip_norm(1.0), None),
  "clip_norm_soft_row": Case(lambda: od.clip_norm(1.0, soft=True, scope="row"), None),
  "zclip": Case(lambda: optax.chain(od.zclip(warmup_steps=2), optax.sgd(0.1)), None),
  # No rule: the state follows the params (tests/test_shard_state.py shards it).
  "shard_state": Case(
    lambda: od.shard_state(_ADAM(), lambda path, p: None), ("od.shard_state",)
  ),
  "zclip_reciprocal": Case(
    lambda: optax.chain(od.zclip(1.0, warmup_steps=1, reciprocal=True), _ADAM()), None
  ),
  "autoclip": Case(lambda: optax.chain(od.autoclip(), optax.sgd(0.1)), None),
  # (a window whose length is no param's shape: the battery tells state leaves by shape)
  "autoclip_window": Case(lambda: optax.chain(od.autoclip(50.0, window=5), _ADAM()), None),
  "adaptive_grad_clip": Case(
    lambda: optax.chain(od.adaptive_grad_clip(0.01, exclude="bias"), optax.sgd(0.1)),
    ("od.adaptive_grad_clip",),
  ),
  "skip_spikes": Case(
    lambda: od.skip_spikes(_ADAM(), window=4, min_history=2), ("od.skip_spikes",), nan="skipped"
  ),
  "dynamic_loss_scale": Case(
    lambda: od.dynamic_loss_scale(_ADAM()), ("od.dynamic_loss_scale",), nan="skipped"
  ),
  "dynamic_loss_scale_grow": Case(
    lambda: od.dynamic_loss_scale(_ADAM(), initial_scale=2.0**10, growth_interval=1),
    ("od.dynamic_loss_scale",),
    nan="skipped",
  ),
  "scale_by_path": Case(
    lambda: optax.chain(od.scale_by_path({"kernel": 0.5, "bias": 2.0}), optax.sgd(0.1)), None
  ),
  "transform_by_path": Case(
    lambda: od.transform_by_path({"emb": _ADAM()}, default=optax.sgd(0.1)),
    ("od.transform_by_path",),
  ),
  "weight_decay": Case(
    lambda: optax.chain(od.weight_decay(0.01, exclude="bias"), optax.sgd(0.1)),
    ("od.weight_decay",),
  ),
  "layer_adaptation": Case(
    lambda: optax.chain(od.layer_adaptation(exclude="bias"), optax.sgd(0.1)),
    ("od.layer_adaptation",),
  ),
  "derive_bert": Case(
    lambda: od.derive(
      1e-2,
      bias_correction=False,
      weight_decay=0.01,
      exclude_from_weight_decay=["bias"],
      layer_adaptation=True,
      exclude_from_layer_adaptation=["bias"],
      lr_schedule={2: 1.0, 100: 0.0},
      grad_accum_steps=2,
    ),
    ("od.derive",),
  ),
  "derive_full": Case(
    lambda: od.derive(
      1e-2, clip=1.0, paramwise_lr={"bias": 2.0}, lookahead=(2, 0.5), ema=0.9, lazy="emb"
    ),
    ("od.derive",),
  ),
  "exponentiated_gradient": Case(
    lambda: od.exponentiated_gradient(0.1), ("od.exponentiated_gradient",), positive=True
  ),
  "exponentiated_gradient_simplex": Case(
    lambda: od.exponentiated_gradient(0.1, simplex_axis=-1),
    ("od.exponentiated_gradient",),
    positive=True,
  ),
  "eg_plus_minus": Case(lambda: od.eg_plus_minus(0.1), ("od.eg_plus_minus",)),
  "eg_plus_minus_normalised": Case(
    lambda: od.eg_plus_minus(0.1, total_mass=1e3), ("od.eg_plus_minus",)
  ),
  "eg_step_size": Case(lambda: od.eg_step_size(optax.sgd(0.1), 0.1), ("od.eg_step_size",)),
  "eg_step_size_element": Case(
    lambda: od.eg_step_size(_ADAM(), 0.5, granularity="element", normalize=False),
    ("od.eg_step_size",),
  ),
  "heun": Case(
    lambda: od.ode.as_transformation(od.ode.heun(0.1)),
    ("od.ode.as_transformation",),
    grad_fn=True,
  ),
  "rk23": Case(
    lambda: od.ode.as_transformation(od.ode.rk23(0.1)),
    ("od.ode.as_transformation",),
    grad_fn=True,
    nan="rejected",  # documented: a non-finite step is rejected (params unchanged)
  ),
}
IDS = list(CASES)

# ---------------------------------------------------------------------------------------------
# The tree, the loss and the step.

_rng = np.random.default_rng(0)
# Distinct shapes, so a state leaf's param and a gathered param are told by their shapes.
_SHAPES = {"emb": (16, 4), "dense": {"kernel": (8, 8), "bias": (32,)}}
_is_shape = lambda x: isinstance(x, tuple)  # noqa: E731
TARGETS = jax.tree.map(
  lambda s: _rng.normal(size=s).astype(np.float32), _SHAPES, is_leaf=_is_shape
)
MASKS = jax.tree.map(lambda s: np.ones(s, np.float32), _SHAPES, is_leaf=_is_shape)
MASKS["emb"][1::2] = 0.0  # every other row of the table gets no gradient
_SIGNED = jax.tree.map(
  lambda s: _rng.normal(size=s).astype(np.float32), _SHAPES, is_leaf=_is_shape
)
_POSITIVE = jax.tree.map(
  lambda s: _rng.uniform(0.5, 1.5, size=s).astype(np.float32), _SHAPES, is_leaf=_is_shape
)
NUM_LEAVES = len(jax.tree.leaves(TARGETS))


def make_params(case: Case, dtype: Any = jnp.float32) -> Any:
  tree = _POSITIVE if case.positive else _SIGNED
  return jax.tree.map(lambda x: jnp.asarray(x, dtype), tree)


def grads_of(params: Any) -> Any:
  """``∇L``, in each param's dtype."""
  return jax.tree.map(
    lambda p, t, m: (p - t.astype(p.dtype)) * m.astype(p.dtype), params, TARGETS, MASKS
  )


def extra_args(case: Case) -> dict:
  return {"grad_fn": grads_of} if case.grad_fn else {}


def make_step(case: Case, tx: optax.GradientTransformation, grads_fn=grads_of):
  """``(params, state) -> (params, state, updates)``: one update on the loss' gradient."""

  def step(params, state):
    updates, state = tx.update(grads_fn(params), state, params, **extra_args(case))
    return optax.apply_updates(params, updates), state, updates

  return step


def make_run(
  case: Case, tx: optax.GradientTransformation, n: int, max_traces: int | None = None
):
  """``n`` steps under ``jit(lax.scan)`` (traced at most ``max_traces`` times, when given)."""
  step = make_step(case, tx)

  def run(params, state):
    def body(carry, _):
      params, state, _ = step(*carry)
      return (params, state), None

    return jax.lax.scan(body, (params, state), None, length=n)[0]

  if max_traces is not None:
    chex.clear_trace_counter()
    run = chex.assert_max_traces(run, n=max_traces)
  return jax.jit(run)


def avals(tree: Any) -> Any:
  """Shape, dtype and weak type of every leaf (what ``jit`` keys its cache on)."""
  return jax.tree.map(lambda x: (jnp.shape(x), jnp.result_type(x), _weak(x)), tree)


def _weak(x: Any) -> bool:
  return bool(getattr(jax.typeof(x), "weak_type", False))


def assert_equal_trees(actual: Any, desired: Any) -> None:
  """Same structure and bit-identical leaves."""
  assert jax.tree.structure(actual) == jax.tree.structure(desired)
  for a, d in zip(jax.tree.leaves(actual), jax.tree.leaves(desired), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(d))


# ---------------------------------------------------------------------------------------------
# Init: abstract (jax.eval_shape on ShapeDtypeStructs) and under jit.


@pytest.mark.parametrize("name", IDS)
def test_abstract_and_jitted_init(name):
  case = CASES[name]
  tx = case.make()
  params = make_params(case)
  state = tx.init(params)
  abstract = jax.eval_shape(
    tx.init, jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), params)
  )
  assert jax.tree.structure(abstract) == jax.tree.structure(state)
  assert shapes_and_dtypes(abstract) == shapes_and_dtypes(state)
  assert_equal_trees(jax.jit(tx.init)(params), state)


# ---------------------------------------------------------------------------------------------
# dtypes, state stability, lax.cond over steps, no recompilation.


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("name", IDS)
def test_dtypes_state_stability_and_no_recompilation(name, dtype):
  case = CASES[name]
  tx = case.make()
  params = make_params(case, dtype)
  state0 = tx.init(params)
  chex.clear_trace_counter()  # it counts per function body, across the parametrised cases
  step = jax.jit(chex.assert_max_traces(make_step(case, tx), n=1))  # compiled once
  p, s = params, state0
  for _ in range(3):
    p, s, updates = step(p, s)
    for u, q in zip(jax.tree.leaves(updates), jax.tree.leaves(params), strict=True):
      assert u.dtype == q.dtype, (u.dtype, q.dtype)  # updates keep the gradients' dtype
    for new, old in zip(jax.tree.leaves(p), jax.tree.leaves(params), strict=True):
      assert new.dtype == old.dtype  # bf16 params stay bf16
    assert jax.tree.structure(s) == jax.tree.structure(state0)
    assert avals(s) == avals(state0)  # shapes, dtypes and weak types never change
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(p))

  # lax.cond over steps (a skipped or conditional step); lax.scan: the sharding test.
  def maybe_step(pred, params, state):
    return jax.lax.cond(pred, lambda s: make_step(case, tx)(params, s)[1], lambda s: s, state)

  maybe_step = jax.jit(maybe_step)
  assert_equal_trees(maybe_step(False, params, state0), state0)
  assert_trees_close(maybe_step(True, params, state0), step(params, state0)[1], rtol=1e-6)


@pytest.mark.parametrize("name", IDS)
def test_the_state_can_be_donated(name):
  """A training step jitted with the params and state donated, as users write it: no two
  state leaves share a buffer (XLA refuses to donate one buffer twice)."""
  case = CASES[name]
  tx = case.make()
  params = jax.tree.map(jnp.copy, make_params(case))
  step = jax.jit(make_step(case, tx), donate_argnums=(0, 1))
  p, s, _ = step(params, tx.init(params))
  p, s, _ = step(p, s)
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(p))


# ---------------------------------------------------------------------------------------------
# Sharding over the 8 host devices.

LAYOUTS = {
  # data parallel: params (and so the state) replicated on every device
  "replicated": ((8,), ("data",), {"emb": P(), "kernel": P(), "bias": P()}),
  # fully sharded: every leaf split along its first axis over the 8 devices
  "fsdp": ((8,), ("fsdp",), {"emb": P("fsdp"), "kernel": P("fsdp"), "bias": P("fsdp")}),
  # a 2 × 4 mesh, leaves split along both axes
  "2d": (
    (2, 4),
    ("data", "model"),
    {"emb": P("model", None), "kernel": P("data", "model"), "bias": P("model")},
  ),
}


def shardings_for(layout: str) -> Any:
  shape, axes, specs = LAYOUTS[layout]
  mesh = Mesh(np.array(jax.devices()[: math.prod(shape)]).reshape(shape), axes)
  return {
    "emb": NamedSharding(mesh, specs["emb"]),
    "dense": {
      "kernel": NamedSharding(mesh, specs["kernel"]),
      "bias": NamedSharding(mesh, specs["bias"]),
    },
  }


def state_shardings(tx: optax.GradientTransformation, params: Any, shardings: Any) -> Any:
  """The README's recipe: a state leaf shaped like its param gets the param's sharding
  (``optax.tree_map_params`` finds them), every other leaf is replicated."""
  mesh = jax.tree.leaves(shardings)[0].mesh
  replicated = NamedSharding(mesh, P())
  return optax.tree_map_params(
    tx,
    lambda leaf, p, s: (
      leaf if isinstance(leaf, optax.MaskedNode) else s if leaf.shape == p.shape else replicated
    ),  # fmt: skip
    jax.eval_shape(tx.init, params),
    params,
    shardings,
    transform_non_params=lambda _: replicated,
    is_leaf=lambda x: isinstance(x, optax.MaskedNode),
  )


def assert_follows_params(state: Any, params: Any) -> int:
  """Every param-shaped state leaf has its param's sharding (the shapes here are distinct)."""
  by_shape = {p.shape: p.sharding for p in jax.tree.leaves(params)}
  checked = 0
  for path, leaf in jax.tree_util.tree_leaves_with_path(state):
    if jnp.shape(leaf) in by_shape:
      want = by_shape[leaf.shape]
      assert leaf.sharding.is_equivalent_to(want, leaf.ndim), (
        jax.tree_util.keystr(path),
        leaf.sharding,
        want,
      )
      checked += 1
  return checked


def gathered_params(hlo: str, params: Any) -> set[str]:
  """The shapes of ``params`` that a compiled HLO module all-gathers."""
  gathered = set(re.findall(r"= \w+\[([\d,]*)\]\S* all-gather\(", hlo))
  return gathered & {",".join(map(str, p.shape)) for p in jax.tree.leaves(params)}


@pytest.mark.skipif(jax.device_count() < 8, reason="needs the 8 host devices of conftest.py")
def test_the_gather_check_sees_a_gather():
  """The control for the check below: a step that replicates its updates is caught."""
  params = jax.device_put(make_params(CASES["lookahead"]), shardings_for("fsdp"))
  replicated = NamedSharding(jax.tree.leaves(shardings_for("fsdp"))[0].mesh, P())
  gather = lambda u: jax.lax.with_sharding_constraint(u, replicated)  # noqa: E731
  step = jax.jit(lambda p: jax.tree.map(lambda x: jnp.sort(gather(x), axis=None), p))
  assert gathered_params(step.lower(params).compile().as_text(), params)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs the 8 host devices of conftest.py")
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("name", IDS)
def test_sharding(name, layout):
  case = CASES[name]
  tx = case.make()
  params = make_params(case)
  want_params, want_state = single_device_run(name)

  shardings = shardings_for(layout)
  sharded = jax.device_put(params, shardings)
  # Eager init: each param-shaped leaf is created on its param's shards.
  state = tx.init(sharded)
  assert_follows_params(state, sharded)
  if layout != "replicated":
    # Under jit (or for an abstract restore target), optax's recipe gives the shardings.
    jitted = jax.jit(tx.init, out_shardings=state_shardings(tx, params, shardings))(sharded)
    assert_equal_trees(jitted, state)
    assert_follows_params(jitted, sharded)
  compiled = make_run(case, tx, 4).lower(sharded, state).compile()
  got_params, got_state = compiled(sharded, state)
  for p, s in zip(jax.tree.leaves(got_params), jax.tree.leaves(shardings), strict=True):
    assert p.sharding.is_equivalent_to(s, p.ndim)
  assert_follows_params(got_state, sharded)
  assert_trees_close(got_params, want_params, rtol=1e-5, atol=1e-6)
  assert_trees_close(got_state, want_state, rtol=1e-5, atol=1e-6)
  # No param-shaped array is gathered whole on a device: norms and sums are all-reduces
  # (per-row clipping gathers its vector of row norms, one float per row, and no more).
  assert not gathered_params(compiled.as_text(), params)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs the 8 host devices of conftest.py")
@pytest.mark.parametrize("name", IDS)
def test_explicit_sharding_in_types(name):
  """On an explicit mesh (shardings in the types, as in optax's sharding tests) the state's
  types need no recipe: eager, jitted and abstract init agree, each param-shaped leaf has
  its param's sharding, every leaf spans the mesh (none is left on one device, which a
  multi-process checkpoint cannot save), and an eager and a jitted update keep the types."""
  case = CASES[name]
  tx = case.make()
  want_params, want_state = single_device_run(name)
  shape, axes, _ = LAYOUTS["2d"]
  mesh = jax.make_mesh(shape, axes, axis_types=(jax.sharding.AxisType.Explicit,) * len(axes))
  explicit = jax.tree.map(lambda s: NamedSharding(mesh, s.spec), shardings_for("2d"))
  types = lambda tree: jax.tree.map(jax.typeof, tree)  # noqa: E731
  with jax.set_mesh(mesh):
    params = jax.device_put(make_params(case), explicit)
    state = tx.init(params)
    assert types(jax.jit(tx.init)(params)) == types(state)
    abstract = jax.eval_shape(tx.init, jax.tree.map(jax.typeof, params))
    assert jax.tree.map(spec_of, abstract) == jax.tree.map(spec_of, state)
    assert_follows_params(state, params)
    assert all(len(x.sharding.device_set) == 8 for x in jax.tree.leaves(state))
    _, eager_state, _ = make_step(case, tx)(params, state)
    got_params, got_state = make_run(case, tx, 4)(params, state)
  assert types(eager_state) == types(state)
  assert types(got_state) == types(state)
  assert types(got_params) == types(params)
  assert_trees_close(got_params, want_params, rtol=1e-5, atol=1e-6)
  assert_trees_close(got_state, want_state, rtol=1e-5, atol=1e-6)


def spec_of(x: Any) -> tuple:
  """Shape, dtype and the mesh axes of each dimension of an array or an abstract value
  (``eval_shape`` gives a replicated leaf no sharding)."""
  sharding = x.sharding if isinstance(x, jax.ShapeDtypeStruct) else jax.typeof(x).sharding
  spec = () if sharding is None else tuple(sharding.spec)
  return x.shape, x.dtype, spec + (None,) * (len(x.shape) - len(spec))


@functools.cache
def single_device_run(name: str) -> tuple[Any, Any]:
  """The reference of the sharded runs: 4 steps with the params on one device."""
  case = CASES[name]
  tx = case.make()
  params = make_params(case)
  return make_run(case, tx, 4)(params, tx.init(params))


# ---------------------------------------------------------------------------------------------
# Checkpoints with orbax: save, restore into a fresh setup, continue bit-identically.


@pytest.mark.skipif(jax.device_count() < 8, reason="needs the 8 host devices of conftest.py")
@pytest.mark.parametrize("name", IDS)
def test_checkpoint_restore_continues_bit_identically(name, tmp_path):
  case = CASES[name]
  shardings = shardings_for("fsdp")
  tx = case.make()
  params = jax.device_put(make_params(case), shardings)
  run = make_run(case, tx, 3)
  params3, state3 = run(params, tx.init(params))
  uninterrupted = run(params3, state3)

  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "ckpt", {"params": params3, "opt_state": state3})
  checkpointer.wait_until_finished()
  del checkpointer

  # A fresh setup, as a new process builds it: a new transformation, an abstract target
  # (structure and dtypes from jax.eval_shape, shardings from the README's recipe: the
  # counters replicated on the mesh, not committed to one device), a new checkpointer and jit.
  tx2 = case.make()
  fresh_params = jax.device_put(make_params(case), shardings)
  fresh = {"params": fresh_params, "opt_state": tx2.init(fresh_params)}
  target = jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
    jax.eval_shape(lambda: fresh),
    {"params": shardings, "opt_state": state_shardings(tx2, fresh_params, shardings)},
  )
  restored = ocp.StandardCheckpointer().restore(tmp_path / "ckpt", target)
  # The NamedTuples (not lists or dicts) survive, with the leaves bit for bit.
  assert jax.tree.structure(restored["opt_state"]) == jax.tree.structure(state3)
  assert avals(restored["opt_state"]) == avals(fresh["opt_state"])
  assert_equal_trees(restored["opt_state"], state3)
  assert_follows_params(restored["opt_state"], fresh_params)

  run2 = make_run(case, tx2, 3, max_traces=1)  # the step's own outputs do not recompile it
  resumed = run2(restored["params"], restored["opt_state"])
  assert_equal_trees(resumed, uninterrupted)
  run2(*resumed)
  # and it goes through lax.cond against a freshly initialised state
  pick = jax.jit(lambda pred, a, b: jax.lax.cond(pred, lambda: a, lambda: b))
  assert_equal_trees(pick(True, restored["opt_state"], fresh["opt_state"]), state3)


# ---------------------------------------------------------------------------------------------
# Flax nnx.Optimizer: the optimizer state lives in Variables, the params in an nnx.State.


def _by_path(tree: Any) -> dict:
  return dict(zip(jax.tree.leaves(od.tree_paths(tree)), jax.tree.leaves(tree), strict=True))


_TARGETS_BY_PATH, _MASKS_BY_PATH = _by_path(TARGETS), _by_path(MASKS)


def _grads_by_path(params: Any) -> Any:
  """``∇L`` on any container (an ``nnx.State`` too), each leaf found by its path."""
  return jax.tree.map(
    lambda p, path: (p - _TARGETS_BY_PATH[path]) * _MASKS_BY_PATH[path],
    params,
    od.tree_paths(params),
  )


@pytest.mark.parametrize("name", IDS)
def test_nnx_optimizer(name):
  from flax import nnx

  class Dense(nnx.Module):
    def __init__(self, tree):
      self.kernel = nnx.Param(tree["kernel"])
      self.bias = nnx.Param(tree["bias"])

  class Model(nnx.Module):
    def __init__(self, tree):
      self.emb = nnx.Param(tree["emb"])
      self.dense = Dense(tree["dense"])

  def loss(model):
    p = nnx.state(model, nnx.Param)
    return sum(
      0.5 * jnp.sum(_MASKS_BY_PATH[path] * (x - _TARGETS_BY_PATH[path]) ** 2)
      for path, x in _by_path(nnx.as_pure(p)).items()
    )

  case = CASES[name]
  params = make_params(case)
  model = Model(params)
  optimizer = nnx.Optimizer(model, case.make(), wrt=nnx.Param)
  extra = {"grad_fn": _grads_by_path} if case.grad_fn else {}

  @nnx.jit
  def train_step(model, optimizer):
    optimizer.update(model, nnx.grad(loss)(model), **extra)

  tx = case.make()
  step = jax.jit(make_step(case, tx))
  want, state = params, tx.init(params)
  for _ in range(3):
    train_step(model, optimizer)
    want, state, _ = step(want, state)
  got = _by_path(nnx.as_pure(nnx.state(model, nnx.Param)))
  for path, value in _by_path(want).items():
    np.testing.assert_allclose(got[path], value, rtol=1e-6, atol=1e-7, err_msg=path)


# ---------------------------------------------------------------------------------------------
# Bad inputs: NaN/Inf gradients, mismatched trees, invalid hyperparameters.


def _poison(grads: Any, value: float) -> Any:
  kernel = grads["dense"]["kernel"]
  return {**grads, "dense": {**grads["dense"], "kernel": kernel.at[0, 0].set(value)}}


@pytest.mark.parametrize("name", IDS)
def test_apply_if_finite_skips_the_step_and_keeps_the_state(name):
  case = CASES[name]
  tx = optax.apply_if_finite(case.make(), max_consecutive_errors=5)

  chex.clear_trace_counter()

  @jax.jit
  @chex.assert_max_traces(n=1)  # the poisoned steps reuse the compiled one
  def step(params, state, value):  # the gradient with one entry set to `value`
    return make_step(case, tx, lambda p: _poison(grads_of(p), value))(params, state)

  params, state, _ = step(make_params(case), tx.init(make_params(case)), 0.0)  # a real step
  direct = step(params, state, 0.0)
  for bad in (math.nan, math.inf, -math.inf):
    new_params, new_state, updates = step(params, state, bad)
    assert all(bool(jnp.all(u == 0)) for u in jax.tree.leaves(updates))
    assert_equal_trees(new_params, params)
    assert_equal_trees(new_state.inner_state, state.inner_state)
    assert int(new_state.notfinite_count) == 1 and int(new_state.total_notfinite) == 1
    # The next finite step is the one that would have followed the last finite one.
    after_skip = step(new_params, new_state, 0.0)
    assert_equal_trees(after_skip[0], direct[0])
    assert_equal_trees(after_skip[1].inner_state, direct[1].inner_state)


@pytest.mark.parametrize("name", IDS)
def test_nan_gradients_behave_as_documented(name):
  case = CASES[name]
  tx = case.make()
  params = make_params(case)
  step = jax.jit(make_step(case, tx, lambda p: _poison(grads_of(p), math.nan)))
  p, s = params, tx.init(params)
  for _ in range(2):  # two calls: a whole accumulation window
    p, s, _ = step(p, s)
  finite = all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(p))
  if case.nan == "nonfinite":
    assert not finite  # never silently hidden: optax.apply_if_finite catches it
  elif case.nan == "skipped":
    assert_equal_trees(p, params)
    assert int(s.num_skipped) == 2
  elif case.nan == "rejected":
    assert_equal_trees(p, params)
    assert float(s.step_size) < 0.1  # rejected steps shrink h
  else:  # pragma: no cover
    raise AssertionError(case.nan)


@pytest.mark.parametrize("name", [n for n in IDS if CASES[n].names is not None])
def test_mismatched_trees_raise_an_error_naming_the_transformation(name):
  case = CASES[name]
  tx = case.make()
  params = make_params(case)
  state = tx.init(params)
  grads = grads_of(params)
  missing = {**grads, "dense": {"kernel": grads["dense"]["kernel"]}}
  extra = {**grads, "head": jnp.ones(3)}
  for bad in (missing, extra):
    with pytest.raises((ValueError, TypeError)) as info:
      jax.jit(functools.partial(tx.update, **extra_args(case)))(bad, state, params)
    assert any(n in str(info.value) for n in case.names), str(info.value)


_NOT_A_TX = "adam"
# (factory, kwargs, the argument the error must name)
BAD_HYPERPARAMETERS = [
  (od.accumulate, dict(inner=optax.sgd(1.0), every_k=0), "every_k"),
  (od.accumulate, dict(inner=optax.sgd(1.0), every_k=2.5), "every_k"),
  (
    od.accumulate,
    dict(inner=optax.sgd(1.0), every_k=2, accumulator_dtype=jnp.int32),
    "accumulator_dtype",
  ),
  (od.lookahead, dict(inner=optax.sgd(1.0), sync_period=0), "sync_period"),
  (od.lookahead, dict(inner=optax.sgd(1.0), slow_step_size=0.0), "slow_step_size"),
  (od.lookahead, dict(inner=optax.sgd(1.0), slow_step_size=1.5), "slow_step_size"),
  (od.param_ema, dict(decay=1.0), "decay"),
  (od.param_ema, dict(decay=-0.1), "decay"),
  (od.param_ema, dict(decay=math.nan), "decay"),
  (od.param_ema, dict(decay="0.9"), "decay"),
  (od.param_ema, dict(decay=np.array([0.9, 0.99])), "decay"),
  (od.param_ema, dict(decay=0.9, debias="no"), "debias"),
  (od.param_ema, dict(start_step=-1), "start_step"),
  (od.param_ema, dict(start_step=1.5), "start_step"),
  (od.param_ema, dict(start_step=lambda count: 0), "start_step"),
  (od.param_ema, dict(every=0), "every"),
  (od.param_ema, dict(every=2.0), "every"),
  (od.param_ema, dict(overwrite_every=0), "overwrite_every"),
  (od.param_ema, dict(overwrite_every=True), "overwrite_every"),
  (od.ema_warmup, dict(max_decay=1.0), "max_decay"),
  (od.ema_warmup, dict(max_decay=-0.1), "max_decay"),
  (od.ema_warmup, dict(max_decay=lambda count: 0.9), "max_decay"),
  (od.ema_warmup, dict(gamma=0.0), "gamma"),
  (od.ema_warmup, dict(gamma=math.inf), "gamma"),
  (od.ema_warmup, dict(power=0.0), "power"),
  (od.ema_warmup, dict(power=math.nan), "power"),
  (od.ema_warmup, dict(min_decay=-0.1), "min_decay"),
  (od.ema_warmup, dict(max_decay=0.9, min_decay=0.95), "min_decay"),
  (od.power_ema_decay, dict(sigma_rel=0.0), "sigma_rel"),
  (od.power_ema_decay, dict(sigma_rel=0.3), "sigma_rel"),
  (od.power_ema_decay, dict(sigma_rel=math.nan), "sigma_rel"),
  (od.power_ema_decay, dict(sigma_rel="0.1"), "sigma_rel"),
  (od.swa, dict(start_step=-1), "start_step"),
  (od.swa, dict(start_step=2.5), "start_step"),
  (od.swa, dict(every=0), "every"),
  (od.swa, dict(every="2"), "every"),
  (od.accumulate, dict(inner=optax.sgd(1.0), every_k=2, skip_nonfinite="no"), "skip_nonfinite"),
  (od.accumulate, dict(inner=optax.sgd(1.0), every_k=2, skip_if=3), "skip_if"),
  (od.accumulate, dict(inner=optax.sgd(1.0), every_k=2, reduction="max"), "reduction"),
  (
    od.accumulate,
    dict(inner=optax.sgd(1.0), every_k=2, mean_extra_args="value"),
    "mean_extra_args",
  ),
  (
    od.accumulate,
    dict(inner=optax.sgd(1.0), every_k=2, mean_extra_args=("value", "value")),
    "mean_extra_args",
  ),
  (
    od.accumulate,
    dict(inner=optax.sgd(1.0), every_k=2, mean_extra_args=("weight",)),
    "mean_extra_args",
  ),
  (
    od.accumulate,
    dict(inner=optax.sgd(1.0), every_k=2, mean_extra_args=(1,)),
    "mean_extra_args",
  ),
  (od.shard_state, dict(inner=optax.adam, sharding=lambda path, p: None), "inner"),
  (od.shard_state, dict(inner=optax.sgd(1.0), sharding="data"), "sharding"),
  (od.shard_state, dict(inner=optax.sgd(1.0), sharding={"w": 3}), "sharding"),
  (od.shard_state, dict(inner=optax.sgd(1.0), sharding=lambda path, p: None, mesh="x"), "mesh"),
  (od.lookahead, dict(inner=optax.sgd(1.0), slow_step_size="0.5"), "slow_step_size"),
  (
    od.lookahead,
    dict(inner=optax.sgd(1.0), slow_step_size=np.array([0.5, 2.0])),
    "slow_step_size",
  ),
  (od.clip_norm, dict(max_norm=True), "max_norm"),
  (od.exponentiated_gradient, dict(learning_rate=math.inf), "learning_rate"),
  (od.eg_plus_minus, dict(learning_rate=0.1, total_mass=math.inf), "total_mass"),
  (od.eg_plus_minus, dict(learning_rate=0.1, init_scale=math.inf), "init_scale"),
  (od.eg_plus_minus, dict(learning_rate=0.1, accumulator_dtype=jnp.int32), "accumulator_dtype"),
  (od.eg_plus_minus, dict(learning_rate=0.1, accumulator_dtype="foo"), "accumulator_dtype"),
  (od.lazy, dict(inner=_NOT_A_TX), "inner"),
  (od.lazy, dict(inner=optax.sgd(1.0), freeze_state="yes"), "freeze_state"),
  (od.lazy, dict(inner=optax.sgd(1.0), include="("), "include"),
  (od.lazy, dict(inner=optax.sgd(1.0), dense_above=1.5), "dense_above"),
  (od.lazy, dict(inner=optax.sgd(1.0), dense_above=-0.1), "dense_above"),
  (
    od.lazy,
    dict(inner=optax.sgd(1.0), dense_above=optax.constant_schedule(0.1)),
    "dense_above",
  ),
  (od.clip_norm, dict(max_norm=0.0), "max_norm"),
  (od.clip_norm, dict(max_norm=-1.0), "max_norm"),
  (od.clip_norm, dict(max_norm=math.nan), "max_norm"),
  (od.clip_norm, dict(max_norm=1.0, scope="column"), "scope"),
  (od.clip_norm, dict(max_norm=1.0, soft="yes"), "soft"),
  (od.scale_by_path, dict(rules={"kernel": math.inf}), "kernel"),
  (od.scale_by_path, dict(rules={"kernel": "big"}), "kernel"),
  (od.scale_by_path, dict(rules={"kernel": 1.0}, default=math.nan), "default"),
  (od.scale_by_path, dict(rules={"(": 1.0}), "invalid regex"),
  (od.transform_by_path, dict(rules={"kernel": 0.1}), "kernel"),
  (od.transform_by_path, dict(rules={"kernel": optax.sgd(1.0)}, default="sgd"), "default"),
  (od.weight_decay, dict(rate=-0.1), "rate"),
  (od.weight_decay, dict(rate=math.nan), "rate"),
  (od.weight_decay, dict(rate=0.1, exclude="("), "exclude"),
  (od.layer_adaptation, dict(exclude="("), "exclude"),
  (od.piecewise_linear, dict(points={}), "points"),
  (od.piecewise_linear, dict(points={-1: 1.0}), "points"),
  (od.piecewise_linear, dict(points={0: math.nan}), "points"),
  (od.piecewise_linear, dict(points={0: 1.0}, scale=math.nan), "scale"),
  (od.derive, dict(learning_rate=-1e-3), "learning_rate"),
  (od.derive, dict(learning_rate=math.inf), "learning_rate"),
  (od.derive, dict(learning_rate=1e-3, weight_decay=math.inf), "weight_decay"),
  (od.derive, dict(learning_rate=1e-3, clip=optax.adam), "clip"),
  (od.derive, dict(learning_rate=1e-3, base=optax.adam), "base"),
  (od.derive, dict(learning_rate=1e-3, layer_adaptation="no"), "layer_adaptation"),
  (od.piecewise_linear, dict(points={1: 1.0}, scale=math.inf), "scale"),
  (od.piecewise_linear, dict(points={1: 1.0, "1": 2.0}), "points"),
  (od.piecewise_linear, dict(points={"1.5": 1.0}), "points"),
  (od.derive, dict(learning_rate=1e-3, grad_accum_steps=0), "grad_accum_steps"),
  (od.derive, dict(learning_rate=1e-3, weight_decay=-1.0), "weight_decay"),
  (od.derive, dict(learning_rate=1e-3, ema=1.0), "ema"),
  (od.derive, dict(learning_rate=1e-3, ema="0.9"), "ema"),
  (od.derive, dict(learning_rate=1e-3, clip=0.0), "clip"),
  (od.derive, dict(learning_rate=1e-3, lookahead=(2,)), "lookahead"),
  (
    od.derive,
    dict(learning_rate=1e-3, exclude_from_weight_decay=["bias"]),
    "exclude_from_weight_decay",
  ),
  (
    od.derive,
    dict(learning_rate=1e-3, exclude_from_layer_adaptation=["bias"]),
    "exclude_from_layer_adaptation",
  ),
  (
    od.derive,
    dict(learning_rate=1e-3, base=optax.sgd(1.0), bias_correction=False),
    "bias_correction",
  ),
  (od.exponentiated_gradient, dict(learning_rate=0.0), "learning_rate"),
  (od.exponentiated_gradient, dict(learning_rate=0.1, simplex_axis="last"), "simplex_axis"),
  (od.eg_plus_minus, dict(learning_rate=-1.0), "learning_rate"),
  (od.eg_plus_minus, dict(learning_rate=0.1, total_mass=0.0), "total_mass"),
  (od.eg_plus_minus, dict(learning_rate=0.1, init_scale=0.0), "init_scale"),
  (od.eg_step_size, dict(inner=_NOT_A_TX, meta_learning_rate=0.1), "inner"),
  (od.eg_step_size, dict(inner=optax.sgd(1.0), meta_learning_rate=-0.1), "meta_learning_rate"),
  (
    od.eg_step_size,
    dict(inner=optax.sgd(1.0), meta_learning_rate=0.1, granularity="row"),
    "granularity",
  ),
  (
    od.eg_step_size,
    dict(inner=optax.sgd(1.0), meta_learning_rate=0.1, normalize="yes"),
    "normalize",
  ),
  (
    od.eg_step_size,
    dict(inner=optax.sgd(1.0), meta_learning_rate=0.1, max_exponent=0.0),
    "max_exponent",
  ),
  (
    od.eg_step_size,
    dict(inner=optax.sgd(1.0), meta_learning_rate=0.1, bounds=(2.0, 1.0)),
    "bounds",
  ),
  (
    od.eg_step_size,
    dict(inner=optax.sgd(1.0), meta_learning_rate=0.1, bounds=(-1.0, 1.0)),
    "bounds",
  ),
  (od.ode.runge_kutta, dict(tableau=od.ode.HEUN, learning_rate=0.0), "learning_rate"),
  (od.ode.runge_kutta, dict(tableau=od.ode.BOSH3, learning_rate=0.1, rtol=-1.0), "rtol"),
  (od.ode.runge_kutta, dict(tableau=od.ode.BOSH3, learning_rate=0.1, atol=-1.0), "atol"),
  (
    od.ode.runge_kutta,
    dict(tableau=od.ode.BOSH3, learning_rate=0.1, controller="pid"),
    "controller",
  ),
  (od.ode.heun, dict(lr=-0.1), "learning_rate"),
  (od.ode.rk23, dict(lr=0.1, safety=1.5), "safety"),
  (od.ode.rk45, dict(lr=0.1, factor_max=0.5), "factor_max"),
  (od.ode.as_transformation, dict(stepper="heun"), "stepper"),
  (od.ode.as_transformation, dict(stepper=od.ode.rk23(0.1, fsal=True)), "fsal"),
  # Every inner, flag and pattern argument is checked too.
  (od.accumulate, dict(inner=optax.adam, every_k=2), "inner"),
  (od.lookahead, dict(inner="sgd"), "inner"),
  (od.lookahead, dict(inner=optax.sgd(1.0), reset_inner_state="no"), "reset_inner_state"),
  (od.weight_decay, dict(rate=0.1, exclude=5), "exclude"),
  (od.weight_decay, dict(rate=0.1, strict="yes"), "strict"),
  (od.layer_adaptation, dict(exclude={"bias": 1}), "exclude"),
  (od.lazy, dict(inner=optax.sgd(1.0), include=3), "include"),
  (od.scale_by_path, dict(rules={"kernel": 1.0}, strict=1), "strict"),
  (od.transform_by_path, dict(rules={5: optax.sgd(1.0)}), "5"),
  (
    od.derive,
    dict(learning_rate=1e-3, weight_decay=0.1, exclude_from_weight_decay=5),
    "exclude_from_weight_decay",
  ),
  (
    od.derive,
    dict(learning_rate=1e-3, base=optax.adam(optax.linear_schedule(0.0, 1e-3, 10))),
    "base",
  ),
  (od.derive, dict(learning_rate=1e-3, strict="no"), "strict"),
  (
    od.derive,
    dict(learning_rate=1e-3, lookahead=(0, 0.5)),
    "lookahead: od.lookahead: sync_period",
  ),
  (od.derive, dict(learning_rate=1e-3, paramwise_lr={"bias": "x"}), "paramwise_lr"),
  (od.sparse.row_sparse_grad, dict(fun=lambda p, r: 0.0, table=5), "table"),
  (od.sparse.row_sparse_grad, dict(fun=lambda p, r: 0.0, table=()), "table"),
  (od.sparse.row_sparse_grad, dict(fun=lambda p, r: 0.0, table="emb", has_aux="no"), "has_aux"),
  # Training stability.
  (od.zclip, dict(z_threshold=0.0), "z_threshold"),
  (od.zclip, dict(z_threshold=math.nan), "z_threshold"),
  (od.zclip, dict(ema_decay=1.0), "ema_decay"),
  (od.zclip, dict(ema_decay=0.0), "ema_decay"),
  (od.zclip, dict(warmup_steps=0), "warmup_steps"),
  (od.zclip, dict(warmup_steps=2.5), "warmup_steps"),
  (od.zclip, dict(reciprocal="yes"), "reciprocal"),
  (od.autoclip, dict(percentile=-1.0), "percentile"),
  (od.autoclip, dict(percentile=101.0), "percentile"),
  (od.autoclip, dict(window=0), "window"),
  (od.autoclip, dict(window=10.5), "window"),
  (od.adaptive_grad_clip, dict(clipping=0.0), "clipping"),
  (od.adaptive_grad_clip, dict(clipping=math.nan), "clipping"),
  (od.adaptive_grad_clip, dict(clipping=0.01, eps=-1.0), "eps"),
  (od.adaptive_grad_clip, dict(clipping=0.01, exclude="("), "exclude"),
  (od.adaptive_grad_clip, dict(clipping=0.01, exclude=5), "exclude"),
  (od.adaptive_grad_clip, dict(clipping=0.01, strict="yes"), "strict"),
  (od.skip_spikes, dict(inner=_NOT_A_TX), "inner"),
  (od.skip_spikes, dict(inner=optax.sgd(1.0), window=0), "window"),
  (od.skip_spikes, dict(inner=optax.sgd(1.0), threshold=0.0), "threshold"),
  (od.skip_spikes, dict(inner=optax.sgd(1.0), threshold=math.inf), "threshold"),
  (od.skip_spikes, dict(inner=optax.sgd(1.0), metric="norm"), "metric"),
  (od.skip_spikes, dict(inner=optax.sgd(1.0), window=4, min_history=5), "min_history"),
  (od.skip_spikes, dict(inner=optax.sgd(1.0), max_consecutive=0), "max_consecutive"),
  (od.dynamic_loss_scale, dict(inner=optax.adam), "inner"),
  (od.dynamic_loss_scale, dict(inner=optax.sgd(1.0), initial_scale=0.0), "initial_scale"),
  (od.dynamic_loss_scale, dict(inner=optax.sgd(1.0), initial_scale=math.inf), "initial_scale"),
  (od.dynamic_loss_scale, dict(inner=optax.sgd(1.0), initial_scale=2.0**30), "initial_scale"),
  (od.dynamic_loss_scale, dict(inner=optax.sgd(1.0), min_scale=0.0), "min_scale"),
  (od.dynamic_loss_scale, dict(inner=optax.sgd(1.0), max_scale=math.inf), "max_scale"),
  (
    od.dynamic_loss_scale,
    dict(inner=optax.sgd(1.0), initial_scale=3.0, min_scale=4.0, max_scale=2.0),
    "min_scale",
  ),
  (od.dynamic_loss_scale, dict(inner=optax.sgd(1.0), growth_interval=0), "growth_interval"),
  (od.dynamic_loss_scale, dict(inner=optax.sgd(1.0), growth_factor=0.5), "growth_factor"),
  (od.dynamic_loss_scale, dict(inner=optax.sgd(1.0), backoff_factor=0.0), "backoff_factor"),
  (od.dynamic_loss_scale, dict(inner=optax.sgd(1.0), backoff_factor=1.5), "backoff_factor"),
]


@pytest.mark.parametrize(
  "factory, kwargs, argname",
  BAD_HYPERPARAMETERS,
  ids=[f"{f.__name__}-{a}-{i}" for i, (f, _, a) in enumerate(BAD_HYPERPARAMETERS)],
)
def test_invalid_hyperparameters_raise_value_error_naming_the_argument(
  factory, kwargs, argname
):
  # One format everywhere: "od.<function>: <argument> ..., got <value>".
  with pytest.raises(ValueError, match=rf"^{re.escape(public_name(factory))}: .*{argname}"):
    factory(**kwargs)


def public_name(obj) -> str:
  """``od.derive``, ``od.ode.heun``: where a public name lives."""
  for module, prefix in ((od, "od."), (od.ode, "od.ode."), (od.sparse, "od.sparse.")):
    if getattr(module, obj.__name__, None) is obj and obj.__name__ in module.__all__:
      return prefix + obj.__name__
  raise AssertionError(f"{obj} is not public")


def test_the_catalogue_covers_every_public_factory():
  factories = {public_name(f) for f, _, _ in BAD_HYPERPARAMETERS}
  public = {
    "od.accumulate", "od.lookahead", "od.param_ema", "od.lazy", "od.clip_norm",
    "od.scale_by_path", "od.transform_by_path", "od.weight_decay", "od.layer_adaptation",
    "od.piecewise_linear", "od.derive", "od.exponentiated_gradient", "od.eg_plus_minus",
    "od.eg_step_size", "od.ode.runge_kutta", "od.ode.heun", "od.ode.rk23", "od.ode.rk45",
    "od.ode.as_transformation", "od.sparse.row_sparse_grad", "od.zclip", "od.autoclip",
    "od.adaptive_grad_clip", "od.skip_spikes", "od.dynamic_loss_scale", "od.swa",
    "od.ema_warmup", "od.power_ema_decay", "od.shard_state",
  }  # fmt: skip
  assert public <= factories, public - factories


def test_invalid_params_at_init_raise_value_error_naming_the_transformation():
  with pytest.raises(ValueError, match="exponentiated_gradient"):
    od.exponentiated_gradient(0.1).init({"w": jnp.array([1.0, -1.0])})
  with pytest.raises(ValueError, match="total_mass"):
    od.eg_plus_minus(0.1, total_mass=1.0).init({"w": jnp.array([1.0, -1.0])})


@pytest.mark.parametrize(
  "tx",
  [
    od.lookahead(optax.sgd(1.0)),
    od.weight_decay(0.1),
    od.param_ema(0.9),
    od.adaptive_grad_clip(0.01),
    od.swa(),
  ],
  ids=["lookahead", "weight_decay", "param_ema", "adaptive_grad_clip", "swa"],
)
def test_a_missing_params_argument_raises_value_error(tx):
  params = {"w": jnp.ones(3)}
  with pytest.raises(ValueError, match="params"):
    tx.update(params, tx.init(params))


# ---------------------------------------------------------------------------------------------
# Property tests of each family's invariants (hypothesis; every jitted function compiles once).

_floats = st.floats(-1e3, 1e3, allow_nan=False, width=32)
_vectors = hnp.arrays(np.float32, (3, 4), elements=_floats)


@functools.cache
def _clip_fn(soft: bool, scope: str):
  tx = od.clip_norm(1.0, soft=soft, scope=scope)
  return jax.jit(lambda g: tx.update(g, tx.init(g))[0])


@settings(deadline=None, max_examples=25)
@given(g=_vectors, soft=st.booleans(), scope=st.sampled_from(["global", "leaf", "row"]))
def test_property_clip_bounds(g, soft, scope):
  tree = {"a": g, "b": g[0] * 0.5}
  out = _clip_fn(soft, scope)(tree)
  pairs = [
    (np.asarray(a, np.float64), np.asarray(b, np.float64))
    for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(out), strict=True)
  ]
  if scope == "global":
    units = [tuple(np.concatenate([pair[i].ravel() for pair in pairs]) for i in (0, 1))]
  elif scope == "leaf":
    units = [(a.ravel(), b.ravel()) for a, b in pairs]
  else:  # rows of axis 0; a vector is one unit
    units = [u for a, b in pairs for u in (zip(a, b, strict=True) if a.ndim >= 2 else [(a, b)])]
  for before, after in units:
    n = np.linalg.norm(before)
    want = before * (1.0 / (n + 1.0) if soft else min(1.0, 1.0 / n) if n > 0 else 1.0)
    np.testing.assert_allclose(after, want, rtol=1e-5, atol=1e-6)
    assert np.linalg.norm(after) <= 1.0 + 1e-5  # never above the bound
    assert np.all(np.sign(after) * np.sign(before) >= 0)  # a scaling, never a flip


_EG = od.exponentiated_gradient(0.5)
_EG_SIMPLEX = od.exponentiated_gradient(0.5, simplex_axis=-1)
_EGPM = od.eg_plus_minus(0.5, total_mass=1e4)
_EGSS = od.eg_step_size(optax.sgd(0.1), 1.0, granularity="element", normalize=False)


@jax.jit
def _eg_steps(p, gs):
  def body(carry, g):
    p, s1, q, s2, r, s3, w, s4 = carry
    # Unnormalised EG grows by exp(-ηg) per step: its negative gradients stay above -10 so the
    # params stay within float32 (past exp(88) they overflow); positive ones go to 1e3, where
    # the floor of the per-step factor keeps the params from rounding to 0.
    u1, s1 = _EG.update(jnp.maximum(g, -10.0), s1, p)
    u2, s2 = _EG_SIMPLEX.update(g, s2, q)
    # EG± keeps u and v in float32: their ratio underflows once the cumulative exponent
    # passes ~87 (exp(-87) is float32's smallest normal), so its gradients stay within ±10.
    u3, s3 = _EGPM.update(g * 0.01, s3, r)
    u4, s4 = _EGSS.update(g, s4, w)
    p, q, r, w = (optax.apply_updates(*a) for a in ((p, u1), (q, u2), (r, u3), (w, u4)))
    return (p, s1, q, s2, r, s3, w, s4), None

  q = p / jnp.sum(p, -1, keepdims=True)
  init = (p, _EG.init(p), q, _EG_SIMPLEX.init(q), p - 1, _EGPM.init(p - 1), p, _EGSS.init(p))
  return jax.lax.scan(body, init, gs)[0]


@settings(deadline=None, max_examples=25)
@given(
  p=hnp.arrays(np.float32, (3, 4), elements=st.floats(2.0**-10, 10.0, width=32)),
  gs=hnp.arrays(np.float32, (4, 3, 4), elements=_floats),
)
def test_property_eg_positivity_simplex_and_gain_bounds(p, gs):
  p, _, q, _, _, s3, _, s4 = _eg_steps(p, gs)
  assert np.all(np.asarray(p) > 0) and np.all(np.isfinite(p))  # EG keeps params positive
  assert np.all(np.asarray(q) > 0)
  np.testing.assert_allclose(np.sum(np.asarray(q, np.float64), -1), 1.0, rtol=1e-5)
  assert np.all(np.asarray(s3.u) > 0) and np.all(np.asarray(s3.v) > 0)  # EG±: u, v > 0
  gains = np.asarray(s4.gains)
  assert np.all((gains >= 1e-3) & (gains <= 1e3))  # gains stay within bounds


_K = 3
_ACC = od.accumulate(optax.adam(0.1), _K)
_ADAM_REF = optax.adam(0.1)


@jax.jit
def _accumulated_vs_big_batch(p, micro, weights):
  state = _ACC.init(p)
  for i in range(_K):
    updates, state = _ACC.update(micro[i], state, p, weight=weights[i])
  mean = jnp.tensordot(weights, micro, axes=1) / jnp.sum(weights)
  return updates, _ADAM_REF.update(mean, _ADAM_REF.init(p), p)[0]


@settings(deadline=None, max_examples=25)
@given(
  micro=hnp.arrays(np.float32, (_K, 5), elements=st.floats(-10, 10, width=32)),
  weights=hnp.arrays(np.float32, (_K,), elements=st.floats(0.125, 100.0, width=32)),
)
def test_property_accumulation_equals_the_big_batch(micro, weights):
  got, want = _accumulated_vs_big_batch(jnp.zeros(5), micro, weights)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


@functools.cache
def _lookahead_alpha_one(sync_period: int):
  lookahead = od.lookahead(optax.adam(0.1), sync_period, 1.0)
  adam = optax.adam(0.1)

  @jax.jit
  def run(p, gs):
    def body(carry, g):
      p, s, q, t = carry
      u, s = lookahead.update(g, s, p)
      v, t = adam.update(g, t, q)
      return (optax.apply_updates(p, u), s, optax.apply_updates(q, v), t), None

    p, _, q, _ = jax.lax.scan(body, (p, lookahead.init(p), p, adam.init(p)), gs)[0]
    return p, q

  return run


@settings(deadline=None, max_examples=25)
@given(
  sync_period=st.integers(1, 3),
  gs=hnp.arrays(np.float32, (5, 4), elements=st.floats(-10, 10, width=32)),
)
def test_property_lookahead_with_alpha_one_is_the_inner_optimizer(sync_period, gs):
  got, want = _lookahead_alpha_one(sync_period)(jnp.linspace(-1.0, 1.0, 4), gs)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
