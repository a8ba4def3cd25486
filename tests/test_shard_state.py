"""od.shard_state: the state on shardings of its own (ZeRO-1), on the 8 host devices."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from helpers import assert_trees_close
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import optaxderived as od
from optaxderived._transforms.shard_state import shard_state

needs_8 = pytest.mark.skipif(
  jax.device_count() < 8, reason="needs the 8 host devices of conftest.py"
)

_rng = np.random.default_rng(0)
PARAMS = {
  "emb": _rng.normal(size=(16, 4)).astype(np.float32),
  "dense": {
    "kernel": _rng.normal(size=(8, 8)).astype(np.float32),
    "bias": _rng.normal(size=(3,)).astype(np.float32),  # 3 rows: not divisible by 8
  },
}
BATCH = _rng.normal(size=(16, 4)).astype(np.float32)


def loss(params, x):
  h = jnp.tanh(x @ params["emb"].T[:, :8] @ params["dense"]["kernel"])
  return jnp.mean((h[:, :3] + params["dense"]["bias"]) ** 2)


def data_mesh() -> Mesh:
  return Mesh(np.array(jax.devices()[:8]), ("data",))  # Auto axes


def zero1(mesh: Mesh):
  """The ZeRO-1 rule: the first axis over "data" where it divides, else replicated."""
  return lambda path, p: P("data") if p.ndim and p.shape[0] % mesh.size == 0 else P()


def train(tx, params, batch, n, *, out_shardings=None):
  """``n`` jitted steps; returns the params, the state and the compiled step."""

  def step(params, state, x):
    grads = jax.grad(loss)(params, x)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  state = jax.jit(tx.init)(params)
  compiled = jax.jit(step, out_shardings=out_shardings).lower(params, state, batch).compile()
  for _ in range(n):
    params, state = compiled(params, state, batch)
  return params, state, compiled


def collectives(hlo: str) -> set[str]:
  ops = r"all-gather|reduce-scatter|all-reduce|all-to-all|collective-permute|dynamic-slice"
  return set(re.findall(rf"\b({ops})(?:-start)?\(", hlo))


def gathered_shapes(hlo: str) -> set[str]:
  return set(re.findall(r"= \w+\[([\d,]*)\]\S* all-gather(?:-start)?\(", hlo))


@needs_8
def test_zero1_moments_sharded_params_replicated_same_values():
  mesh = data_mesh()
  replicated = NamedSharding(mesh, P())
  rows = NamedSharding(mesh, P("data"))
  params = jax.device_put(PARAMS, replicated)
  batch = jax.device_put(BATCH, rows)  # data parallel: the batch split over "data"
  tx = shard_state(optax.adam(1e-2), zero1(mesh), mesh=mesh)

  got_params, got_state, compiled = train(tx, params, batch, 3)
  # The state outputs of the compiled step have the requested shardings...
  for name in ("mu", "nu"):
    moment = optax.tree.get(got_state, name)
    for leaf in (moment["emb"], moment["dense"]["kernel"]):
      assert leaf.sharding.is_equivalent_to(rows, leaf.ndim), leaf.sharding
      assert leaf.addressable_shards[0].data.shape[0] == leaf.shape[0] // 8  # 1/8 each
    assert moment["dense"]["bias"].sharding.is_equivalent_to(replicated, 1)
  out_shardings = jax.tree.leaves(compiled.output_shardings[1])
  for s, leaf in zip(out_shardings, jax.tree.leaves(got_state), strict=True):
    assert s.is_equivalent_to(leaf.sharding, leaf.ndim)
  # ... and the params stay replicated (the updates are placed like the params).
  for p in jax.tree.leaves(got_params):
    assert p.sharding.is_equivalent_to(replicated, p.ndim)

  # The communication of ZeRO-1: the gradient's all-reduce, a local dynamic-slice of it to
  # the device's rows of the moments, and an all-gather of the updated rows (the updates of
  # the two sharded params, gathered whole to be added to the replicated params).
  hlo = compiled.as_text()
  ops = collectives(hlo)
  assert "all-reduce" in ops or "reduce-scatter" in ops, ops
  assert "dynamic-slice" in ops or "reduce-scatter" in ops, ops
  assert {"16,4", "8,8"} <= gathered_shapes(hlo), gathered_shapes(hlo)

  # The values are those of the inner on one device.
  want_params, want_state, _ = train(optax.adam(1e-2), PARAMS, BATCH, 3)
  assert_trees_close(got_params, want_params, rtol=1e-6, atol=1e-7)
  assert_trees_close(got_state, want_state, rtol=1e-6, atol=1e-7)

  # Without shard_state the moments follow the replicated params, and nothing is gathered.
  plain_params, plain_state, plain = train(optax.adam(1e-2), params, batch, 3)
  assert not gathered_shapes(plain.as_text())
  assert optax.tree.get(plain_state, "mu")["emb"].sharding.is_equivalent_to(replicated, 2)
  assert_trees_close(got_params, plain_params, rtol=1e-6, atol=1e-7)


@needs_8
def test_every_param_shaped_leaf_of_a_wrapper_chain_is_placed():
  """accumulate(lookahead(adam)) and an EMA: the accumulator, the slow weights, the moments
  and the average all go to the rule's sharding; the counters stay replicated."""
  mesh = data_mesh()
  replicated = NamedSharding(mesh, P())
  rows = NamedSharding(mesh, P("data"))
  params = jax.device_put(PARAMS, replicated)
  inner = lambda: optax.chain(  # noqa: E731
    od.accumulate(od.lookahead(optax.adam(1e-2), 2), 2), od.param_ema(0.9)
  )
  tx = shard_state(inner(), zero1(mesh), mesh=mesh)
  got_params, got_state, _ = train(tx, params, jax.device_put(BATCH, rows), 4)
  placed = 0
  for path, leaf in jax.tree_util.tree_leaves_with_path(got_state):
    if leaf.shape in ((16, 4), (8, 8)):
      assert leaf.sharding.is_equivalent_to(rows, leaf.ndim), jax.tree_util.keystr(path)
      placed += 1
    else:
      assert leaf.sharding.is_equivalent_to(replicated, leaf.ndim), jax.tree_util.keystr(path)
  assert placed == 2 * 5  # accumulator, slow, mu, nu, ema for each of the two params
  for p in jax.tree.leaves(got_params):
    assert p.sharding.is_equivalent_to(replicated, p.ndim)
  assert bool(od.has_updated(got_state))
  assert od.ema_params(got_state, got_params)["emb"].sharding.is_equivalent_to(rows, 2)
  want_params, want_state, _ = train(inner(), PARAMS, BATCH, 4)
  assert_trees_close(got_params, want_params, rtol=1e-6, atol=1e-7)
  assert_trees_close(got_state, want_state, rtol=1e-6, atol=1e-7)


@needs_8
def test_trees_of_specs_and_shardings_none_leaves_and_masked_states():
  mesh = data_mesh()
  replicated = NamedSharding(mesh, P())
  params = jax.device_put(PARAMS, replicated)
  specs = {"emb": P("data", None), "dense": {"kernel": None, "bias": P()}}
  shardings = {
    "emb": replicated,
    "dense": {"kernel": NamedSharding(mesh, P(None, "data")), "bias": None},
  }
  # (a weight decay that leaves the bias out: its state has a MaskedNode there)
  inner = lambda: optax.chain(od.weight_decay(0.1, exclude="bias"), optax.adam(1e-2))  # noqa: E731
  for rule, want in (
    (shard_state(inner(), specs, mesh=mesh), {"emb": P("data"), "kernel": P()}),
    (shard_state(inner(), shardings), {"emb": P(), "kernel": P(None, "data")}),
  ):
    state = jax.jit(rule.init)(params)
    mu = optax.tree.get(state, "mu")
    assert mu["emb"].sharding.is_equivalent_to(NamedSharding(mesh, want["emb"]), 2)
    assert mu["dense"]["kernel"].sharding.is_equivalent_to(
      NamedSharding(mesh, want["kernel"]), 2
    )
    assert mu["dense"]["bias"].sharding.is_equivalent_to(replicated, 1)
    got, _, _ = train(rule, params, BATCH, 2)
    want_params, _, _ = train(inner(), PARAMS, BATCH, 2)
    assert_trees_close(got, want_params, rtol=1e-6, atol=1e-7)


@needs_8
def test_an_explicit_mesh_and_a_context_mesh():
  """``jax.make_mesh`` gives Explicit axes, where the placement is a reshard; a bare
  PartitionSpec takes the mesh of ``jax.set_mesh``."""
  mesh = jax.make_mesh((8,), ("data",))
  replicated = NamedSharding(mesh, P())
  rows = NamedSharding(mesh, P("data"))
  tx = shard_state(optax.adam(1e-2), zero1(mesh))  # PartitionSpecs, no mesh=
  with jax.set_mesh(mesh):
    params = jax.device_put(PARAMS, replicated)
    got_params, got_state, _ = train(tx, params, jax.device_put(BATCH, rows), 3)
  mu = optax.tree.get(got_state, "mu")
  assert mu["emb"].sharding.is_equivalent_to(rows, 2)
  assert mu["dense"]["bias"].sharding.is_equivalent_to(replicated, 1)
  for p in jax.tree.leaves(got_params):
    assert p.sharding.is_equivalent_to(replicated, p.ndim)
  want_params, _, _ = train(optax.adam(1e-2), PARAMS, BATCH, 3)
  assert_trees_close(got_params, want_params, rtol=1e-6, atol=1e-7)


@needs_8
def test_eager_init_and_update_move_the_arrays():
  mesh = data_mesh()
  replicated = NamedSharding(mesh, P())
  rows = NamedSharding(mesh, P("data"))
  params = jax.device_put(PARAMS, replicated)
  inner = lambda: optax.sgd(0.1, momentum=0.9)  # noqa: E731
  tx = shard_state(inner(), zero1(mesh), mesh=mesh)
  state = tx.init(params)
  assert optax.tree.get(state, "trace")["emb"].sharding.is_equivalent_to(rows, 2)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, state = tx.update(grads, state, params)
  assert optax.tree.get(state, "trace")["dense"]["kernel"].sharding.is_equivalent_to(rows, 2)
  for u in jax.tree.leaves(updates):
    assert u.sharding.is_equivalent_to(replicated, u.ndim)
  ref = inner()
  want, _ = ref.update(jax.tree.map(np.ones_like, PARAMS), ref.init(PARAMS), PARAMS)
  assert_trees_close(updates, want, rtol=0)


@needs_8
def test_row_sparse_gradients_through_lazy():
  mesh = data_mesh()
  rows = NamedSharding(mesh, P("data"))
  params = jax.device_put(PARAMS, NamedSharding(mesh, P()))
  grads = {
    "emb": od.sparse.RowSparse(jnp.array([3, 9, 3, -1]), jnp.ones((4, 4))),
    "dense": jax.tree.map(jnp.ones_like, PARAMS["dense"]),
  }

  def run(tx, p):
    def step(p, s, g):
      u, s = tx.update(g, s, p)
      return od.sparse.apply_updates(p, u), s

    return jax.jit(step)(p, jax.jit(tx.init)(p), grads)

  new, state = run(shard_state(od.lazy(optax.adam(1e-2)), zero1(mesh), mesh=mesh), params)
  assert optax.tree.get(state, "mu")["emb"].sharding.is_equivalent_to(rows, 2)
  want, _ = run(od.lazy(optax.adam(1e-2)), PARAMS)
  assert_trees_close(new, want, rtol=1e-6, atol=1e-7)


@needs_8
def test_checkpoint_restore_continues_bit_identically(tmp_path):
  """Restore into a target with the rule's shardings (the state's own, not the params')."""
  mesh = data_mesh()
  replicated = NamedSharding(mesh, P())
  params = jax.device_put(PARAMS, replicated)
  batch = jax.device_put(BATCH, NamedSharding(mesh, P("data")))
  tx = shard_state(od.accumulate(optax.adam(1e-2), 2), zero1(mesh), mesh=mesh)
  params3, state3, compiled = train(tx, params, batch, 3)
  uninterrupted = compiled(*compiled(params3, state3, batch), batch)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(tmp_path / "ckpt", {"params": params3, "opt_state": state3})
  # A fresh process' target: the shapes from jax.eval_shape, the shardings from the jitted
  # init's own (what the rule gives; the counters replicated).
  tx2 = shard_state(od.accumulate(optax.adam(1e-2), 2), zero1(mesh), mesh=mesh)
  state_shardings = jax.jit(tx2.init).lower(params).compile().output_shardings
  target = jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
    jax.eval_shape(lambda: {"params": params, "opt_state": tx2.init(params)}),
    {"params": jax.tree.map(lambda _: replicated, params), "opt_state": state_shardings},
  )
  with ocp.StandardCheckpointer() as checkpointer:
    restored = checkpointer.restore(tmp_path / "ckpt", target)
  for a, b in zip(jax.tree.leaves(restored["opt_state"]), jax.tree.leaves(state3), strict=True):
    assert a.sharding.is_equivalent_to(b.sharding, a.ndim)
    np.testing.assert_array_equal(a, b)
  resumed = compiled(*compiled(restored["params"], restored["opt_state"], batch), batch)
  for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(uninterrupted), strict=True):
    np.testing.assert_array_equal(a, b)


def test_on_one_device_it_is_the_inner_optimizer():
  tx = shard_state(optax.adam(1e-2), lambda path, p: None)
  got, got_state, _ = train(tx, PARAMS, BATCH, 2)
  want, want_state, _ = train(optax.adam(1e-2), PARAMS, BATCH, 2)
  assert_trees_close(got, want, rtol=0)
  assert_trees_close(got_state, want_state, rtol=0)


_ADAM = optax.adam(1e-2)
_MESH = Mesh(np.array(jax.devices()[:1]), ("data",))


@pytest.mark.parametrize(
  "kwargs, argname",
  [
    (dict(inner=optax.adam, sharding=lambda path, p: None), "inner"),
    (dict(inner="adam", sharding=lambda path, p: None), "inner"),
    (dict(inner=_ADAM, sharding="data"), "sharding"),
    (dict(inner=_ADAM, sharding={"w": "data"}), "sharding"),
    (dict(inner=_ADAM, sharding={"w": 3}), "sharding"),
    (dict(inner=_ADAM, sharding=lambda path, p: None, mesh="data"), "mesh"),
    (dict(inner=_ADAM, sharding=lambda path, p: None, mesh=jax.devices()), "mesh"),
  ],
)
def test_invalid_arguments_raise_value_error_naming_them(kwargs, argname):
  with pytest.raises(ValueError, match=rf"^od.shard_state: {argname} .*, got "):
    shard_state(**kwargs)


def test_invalid_rules_are_caught_at_init_naming_the_leaf():
  params = {"w": jnp.ones((4, 2)), "b": jnp.ones(2)}
  with pytest.raises(
    ValueError, match=r"^od.shard_state: sharding gives a PartitionSpec for b,"
  ):
    shard_state(_ADAM, lambda path, p: P("data")).init(params)  # no mesh anywhere
  with pytest.raises(ValueError, match=r"^od.shard_state: sharding must give .* b, got 'x'"):
    shard_state(_ADAM, lambda path, p: "x", mesh=_MESH).init(params)
  with pytest.raises(ValueError, match=r"^od.shard_state: sharding must have the tree struc"):
    shard_state(_ADAM, {"w": P()}, mesh=_MESH).init(params)
  tx = shard_state(_ADAM, {"w": P(), "b": None}, mesh=_MESH)
  state = tx.init(params)
  with pytest.raises(ValueError, match=r"^od.shard_state: the updates do not have the tree"):
    tx.update({"w": jnp.ones((4, 2))}, state, params)
  assert math.isfinite(float(jnp.sum(tx.update(params, state, params)[0]["w"])))
