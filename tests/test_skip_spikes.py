"""od.skip_spikes and od.has_skipped against a NumPy float64 reference of the rule, and in the
settings of real runs (chains, od.accumulate, nnx.Optimizer, TrainState, lax.scan, bf16)."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import assert_keeps_dtype
from helpers import assert_trees_close
from helpers import run_scan
from helpers import shapes_and_dtypes

import optaxderived as od
from optaxderived._transforms.skip_spikes import SkipSpikesState
from optaxderived._transforms.skip_spikes import has_skipped
from optaxderived._transforms.skip_spikes import skip_spikes

PARAMS = {"w": jnp.array([1.0, -2.0, 0.5], jnp.float32), "b": {"k": jnp.ones((2, 2))}}
SIZE = 7  # entries of PARAMS


def _np(tree):
  return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)


def _flat(tree):
  return np.concatenate([np.ravel(x) for x in jax.tree.leaves(_np(tree))])


def _unflat(vector, like=PARAMS, dtype=jnp.float32):
  leaves, treedef = jax.tree.flatten(like)
  out, start = [], 0
  for leaf in leaves:
    out.append(jnp.asarray(vector[start : start + leaf.size].reshape(leaf.shape), dtype))
    start += leaf.size
  return jax.tree.unflatten(treedef, out)


# ---------------------------------------------------------------------------------------------
# The NumPy float64 reference of the rule, with Adam as the inner optimizer.


def _np_adam_step(g, m, v, t, lr, b1=0.9, b2=0.999, eps=1e-8):
  """optax.adam's update on flat vectors; ``t`` is the number of steps before this one."""
  m = b1 * m + (1 - b1) * g
  v = b2 * v + (1 - b2) * g**2
  mh, vh = m / (1 - b1 ** (t + 1)), v / (1 - b2 ** (t + 1))
  return -lr * mh / (np.sqrt(vh) + eps), m, v


def _reference(grads, losses, *, window, threshold, metric, min_history, max_consecutive, lr):
  """The rule, written from its definition on a list of recorded values (no ring buffer).

  Returns one record per call: the update, the params after it, every state field (the
  expected ring layout built from the list: the value recorded ``i``-th at column
  ``i % window``) and the branch the call took.
  """
  theta, m, v, t = _flat(PARAMS), np.zeros(SIZE), np.zeros(SIZE), 0
  names = {"grad_norm": ["norm"], "loss": ["loss"], "both": ["norm", "loss"]}[metric]
  recorded = {name: [] for name in names}
  needed = window if min_history is None else min_history
  num_skipped = consecutive = 0
  records = []
  for g, loss in zip(grads, losses, strict=True):
    observed = {"norm": float(np.sqrt(np.sum(g**2))), "loss": loss}
    count = len(recorded[names[0]])
    spike_kind = None
    for name in names:
      x = observed[name]
      if not math.isfinite(x):
        spike_kind = "nonfinite"
        continue
      if count >= needed:
        last = np.asarray(recorded[name][-window:])
        limit = last.mean() + threshold * last.std()  # population std (ddof=0)
        # The sequences stay clear of the limit, so float32 takes the same decisions.
        assert abs(x - limit) > 1e-4 * max(1.0, abs(limit)), (x, limit)
        if x > limit and spike_kind is None:
          spike_kind = "spike"
    finite = all(math.isfinite(observed[name]) for name in names)
    forced = (
      spike_kind is not None
      and max_consecutive is not None
      and finite
      and consecutive >= max_consecutive
    )
    take = spike_kind is None or forced
    if take:
      branch = "forced" if forced else ("armed" if count >= needed else "warmup")
      update, m, v = _np_adam_step(g, m, v, t, lr)
      t += 1
      theta = theta + update
      for name in names:
        recorded[name].append(observed[name])
      consecutive = 0
    else:  # while the window fills only a non-finite value can be a spike
      branch = spike_kind if count >= needed else "warmup_nonfinite"
      update = np.zeros(SIZE)
      num_skipped += 1
      consecutive += 1
    history = np.zeros((len(names), window))
    for row, name in enumerate(names):
      for i, x in enumerate(recorded[name]):
        history[row, i % window] = x
    records.append(
      dict(
        branch=branch,
        wrapped=len(recorded[names[0]]) > window,
        update=update,
        params=theta.copy(),
        history=history if metric == "both" else history[0],
        count=len(recorded[names[0]]),
        num_skipped=num_skipped,
        consecutive=consecutive,
        skipped=not take,
        adam=(t, m.copy(), v.copy()),
      )
    )
  return records


def _normal_grads(rng, steps, size=SIZE, spread=0.1):
  """Flat gradients whose norms are ``1 ± spread`` (random directions)."""
  g = rng.normal(size=(steps, size))
  norms = 1.0 + spread * rng.standard_normal(steps)
  return g / np.linalg.norm(g, axis=1, keepdims=True) * norms[:, None]


def _set_norm(g, norm):
  return g / np.linalg.norm(g) * norm


def _sequence(name):
  """(kwargs, grads, losses, the branches the sequence must hit)."""
  rng = np.random.default_rng({"grad_norm": 0, "loss": 1, "both": 2}[name])
  steps = 26
  grads = _normal_grads(rng, steps)
  losses = list(2.0 + 0.1 * rng.standard_normal(steps))
  if name == "grad_norm":
    kwargs = dict(window=5, threshold=4.0, metric="grad_norm", min_history=3)
    grads[1, 2] = np.nan  # non-finite while the window fills
    grads[2] = _set_norm(grads[2], 1.6)  # taken while the window fills, though large
    grads[11] = _set_norm(grads[11], 20.0)
    grads[12, 0] = np.inf
    grads[13, 4] = -np.inf
    grads[18] = _set_norm(grads[18], 5.0)
    grads[19] = _set_norm(grads[19], 0.2)  # low values are taken (one-sided)
    want = {"warmup", "warmup_nonfinite", "armed", "spike", "nonfinite"}
  elif name == "loss":
    kwargs = dict(window=4, threshold=3.0, metric="loss", max_consecutive=2)
    losses[6] = 12.0
    losses[7] = math.nan
    for i in range(10, steps):  # a lasting change of level
      losses[i] += 3.0
    losses[12] = math.inf  # while consecutive >= max_consecutive: still skipped
    want = {"warmup", "armed", "spike", "nonfinite", "forced"}
  elif name == "both":
    kwargs = dict(window=6, threshold=5.0, metric="both", min_history=2, max_consecutive=3)
    grads[5] = _set_norm(grads[5], 30.0)  # the norm alone
    losses[8] = 40.0  # the loss alone
    losses[10] = math.nan  # a NaN loss with a finite gradient
    grads[11, 3] = np.inf  # an infinite gradient with a finite loss
    grads[12] = _set_norm(grads[12], 30.0)
    losses[12] = 40.0  # both
    grads[16:20] = [_set_norm(g, 9.0) for g in grads[16:20]]  # 3 spikes, then forced
    want = {"warmup", "armed", "spike", "nonfinite", "forced"}
  else:  # pragma: no cover
    raise AssertionError(name)
  return kwargs, grads, [float(x) for x in losses], want


@functools.cache
def _jitted_update(tx):
  return jax.jit(tx.update)


@pytest.mark.parametrize("name", ["grad_norm", "loss", "both"])
def test_matches_the_numpy_reference_step_by_step(name):
  kwargs, grads, losses, want = _sequence(name)
  lr = 0.05
  records = _reference(
    grads, losses, lr=lr, **{"min_history": None, "max_consecutive": None, **kwargs}
  )
  branches = {r["branch"] for r in records}
  assert want <= branches, want - branches  # every branch of the rule is exercised
  assert records[-1]["wrapped"]  # more values than the window: the ring wrapped around

  tx = skip_spikes(optax.adam(lr), **kwargs)
  update = _jitted_update(tx)
  params = PARAMS
  state = tx.init(params)
  for step, (g, loss, ref) in enumerate(zip(grads, losses, records, strict=True)):
    previous_inner = state.inner_state
    updates, state = update(_unflat(g), state, params, loss=loss)
    params = optax.apply_updates(params, updates)
    err = f"step {step} ({ref['branch']})"
    np.testing.assert_allclose(_flat(updates), ref["update"], rtol=1e-4, atol=1e-7, err_msg=err)
    np.testing.assert_allclose(_flat(params), ref["params"], rtol=1e-5, atol=1e-6, err_msg=err)
    np.testing.assert_allclose(state.history, ref["history"], rtol=1e-6, err_msg=err)
    assert int(state.count) == ref["count"], err
    assert int(state.num_skipped) == ref["num_skipped"], err
    assert int(state.consecutive) == ref["consecutive"], err
    assert bool(state.skipped) == bool(has_skipped(state)) == ref["skipped"], err
    adam = state.inner_state[0]
    t, m, v = ref["adam"]
    assert int(adam.count) == t, err
    np.testing.assert_allclose(_flat(adam.mu), m, rtol=1e-5, atol=1e-8, err_msg=err)
    np.testing.assert_allclose(_flat(adam.nu), v, rtol=1e-5, atol=1e-10, err_msg=err)
    if ref["skipped"]:  # the inner state is bit-identical and the emitted zeros exact
      for new, old in zip(
        jax.tree.leaves(state.inner_state), jax.tree.leaves(previous_inner), strict=True
      ):
        np.testing.assert_array_equal(new, old, err_msg=err)
      assert not np.any(_flat(updates)), err
  assert state.history.dtype == jnp.float32
  assert state.history.shape == (
    (2, kwargs["window"]) if name == "both" else (kwargs["window"],)
  )


def test_the_statistics_use_the_last_window_values_and_the_population_std():
  tx = skip_spikes(optax.sgd(1.0), window=3, threshold=1.0, metric="loss")
  state = tx.init(jnp.zeros(1))
  for loss in [1.0, 2.0, 3.0, 10.0, 2.5]:  # 10 > 2 + sqrt(2/3): a spike, not recorded
    _, state = _jitted_update(tx)(jnp.zeros(1), state, loss=loss)
  assert int(state.count) == 4 and int(state.num_skipped) == 1
  np.testing.assert_array_equal(state.history, [2.5, 2.0, 3.0])  # 2.5 overwrote 1.0
  # The last three (2.5, 2, 3): mean 2.5, population std sqrt(1/6), limit 2.908. All four
  # recorded values would give 2.865, the sample std a limit of 3.0.
  for loss, skipped in [(2.89, False), (2.95, True)]:
    _, new = _jitted_update(tx)(jnp.zeros(1), state, loss=loss)
    assert bool(new.skipped) == skipped, loss


def test_the_first_call_and_a_constant_history():
  tx = skip_spikes(optax.sgd(1.0), window=4, min_history=1, metric="loss")
  state = tx.init(jnp.zeros(1))
  assert not bool(has_skipped(state))
  _, state = _jitted_update(tx)(jnp.ones(1), state, loss=1.0)  # nothing recorded: taken
  assert not bool(state.skipped) and int(state.count) == 1
  _, new = _jitted_update(tx)(
    jnp.ones(1), state, loss=1.0
  )  # equal to a constant history: taken
  assert not bool(new.skipped)
  _, new = _jitted_update(tx)(
    jnp.ones(1), state, loss=1.0 + 1e-6
  )  # std 0: any larger value spikes
  assert bool(new.skipped)


def test_the_norm_is_the_global_l2_norm_in_float32_without_overflow():
  tx = skip_spikes(optax.sgd(1.0), window=2)
  grads = {"a": jnp.array([3.0, 0.0], jnp.bfloat16), "b": jnp.array([[4.0]], jnp.bfloat16)}
  _, state = _jitted_update(tx)(grads, tx.init(grads))
  assert state.history.dtype == jnp.float32
  np.testing.assert_allclose(state.history, [5.0, 0.0])
  big = jnp.array([3e30, 4e30], jnp.float32)  # the sum of squares overflows float32
  _, state = _jitted_update(tx)(big, tx.init(big))
  np.testing.assert_allclose(state.history, [5e30, 0.0], rtol=1e-6)
  assert int(state.count) == 1  # finite gradients: a finite norm, taken (window filling)


# ---------------------------------------------------------------------------------------------
# The inner update, its extra arguments and the accessor.


def _scaling_inner():
  """An inner transformation that reads an extra argument and must never see ``loss``."""

  def update(updates, state, params=None, *, scale=1.0, **extra):
    assert "loss" not in extra, extra
    return jax.tree.map(lambda u: u * scale, updates), optax.safe_increment(state)

  return optax.GradientTransformationExtraArgs(lambda p: jnp.zeros([], jnp.int32), update)


@pytest.mark.parametrize("metric", ["grad_norm", "loss"])
def test_extra_arguments_other_than_loss_reach_the_inner_update(metric):
  tx = skip_spikes(_scaling_inner(), window=2, metric=metric)
  params = jnp.ones(2)
  updates, state = jax.jit(tx.update)(params, tx.init(params), params, loss=1.0, scale=3.0)
  np.testing.assert_array_equal(updates, [3.0, 3.0])
  assert int(state.inner_state) == 1


def test_has_skipped_reads_a_chain_state_and_names_itself_when_missing():
  tx = optax.chain(optax.clip_by_global_norm(10.0), skip_spikes(optax.adam(1e-2), window=2))
  params = {"w": jnp.ones(3)}
  state = tx.init(params)
  assert not bool(has_skipped(state))
  _, state = _jitted_update(tx)({"w": jnp.array([1.0, jnp.nan, 0.0])}, state, params)
  assert bool(has_skipped(state))
  assert has_skipped(state).dtype == jnp.bool_ and has_skipped(state).shape == ()
  assert int(optax.tree.get(state, "num_skipped")) == 1
  with pytest.raises(ValueError, match=r"^od.has_skipped: .*SkipSpikesState"):
    has_skipped(optax.adam(1e-2).init(params))


def test_in_a_chain_the_loss_passes_through():
  inner = skip_spikes(optax.adam(1e-2), window=3, min_history=2, metric="loss")
  tx = optax.chain(optax.clip_by_global_norm(1.0), inner, optax.scale(1.0))
  params = jnp.ones(2)
  state = tx.init(params)
  update = jax.jit(tx.update)
  for loss, skipped in [(1.0, False), (1.1, False), (50.0, True), (1.05, False)]:
    updates, state = update(jnp.ones(2), state, params, loss=loss)
    assert bool(has_skipped(state)) == skipped
    assert bool(jnp.all(updates == 0)) == skipped


def test_a_missing_or_non_scalar_loss_and_mismatched_trees_raise():
  tx = skip_spikes(optax.sgd(1.0), metric="both")
  params = {"w": jnp.ones(2)}
  state = tx.init(params)
  with pytest.raises(ValueError, match=r"^od.skip_spikes: metric='both' needs the loss"):
    jax.eval_shape(tx.update, params, state, params)
  with pytest.raises(ValueError, match=r"^od.skip_spikes: loss must be a scalar"):
    jax.eval_shape(functools.partial(tx.update, loss=jnp.ones(3)), params, state, params)
  with pytest.raises(ValueError, match=r"^od.skip_spikes: .*tree structure"):
    jax.eval_shape(
      functools.partial(tx.update, loss=1.0),
      {"w": params["w"], "v": params["w"]},
      state,
      params,
    )
  # grad_norm needs no loss and ignores one
  tx = skip_spikes(optax.sgd(1.0))
  jax.eval_shape(tx.update, params, tx.init(params), params)
  jax.eval_shape(
    functools.partial(tx.update, loss=jnp.ones(3)), params, tx.init(params), params
  )


# ---------------------------------------------------------------------------------------------
# lax.scan, dtypes and the state's layout.


def test_lax_scan_equals_the_step_by_step_run_and_the_state_is_stable():
  kwargs, grads, losses, _ = _sequence("both")
  tx = skip_spikes(optax.adam(0.05), **kwargs)
  seq = jax.vmap(_unflat)(jnp.asarray(grads, jnp.float32))

  def body(carry, xs):
    params, state = carry
    g, loss = xs
    updates, state = tx.update(g, state, params, loss=loss)
    return (optax.apply_updates(params, updates), state), state.skipped

  run = jax.jit(lambda c, xs: jax.lax.scan(body, c, xs))
  (params, state), skipped = run((PARAMS, tx.init(PARAMS)), (seq, jnp.asarray(losses)))

  step_params, step_state = PARAMS, tx.init(PARAMS)
  update = _jitted_update(tx)
  for i, loss in enumerate(losses):
    updates, step_state = update(
      jax.tree.map(lambda x, i=i: x[i], seq), step_state, step_params, loss=loss
    )
    step_params = optax.apply_updates(step_params, updates)
  assert_trees_close(params, step_params, rtol=1e-6, atol=1e-7)
  assert_trees_close(state, step_state, rtol=1e-6, atol=1e-7)
  assert int(skipped.sum()) == int(state.num_skipped) > 0


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dtypes_are_kept_and_the_state_is_stable(dtype):
  params = jax.tree.map(lambda p: p.astype(dtype), PARAMS)
  grads = jax.tree.map(lambda p: p * 0.5, params)
  tx = skip_spikes(optax.adam(1e-2), window=3, metric="both")
  assert_keeps_dtype(tx, params, grads, loss=jnp.asarray(1.0, dtype))
  # bf16 through lax.scan, spikes included: the zeros of a skipped call keep the dtype
  tx = skip_spikes(optax.adam(1e-2), window=4, min_history=2)
  seq = jax.tree.map(
    lambda p: jnp.stack([p * s for s in (1, 1.1, 0.9, 100, jnp.nan, 1)]), grads
  )
  out, state, updates = run_scan(tx, params, seq)
  assert shapes_and_dtypes(out) == shapes_and_dtypes(params)
  for u, p in zip(jax.tree.leaves(updates), jax.tree.leaves(params), strict=True):
    assert u.dtype == p.dtype
    assert not bool(jnp.any(u[3:5]))  # the two spikes emitted exact zeros
  assert int(state.num_skipped) == 2 and int(state.count) == 4


def test_the_state_holds_no_param_shaped_leaf_outside_inner_state():
  tx = skip_spikes(optax.adam(1e-2), window=8, metric="both")
  state = tx.init(PARAMS)
  assert isinstance(state, SkipSpikesState)
  assert shapes_and_dtypes(state._replace(inner_state=None)) == SkipSpikesState(
    history=((2, 8), jnp.float32),
    count=((), jnp.int32),
    num_skipped=((), jnp.int32),
    consecutive=((), jnp.int32),
    skipped=((), jnp.bool_),
    inner_state=None,
  )
  abstract = jax.eval_shape(tx.init, PARAMS)
  assert shapes_and_dtypes(abstract) == shapes_and_dtypes(state)


def _temp_bytes(tx, params, x=None):
  """Compiled temp memory of a step with the params and the state donated: ``update`` alone
  on given gradients (``x`` None), or the gradients, ``update`` and ``apply_updates``."""

  def loss_fn(params, x):
    for i in range(3):
      x = jnp.tanh(x @ params[f"l{i}"])
    return jnp.mean(x**2)

  def step(params, state, x):
    if x is None:
      return tx.update(params, state, params, loss=1.0)
    loss, grads = jax.value_and_grad(loss_fn)(params, x)
    updates, state = tx.update(grads, state, params, loss=loss)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, x).compile()
  return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("metric", ["grad_norm", "loss"])
def test_compiled_temp_memory(metric):
  params = {f"l{i}": jnp.full((256, 256), 0.01) for i in range(3)}
  leaf_bytes = 256 * 256 * 4
  tx = skip_spikes(optax.adam(1e-3), metric=metric)
  # The updates and the inner state pass through the cond in place: no param-sized buffer
  # but, for the norm, one leaf-sized transient (XLA:CPU materialises a leaf's squares).
  transient = leaf_bytes if metric == "grad_norm" else 0
  assert _temp_bytes(tx, params) <= transient + leaf_bytes // 8
  # Gradients computed in the step: the cond needs them whole (three leaves), and the norm
  # at most one leaf-sized transient more; optax.apply_if_finite keeps two trees.
  x = jnp.ones((16, 256))
  guarded = _temp_bytes(tx, params, x)
  assert guarded <= 4.2 * leaf_bytes, guarded / leaf_bytes
  finite = _temp_bytes(
    optax.with_extra_args_support(optax.apply_if_finite(optax.adam(1e-3), 3)), params, x
  )
  assert guarded < finite, (guarded, finite)


# ---------------------------------------------------------------------------------------------
# With od.accumulate, inside and around.


def test_inside_accumulate_it_judges_window_means_and_reads_the_emitting_calls_loss():
  k = 2
  tx = od.accumulate(skip_spikes(optax.sgd(1.0), window=4, metric="both"), k)
  rng = np.random.default_rng(1)
  grads = rng.normal(size=(6, 3)).astype(np.float32)
  losses = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
  params = jnp.zeros(3)
  state = tx.init(params)
  update = jax.jit(tx.update)
  for g, loss in zip(grads, losses, strict=True):
    _, state = update(jnp.asarray(g), state, params, loss=loss)
  inner = state.inner_state
  assert isinstance(inner, SkipSpikesState) and int(inner.count) == 3
  means = grads.reshape(3, k, 3).mean(1)
  np.testing.assert_allclose(inner.history[0, :3], np.linalg.norm(means, axis=1), rtol=1e-6)
  np.testing.assert_array_equal(inner.history[1, :3], [2.0, 4.0, 6.0])  # emitting calls


def test_around_accumulate_a_spiking_micro_batch_is_dropped():
  rng = np.random.default_rng(2)
  normal = _normal_grads(rng, 8, size=3).astype(np.float32)
  spike = np.array([40.0, 0.0, 0.0], np.float32)
  seq = np.concatenate([normal[:4], spike[None], normal[4:]])  # the 5th call spikes
  tx = skip_spikes(od.accumulate(optax.adam(0.1), 2), window=4, min_history=4)
  params, state, updates = run_scan(tx, jnp.zeros(3), jnp.asarray(seq))
  plain, plain_state, _ = run_scan(od.accumulate(optax.adam(0.1), 2), jnp.zeros(3), normal)
  assert int(state.num_skipped) == 1 and not bool(jnp.any(updates[4]))
  assert_trees_close(params, plain, rtol=1e-6)
  assert_trees_close(state.inner_state, plain_state, rtol=1e-6)

  # On the skipped call od.has_updated keeps its value (the inner state is untouched).
  state = tx.init(jnp.zeros(3))
  for g in seq[:5]:
    _, state = _jitted_update(tx)(jnp.asarray(g), state)
  assert bool(has_skipped(state)) and bool(od.has_updated(state))


# ---------------------------------------------------------------------------------------------
# Flax: nnx.Optimizer forwards loss=; TrainState (grad_norm).


def test_nnx_optimizer_forwards_the_loss():
  from flax import nnx

  model = nnx.Linear(3, 1, rngs=nnx.Rngs(0))
  tx = skip_spikes(optax.adam(1e-2), window=8, min_history=4, metric="loss")
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer, x, y):
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
    optimizer.update(model, grads, loss=loss)
    return loss

  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(16, 3)), jnp.float32)
  y = x @ jnp.array([[1.0], [-1.0], [0.5]])
  for _ in range(6):
    train_step(model, optimizer, x, y)
    assert not bool(has_skipped(optimizer.opt_state))
  params = lambda: jax.tree.map(jnp.array, nnx.as_pure(nnx.state(model, nnx.Param)))
  before = params()
  train_step(model, optimizer, x, y * 1e3)  # a corrupted batch: the loss spikes
  assert bool(has_skipped(optimizer.opt_state))
  assert_trees_close(params(), before, rtol=0)
  train_step(model, optimizer, x, y)
  assert not bool(has_skipped(optimizer.opt_state))
  state = jax.tree.map(jnp.asarray, nnx.as_pure(optimizer.opt_state))
  assert int(state.count) == 7 and int(state.num_skipped) == 1


def test_flax_train_state():
  from flax.training import train_state

  tx = skip_spikes(optax.sgd(0.1), window=4, min_history=2)
  state = train_state.TrainState.create(apply_fn=None, params=PARAMS, tx=tx)
  step = jax.jit(lambda s, g: s.apply_gradients(grads=g))
  grads = jax.tree.map(jnp.ones_like, PARAMS)
  for scale in (1.0, 1.1, 0.9):
    state = step(state, jax.tree.map(lambda g, s=scale: g * s, grads))
    assert not bool(has_skipped(state.opt_state))
  before = state.params
  state = step(state, jax.tree.map(lambda g: g * 1e3, grads))
  assert bool(has_skipped(state.opt_state))
  assert_trees_close(state.params, before, rtol=0)


# ---------------------------------------------------------------------------------------------
# A loss curve with injected spikes: the guarded run recovers, the plain one does not.


def test_a_guarded_run_rides_through_injected_spikes():
  rng = np.random.default_rng(0)
  n, d, steps, batch = 512, 8, 300, 32
  x_all = rng.normal(size=(n, d)).astype(np.float32)
  y_all = (x_all @ rng.normal(size=d) + 0.5 * rng.normal(size=n) > 0).astype(np.float32)
  batches = jnp.asarray(rng.integers(0, n, size=(steps, batch)))
  spikes = [100, 150, 200]
  corrupt = np.ones(steps, np.float32)
  corrupt[spikes] = 1e3  # corrupted batches: inputs a thousand times too large
  x_all, y_all = jnp.asarray(x_all), jnp.asarray(y_all)

  def loss_fn(w, x, y):
    return jnp.mean(optax.sigmoid_binary_cross_entropy(x @ w, y))

  @functools.partial(jax.jit, static_argnums=0)
  def curve(tx, corrupt):
    def body(carry, xs):
      w, state = carry
      rows, factor = xs
      loss, grads = jax.value_and_grad(loss_fn)(w, x_all[rows] * factor, y_all[rows])
      updates, state = tx.update(grads, state, w, loss=loss)
      w = optax.apply_updates(w, updates)
      return (w, state), loss_fn(w, x_all, y_all)

    w = jnp.zeros(d)
    return jax.lax.scan(body, (w, tx.init(w)), (batches, corrupt))[1]

  run = lambda tx, corrupt: np.asarray(curve(tx, corrupt))
  sgd = optax.with_extra_args_support(optax.sgd(0.1))
  guard = skip_spikes(optax.sgd(0.1), window=64, min_history=20, metric="both")
  plain, guarded = run(sgd, corrupt), run(guard, corrupt)
  clean = run(sgd, np.ones(steps, np.float32))
  before = plain[spikes[0] - 1]
  assert plain[spikes[0]] > 10 * before  # one corrupted batch derails the plain run
  assert plain[-1] > 5 * guarded[-1]  # and it never gets back
  assert np.all(guarded[spikes[0] :] <= before * 1.05)  # the guarded run never jumps
  np.testing.assert_allclose(guarded[-1], clean[-1], rtol=0.02)  # as if the spikes were not


# ---------------------------------------------------------------------------------------------
# Invalid arguments.

_SGD = optax.sgd(1.0)


@pytest.mark.parametrize(
  ("kwargs", "argname"),
  [
    (dict(inner="adam"), "inner"),
    (dict(inner=optax.adam), "inner"),
    (dict(window=0), "window"),
    (dict(window=2.5), "window"),
    (dict(window=True), "window"),
    (dict(window=lambda count: 4), "window"),
    (dict(threshold=0.0), "threshold"),
    (dict(threshold=-1.0), "threshold"),
    (dict(threshold=math.nan), "threshold"),
    (dict(threshold=math.inf), "threshold"),
    (dict(threshold="6"), "threshold"),
    (dict(threshold=True), "threshold"),
    (dict(threshold=lambda count: 6.0), "threshold"),
    (dict(threshold=np.array([6.0, 3.0])), "threshold"),
    (dict(metric="norm"), "metric"),
    (dict(metric=None), "metric"),
    (dict(min_history=0), "min_history"),
    (dict(window=4, min_history=5), "min_history"),
    (dict(min_history=2.0), "min_history"),
    (dict(max_consecutive=0), "max_consecutive"),
    (dict(max_consecutive=1.5), "max_consecutive"),
    (dict(max_consecutive="3"), "max_consecutive"),
  ],
)
def test_invalid_arguments_raise_value_error_naming_the_argument(kwargs, argname):
  kwargs = {"inner": _SGD, **kwargs}
  with pytest.raises(ValueError, match=rf"^od.skip_spikes: {argname} "):
    skip_spikes(**kwargs)


def test_valid_edge_arguments():
  skip_spikes(_SGD, window=1, min_history=1, max_consecutive=1, threshold=1e-6)
  skip_spikes(_SGD, window=np.int32(4), min_history=jnp.asarray(4), threshold=np.float32(3))
  skip_spikes(_SGD, threshold=jnp.asarray(2.0))


def test_an_injected_threshold():
  static = ("window", "metric", "min_history", "max_consecutive")
  make = optax.inject_hyperparams(skip_spikes, static_args=static)
  tx = make(optax.sgd(1.0), window=4, min_history=2, threshold=100.0)
  params = jnp.ones(2)
  state = tx.init(params)
  update = jax.jit(tx.update)
  for scale in (1.0, 1.2, 1.4):  # mean 1.1, std 0.1 before the third: 1.4 is 3 std above
    _, state = update(params * scale, state, params)
  assert not bool(has_skipped(state))
  state.hyperparams["threshold"] = jnp.asarray(2.0)
  _, state = update(params * 1.8, state, params)  # 1.8 > 1.2 + 2 * 0.163
  assert bool(has_skipped(state))
