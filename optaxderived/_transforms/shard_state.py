"""Optimizer state on shardings of its own, not its params' (ZeRO-1: sharded moments)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from typing import TypeAlias

import jax
import optax
from jax.experimental.shard_alike import shard_alike
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec
from jax.sharding import Sharding

from optaxderived._core import checks
from optaxderived._core import paths
from optaxderived.sparse._row_sparse import is_row_sparse

ShardingRule: TypeAlias = Callable[[str, Any], Any] | Any
"""A function ``(path, param) -> Sharding | PartitionSpec | None``, or a tree with the params'
structure whose leaves are a ``Sharding``, a ``PartitionSpec`` or ``None``."""

_FN = "od.shard_state"


def _is_spec_leaf(x: Any) -> bool:
  return x is None or isinstance(x, Sharding | PartitionSpec)


def _has_explicit_axes(mesh: Any) -> bool:
  return any(t == AxisType.Explicit for t in getattr(mesh, "axis_types", ()))


def _place(x: jax.Array, target: Any) -> jax.Array:
  """``x`` on ``target`` (a ``Sharding``, or a ``PartitionSpec`` of the context mesh): a
  ``with_sharding_constraint`` on a mesh of ``Auto`` axes (JAX's default for ``Mesh``), a
  ``reshard`` on one with ``Explicit`` axes (the default of ``jax.make_mesh``), where
  ``with_sharding_constraint`` can only assert a sharding the array already has."""
  mesh: Any = (
    jax.sharding.get_abstract_mesh()
    if isinstance(target, PartitionSpec)
    else getattr(target, "mesh", None)
  )
  if _has_explicit_axes(mesh):
    return jax.sharding.reshard(x, target)
  return jax.lax.with_sharding_constraint(x, target)


def _like(u: Any, p: Any) -> Any:
  """The update ``u`` placed like ``p`` (its param, or the incoming update): a concrete
  array's sharding, an explicitly sharded type's sharding, or (under ``jit`` on ``Auto``
  axes, where the sharding is XLA's to choose) the same sharding as ``p``, by
  ``shard_alike``."""
  if is_row_sparse(u) or is_row_sparse(p) or not hasattr(p, "shape"):
    return u
  if getattr(u, "shape", None) != p.shape:
    return u
  if isinstance(p, jax.core.Tracer):
    aval_sharding = getattr(jax.typeof(p), "sharding", None)
    if isinstance(aval_sharding, NamedSharding) and _has_explicit_axes(aval_sharding.mesh):
      return jax.sharding.reshard(u, aval_sharding)
    return shard_alike(u, p)[0]
  sharding = getattr(p, "sharding", None)
  if isinstance(sharding, NamedSharding) and isinstance(u, jax.Array):
    if not u.sharding.is_equivalent_to(sharding, u.ndim):
      return _place(u, sharding)
  return u


def shard_state(
  inner: optax.GradientTransformation,
  sharding: ShardingRule,
  *,
  mesh: jax.sharding.Mesh | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""``inner`` with its param-shaped state on shardings of its own, not its params'.

  Every state leaf of ``inner`` that mirrors a param (found as ``optax.tree_map_params``
  finds them: Adam's moments, an accumulator, Lookahead's slow weights, an EMA) and has its
  shape is placed on the sharding that ``sharding`` gives for that param, in ``init`` and
  after every ``update``; the other leaves (step counts, scalars) and the leaves for which it
  gives ``None`` are left where ``inner`` puts them (on their param's sharding, by JAX's
  propagation). The updates it emits are placed like the params (like the incoming updates
  when ``update`` gets no params), so ``optax.apply_updates`` leaves the params where they
  are.

  With the params replicated over a data-parallel axis and the moments sharded over it,
  this is ZeRO stage 1: each device keeps ``1/n`` of the optimizer state, updates its slice
  of every param (XLA slices the all-reduced gradient, a ``dynamic-slice``, with no
  communication) and all-gathers the updates once, the size of the params. The values are
  those of ``inner`` on one device; only the placement differs.

  Inside ``jit`` the placement is a ``jax.lax.with_sharding_constraint`` on a mesh of
  ``Auto`` axes (the default of ``jax.sharding.Mesh``) and a ``jax.sharding.reshard`` on a
  mesh with ``Explicit`` axes (the default of ``jax.make_mesh``); an eager ``init`` or
  ``update`` moves the arrays. On ``Auto`` axes the updates get the params' sharding through
  ``shard_alike``, so what pins the params pins them: the step's own inputs, or its
  ``out_shardings`` (inside a ``lax.scan`` over steps, constrain the carried params). A plain
  ``jax.jit(tx.init)`` puts the whole state on the mesh, the counters replicated.

  The state is ``inner``'s own (no wrapper): the accessors, ``optax.tree.get`` and
  checkpoints see it as they see ``inner``'s. To restore a checkpoint, give the restore
  target the shardings of the compiled init,
  ``jax.jit(tx.init).lower(params).compile().output_shardings`` (see the scaling guide).

  Args:
    inner: the transformation whose state to place (any optax transformation or chain;
      extra keyword arguments of ``update`` reach it).
    sharding: where each param's state goes: a function ``(path, param) -> Sharding |
      PartitionSpec | None`` called with each param's path (``"dense/kernel"``, as
      :func:`tree_paths` names it) and the param (an array, or a tracer under ``jit``: read
      its ``shape`` and ``ndim``), or a tree with the params' structure whose leaves are a
      ``Sharding``, a ``PartitionSpec`` or ``None``. ``None`` leaves that param's state
      alone. It must give the same answer in ``init`` and ``update``.
    mesh: the mesh a ``PartitionSpec`` refers to; without it a ``PartitionSpec`` needs a
      mesh set by ``jax.set_mesh``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is ``inner``'s.

  Example:
    Adam's moments sharded over a ``"data"`` axis while the params are replicated (on one
    device the mesh has one device and nothing moves):

    >>> import jax
    >>> import jax.numpy as jnp
    >>> import numpy as np
    >>> import optax
    >>> from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    >>> import optaxderived as od
    >>> mesh = Mesh(np.array(jax.devices()), ("data",))
    >>> params = {"w": jnp.ones((8 * len(jax.devices()), 2)), "b": jnp.zeros(3)}
    >>> params = jax.device_put(params, NamedSharding(mesh, P()))  # replicated
    >>> def moments(path, p):  # first axis over "data" where it divides, else replicated
    ...   return P("data") if p.ndim and p.shape[0] % mesh.size == 0 else P()
    >>> tx = od.shard_state(optax.adam(1e-2), moments, mesh=mesh)
    >>> state = jax.jit(tx.init)(params)
    >>> mu = state[0].mu  # each device holds 8 of the rows of w's moment
    >>> mu["w"].sharding.is_equivalent_to(NamedSharding(mesh, P("data")), 2)
    True
    >>> mu["w"].addressable_shards[0].data.shape, mu["b"].addressable_shards[0].data.shape
    ((8, 2), (3,))
    >>> updates, state = jax.jit(tx.update)(params, state, params)
    >>> params = optax.apply_updates(params, updates)
    >>> params["w"].sharding.is_equivalent_to(NamedSharding(mesh, P()), 2)
    True

  References:
    Rajbhandari, Rasley, Ruwase, He, "ZeRO: Memory Optimizations Toward Training Trillion
    Parameter Models", SC 2020, https://arxiv.org/abs/1910.02054. optax issue #548
    (sharding the optimizer state); Flax's optimization cookbook, "Sharding optimization
    state differently from parameters".
  """
  checks.check_transformation(_FN, "inner", inner)
  if mesh is not None and not isinstance(mesh, jax.sharding.Mesh | jax.sharding.AbstractMesh):
    raise ValueError(f"{_FN}: mesh must be a jax.sharding.Mesh or None, got {mesh!r}")
  if not callable(sharding):
    leaves = jax.tree.leaves(sharding, is_leaf=_is_spec_leaf)
    bad = [x for x in leaves if not _is_spec_leaf(x)]
    if bad or isinstance(sharding, str):
      raise ValueError(
        f"{_FN}: sharding must be a function (path, param) -> Sharding | PartitionSpec | "
        f"None or a tree of them, got {sharding!r}"
      )
  inner = optax.with_extra_args_support(inner)

  def resolve(path: str, value: Any) -> Any:
    if value is None or isinstance(value, Sharding):
      return value
    if isinstance(value, PartitionSpec):
      if mesh is not None:
        return NamedSharding(mesh, value)
      if jax.sharding.get_abstract_mesh().empty:
        raise ValueError(
          f"{_FN}: sharding gives a PartitionSpec for {path}, which needs mesh= (or a mesh "
          f"set by jax.set_mesh), got {value!r}"
        )
      return value
    raise ValueError(
      f"{_FN}: sharding must give a Sharding, a PartitionSpec or None for {path}, got {value!r}"
    )

  def targets(tree: Any) -> tuple[Any, list[Any]]:
    """The params' tree of leaf indices and the resolved sharding of each leaf."""
    leaves, structure = jax.tree.flatten(tree, is_leaf=is_row_sparse)
    treedef: Any = structure  # jaxlib's PyTreeDef has no stub mypy can read
    leaf_paths = jax.tree.leaves(paths.tree_paths(treedef.unflatten(list(range(len(leaves))))))
    if callable(sharding):
      given = [sharding(path, p) for path, p in zip(leaf_paths, leaves, strict=True)]
    else:
      try:
        given = treedef.flatten_up_to(sharding)
      except (ValueError, TypeError) as e:
        raise ValueError(
          f"{_FN}: sharding must have the tree structure of the params: {e}"
        ) from None
    resolved = [resolve(path, s) for path, s in zip(leaf_paths, given, strict=True)]
    return treedef.unflatten(list(range(len(leaves)))), resolved

  def place_state(state: Any, tree: Any) -> Any:
    index_tree, resolved = targets(tree)
    shapes = [getattr(p, "shape", None) for p in jax.tree.leaves(tree, is_leaf=is_row_sparse)]
    if all(s is None for s in resolved):
      return state

    def leaf(x: Any, i: int) -> Any:
      if isinstance(x, optax.MaskedNode) or resolved[i] is None:
        return x
      if getattr(x, "shape", None) != shapes[i]:
        return x  # mirrors a param but not its shape (a factored moment): left alone
      return _place(x, resolved[i])

    try:
      return optax.tree_map_params(
        inner, leaf, state, index_tree, is_leaf=lambda x: isinstance(x, optax.MaskedNode)
      )
    except (ValueError, TypeError) as e:
      raise ValueError(
        f"{_FN}: the state's param-shaped trees do not match the params' tree: {e}"
      ) from None

  def init_fn(params):
    return place_state(inner.init(params), params)

  def update_fn(updates, state, params=None, **extra_args):
    if params is not None:
      checks.check_same_tree(_FN, updates, params, "params", is_leaf=is_row_sparse)
    new_updates, state = inner.update(updates, state, params, **extra_args)
    like = updates if params is None else params
    state = place_state(state, like)
    try:
      new_updates = jax.tree.map(_like, new_updates, like, is_leaf=is_row_sparse)
    except (ValueError, TypeError):
      pass  # the inner changed the updates' tree (its own error follows in apply_updates)
    return new_updates, state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
