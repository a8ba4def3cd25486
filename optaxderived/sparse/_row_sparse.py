"""Row-sparse gradients: a table's gradient given only at the rows a batch looks up.

:class:`RowSparse` holds the rows and their values; :func:`row_sparse_grad` computes one from a
loss that looks rows up, without a dense table-sized gradient; :func:`apply_updates` applies
it. ``od.lazy`` updates only those rows of the params and of the optimizer state.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optaxderived._core import checks
from optaxderived._core import numerics
from optaxderived._core import paths


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class RowSparse:
  r"""A gradient (or update) of a table given only at some of its rows.

  Row ``indices[i]`` of the table receives ``values[i]``; duplicate indices are summed.
  An index outside ``[0, num_rows)`` (e.g. ``-1`` or ``num_rows``) is *padding*: it reads
  nothing and writes nothing, so a batch can be padded to a fixed number of rows and
  ``jax.jit`` sees static shapes. A ``RowSparse`` is a pytree (its two arrays are leaves), so
  it goes through ``jit``, ``lax.scan`` and sharding like any array pair.

  ``optax.apply_updates`` (and so Flax ``TrainState.apply_gradients``) adds a ``RowSparse``
  to a table through ``__radd__``, a scatter-add of the rows; :func:`apply_updates` does the
  same explicitly. A transformation that maps over every leaf (clipping, scaling) must not
  see a ``RowSparse``: it would treat the indices as values. Put it inside
  :func:`optaxderived.lazy`.

  Attributes:
    indices: integer array ``[n]``, the rows of the table.
    values: array ``[n, *row_shape]``, one row of values per index (``[n]`` for a vector).

  Example:
    >>> import jax.numpy as jnp
    >>> import optaxderived as od
    >>> values = jnp.array([[1.0], [2.0], [3.0], [9.0]])
    >>> g = od.sparse.RowSparse(jnp.array([2, 0, 2, -1]), values)  # -1: padding
    >>> g.todense(3)[:, 0]
    Array([2., 0., 4.], dtype=float32)
  """

  indices: jax.Array
  values: jax.Array

  # NumPy must not broadcast over a RowSparse: ``np_array + RowSparse`` calls __radd__.
  __array_ufunc__ = None

  def todense(self, num_rows: int) -> jax.Array:
    """The dense ``[num_rows, *row_shape]`` array: duplicates summed, padding dropped."""
    values = jnp.asarray(self.values)
    dense = jnp.zeros((num_rows, *values.shape[1:]), values.dtype)
    return scatter_add(dense, self.indices, values)

  def __radd__(self, other: Any) -> jax.Array:
    other = jnp.asarray(other)
    check_row_sparse("od.sparse.RowSparse.__radd__", self, other)
    return scatter_add(other, self.indices, self.values)


def is_row_sparse(x: Any) -> bool:
  return isinstance(x, RowSparse)


def canonical_indices(indices: jax.Array, num_rows: int) -> jax.Array:
  """Maps every index outside ``[0, num_rows)`` to ``num_rows`` (out of bounds: dropped).

  Indices too narrow to hold ``num_rows`` (uint8 ids of a 256-row table, uint16 ids of a
  65,536-row vocabulary) are widened to int32 first, so the marker cannot wrap around.
  """
  indices = jnp.asarray(indices)
  if jnp.iinfo(indices.dtype).max < num_rows:
    indices = indices.astype(jnp.int32)
  valid = (indices >= 0) & (indices < num_rows)
  return jnp.where(valid, indices, num_rows).astype(indices.dtype)


def take_rows(table: jax.Array, indices: jax.Array, **kwargs: Any) -> jax.Array:
  """``table.at[indices].get(**kwargs)`` for a vector of ``indices``, sharded as the indices
  are (most often replicated) and whole along the rows' own axes."""
  spec = (*jax.typeof(indices).sharding.spec, *(None,) * (table.ndim - 1))
  return _auto(lambda t, i: t.at[i].get(**kwargs), spec, table, indices)


def set_rows(table: jax.Array, rows: jax.Array, values: jax.Array, **kwargs: Any) -> jax.Array:
  """``table.at[rows].set(values, **kwargs)``, in the table's dtype and sharding."""
  set_ = lambda t, i, v: t.at[i].set(v, **kwargs)  # noqa: E731
  return _auto(set_, jax.typeof(table).sharding.spec, table, rows, values.astype(table.dtype))


def scatter_add(table: jax.Array, indices: jax.Array, values: jax.Array) -> jax.Array:
  """``values`` added to the rows ``indices`` of ``table`` (duplicates summed, padding
  dropped), in the table's dtype and sharding."""
  indices = canonical_indices(indices, table.shape[0])
  values = jnp.asarray(values).astype(table.dtype)
  add = lambda t, i, v: t.at[i].add(v, mode="drop")  # noqa: E731
  return _auto(add, jax.typeof(table).sharding.spec, table, indices, values)


def _auto(
  op: Callable[..., jax.Array], out_spec: Any, table: jax.Array, *rest: Any
) -> jax.Array:
  """``op(table, *rest)``, a gather or a scatter of rows. On a table sharded over an explicit
  mesh axis, JAX cannot type the result of a gather or a scatter, and its ``out_sharding=``
  replicates the table first; so the op runs in auto mode (``jax.sharding.auto_axes``),
  where XLA gathers from and scatters into the table's own shards, as on an auto mesh."""
  if not numerics.explicitly_sharded(table):
    return op(table, *rest)
  return jax.sharding.auto_axes(op, out_sharding=jax.P(*out_spec))(table, *rest)


def check_row_sparse(fn: str, g: RowSparse, param: Any, path: str | None = None) -> None:
  """Static checks of a RowSparse against the table it applies to: ``ValueError`` naming
  ``fn`` (and the leaf's ``path``, when given) otherwise."""
  where = fn if path is None else f"{fn}: {path}"
  indices, values = jnp.asarray(g.indices), jnp.asarray(g.values)
  shape = tuple(np.shape(param))
  if indices.ndim != 1 or not jnp.issubdtype(indices.dtype, jnp.integer):
    raise ValueError(
      f"{where}: RowSparse.indices must be a 1-D integer array, got "
      f"{indices.dtype}{list(indices.shape)} (if a transformation that maps over every leaf, "
      "such as clipping or scaling, saw the RowSparse, put it inside od.lazy(...))"
    )
  if len(shape) < 1:
    raise ValueError(f"{where}: a RowSparse needs a table with ndim >= 1, got shape {shape}")
  if values.shape != (indices.shape[0], *shape[1:]):
    raise ValueError(
      f"{where}: RowSparse.values must have shape [n, *row_shape] = "
      f"{[indices.shape[0], *shape[1:]]} for a table of shape {list(shape)} and "
      f"{indices.shape[0]} indices, got {list(values.shape)}"
    )


def apply_updates(params: optax.Params, updates: optax.Updates) -> optax.Params:
  """``optax.apply_updates`` that also scatters :class:`RowSparse` leaves.

  A dense leaf is added as ``optax.apply_updates`` adds it (``p + u`` cast to the param's
  dtype); a ``RowSparse`` leaf is scatter-added to its rows (duplicates summed, padding
  indices dropped), in place when the params are donated to a jitted step.

  Args:
    params: a tree of parameters.
    updates: a tree of updates with the structure of ``params``; a leaf may be a
      :class:`RowSparse`.

  Returns:
    The updated params, with the structure, shapes and dtypes of ``params``.

  Example:
    >>> import jax.numpy as jnp
    >>> import optaxderived as od
    >>> params = {"embed": jnp.zeros((4, 2)), "bias": jnp.zeros(2)}
    >>> updates = {"embed": od.sparse.RowSparse(jnp.array([1, 1, 4]), jnp.ones((3, 2))),
    ...            "bias": jnp.ones(2)}
    >>> new = od.sparse.apply_updates(params, updates)
    >>> new["embed"][:, 0], new["bias"]
    (Array([0., 2., 0., 0.], dtype=float32), Array([1., 1.], dtype=float32))
  """

  fn = "od.sparse.apply_updates"
  param_leaves, structure = jax.tree.flatten(params, is_leaf=lambda x: x is None)
  treedef: Any = structure  # jaxlib's PyTreeDef has no stub mypy can read
  try:
    update_leaves = treedef.flatten_up_to(updates)
  except (ValueError, TypeError) as e:
    raise ValueError(f"{fn}: the updates tree does not match the params tree: {e}") from e
  leaf_paths = jax.tree.leaves(
    paths.tree_paths(treedef.unflatten(list(range(len(param_leaves)))))
  )

  def apply(p, u, path):
    if p is None:
      return None
    if is_row_sparse(u):
      p = jnp.asarray(p)
      check_row_sparse(fn, u, p, path)
      return scatter_add(p, u.indices, u.values)
    return optax.apply_updates(p, u)

  return treedef.unflatten(
    [apply(*leaf) for leaf in zip(param_leaves, update_leaves, leaf_paths, strict=True)]
  )


def row_sparse_grad(
  fun: Callable[..., Any], *, table: paths.Patterns, has_aux: bool = False
) -> Callable[..., Any]:
  r"""``jax.value_and_grad`` for a loss that looks rows of a table up: a :class:`RowSparse`
  gradient for the table, without a dense table-sized gradient.

  ``fun(params, rows, *args, **kwargs)`` computes the loss from the looked-up rows
  ``rows = table[ids]`` (shape ``ids.shape + row_shape``); the table leaf of the ``params``
  it receives is replaced by ``None``, so a loss that still reads the table fails loudly
  instead of silently losing that part of the gradient (weight-tied output embeddings need
  the dense gradient). With :math:`\ell(\text{rows})` the loss,

  .. math::

    \nabla_{\text{table}} \ell = \sum_k e_{\text{ids}_k} \otimes
    \frac{\partial \ell}{\partial \text{rows}_k}
    = \texttt{RowSparse}(\text{ids}, \partial \ell / \partial \text{rows}),

  whose cost is that of the looked-up rows. An id outside ``[0, num_rows)`` looks up a row
  of zeros and gets no gradient (padding). Duplicate ids are kept (they are summed by
  :func:`optaxderived.lazy` and :func:`apply_updates`).

  Args:
    fun: ``fun(params, rows, *args, **kwargs) -> loss`` (or ``(loss, aux)`` with
      ``has_aux``), a scalar loss.
    table: patterns over leaf paths that select exactly one leaf of ``params``, the table.
    has_aux: ``fun`` returns ``(loss, aux)``.

  Returns:
    ``grad_fn(params, ids, *args, **kwargs) -> (loss, grads)`` (``((loss, aux), grads)``
    with ``has_aux``), where ``grads`` has the structure of ``params`` with a
    ``RowSparse`` at the table and dense gradients elsewhere.

  Example:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import optaxderived as od
    >>> params = {"embed": jnp.arange(8.0).reshape(4, 2), "w": jnp.ones(2)}
    >>> def loss_fn(params, rows, y):  # rows = params["embed"][ids]
    ...   return jnp.sum((rows.mean(1) @ params["w"] - y) ** 2)
    >>> grad_fn = od.sparse.row_sparse_grad(loss_fn, table="embed")
    >>> loss, grads = grad_fn(params, jnp.array([[0, 2], [3, 3]]), jnp.zeros(2))
    >>> grads["embed"].indices
    Array([0, 2, 3, 3], dtype=int32)
    >>> dense = jax.grad(lambda p: loss_fn(p, p["embed"][jnp.array([[0, 2], [3, 3]])],
    ...                                    jnp.zeros(2)))(params)
    >>> bool(jnp.allclose(grads["embed"].todense(4), dense["embed"]))
    True

  References:
    TensorFlow's ``IndexedSlices`` gradient of ``tf.gather``; PyTorch's
    ``nn.Embedding(sparse=True)``.
  """
  fn = "od.sparse.row_sparse_grad"
  chosen_table = paths.selector(table, argname=f"{fn}: table")
  if not chosen_table:
    raise ValueError(f"{fn}: table must name at least one pattern, got {table!r}")
  checks.check_bool(fn, "has_aux", has_aux)

  def grad_fn(params, ids, *args, **kwargs):
    leaves, treedef = jax.tree.flatten(params)
    leaf_paths = jax.tree.leaves(paths.tree_paths(params))
    chosen = [i for i, m in enumerate(jax.tree.leaves(chosen_table.mask(params))) if m]
    if len(chosen) != 1:
      raise ValueError(
        f"{fn}: table={table!r} must select exactly one leaf, it selects "
        f"{[leaf_paths[i] for i in chosen]} of {leaf_paths[:8]}"
      )
    (k,) = chosen
    tbl = jnp.asarray(leaves[k])
    ids = jnp.asarray(ids)
    if not jnp.issubdtype(ids.dtype, jnp.integer):
      raise ValueError(f"{fn}: ids must be integers, got {ids.dtype}")
    if tbl.ndim < 1:
      raise ValueError(f"{fn}: the table {leaf_paths[k]} must have ndim >= 1")
    flat_ids = canonical_indices(ids.reshape(-1), tbl.shape[0])
    rows = take_rows(tbl, flat_ids, mode="fill", fill_value=0)
    rows = rows.reshape(*ids.shape, *tbl.shape[1:])
    rest = leaves[:k] + leaves[k + 1 :]

    def loss(rest, rows):
      full = list(rest[:k]) + [None] + list(rest[k:])
      return fun(jax.tree.unflatten(treedef, full), rows, *args, **kwargs)

    value, (g_rest, g_rows) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=has_aux)(
      rest, rows
    )
    g_table = RowSparse(flat_ids, g_rows.reshape(-1, *tbl.shape[1:]))
    grads = jax.tree.unflatten(treedef, list(g_rest[:k]) + [g_table] + list(g_rest[k:]))
    return value, grads

  return grad_fn
