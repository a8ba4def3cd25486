r"""The row-sparse path of ``od.lazy``: gather the touched rows, update them, scatter back.

For a :class:`~optaxderived.sparse.RowSparse` leaf the duplicate rows are summed, the rows
of the param and of every part of the inner state that mirrors it are gathered, the inner
optimizer runs on those rows alone (after a check that it is elementwise on them) and the
new state rows are scattered back; the update is a ``RowSparse`` on the unique rows. The
step costs :math:`O(n \log n)` in the ``n`` given rows, not :math:`O(\text{rows})`.

When the ``n`` rows are a large share of the table, streaming over the whole table is
cheaper than gathering and scattering rows: :func:`densify` turns the leaf into a dense
gradient and the mask of the rows it names, for ``od.lazy``'s row-masked path (same
results: the same sums, and the state of the untouched rows kept).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from optaxderived._transforms import lazy_elementwise
from optaxderived.sparse._row_sparse import RowSparse
from optaxderived.sparse._row_sparse import canonical_indices
from optaxderived.sparse._row_sparse import check_row_sparse
from optaxderived.sparse._row_sparse import scatter_add
from optaxderived.sparse._row_sparse import set_rows
from optaxderived.sparse._row_sparse import take_rows


def expand_mask(mask: jax.Array, x: jax.Array) -> jax.Array:
  """``mask`` (over the leading axes of ``x``) with trailing axes of size 1 to broadcast."""
  return mask.reshape(mask.shape + (1,) * (x.ndim - mask.ndim))


def dedupe(indices: jax.Array, values: jax.Array, num_rows: int) -> tuple[jax.Array, jax.Array]:
  """Sums duplicate rows: ``(unique_indices, summed_values)``, both of length ``n``.

  The unique valid indices come first, in increasing order; the remaining slots (and every
  padding index) hold ``num_rows``, which the scatters drop; padding values are zeroed.
  Low-precision values are summed in float32. Sorting the keys alone and finding each
  entry's slot by binary search is several times faster on CPU than an argsort.
  """
  n = indices.shape[0]
  indices = canonical_indices(indices, num_rows)
  keys = jnp.sort(indices)
  first = jnp.ones((n,), bool).at[1:].set(keys[1:] != keys[:-1])  # n = 0 works too
  unique = jnp.full((n,), num_rows, indices.dtype).at[jnp.cumsum(first) - 1].set(keys)
  slot = jnp.searchsorted(unique, indices, side="left", method="scan_unrolled")
  acc_dtype = jnp.promote_types(values.dtype, jnp.float32)
  summed = jax.ops.segment_sum(values.astype(acc_dtype), slot, num_segments=n)
  summed = jnp.where(expand_mask(unique < num_rows, summed), summed, 0)  # padding: 0
  return unique, summed.astype(values.dtype)


def dense_share(num_indices: int, num_rows: int) -> float:
  """At most the share of a table's rows that ``num_indices`` indices touch (static: the
  number of indices is a shape; duplicates and padding only show at run time)."""
  return min(num_indices, num_rows) / num_rows if num_rows else 0.0


def densify(g: RowSparse, param: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(dense, mask)``: the dense gradient of ``g`` (duplicates summed, padding dropped),
  shaped and sharded like ``param``, and the bool ``[rows]`` mask of the rows it names (a
  row given with zeros is named).

  As in :func:`dedupe`, low-precision values are summed in float32 and the sum is cast
  back; the scatter-add sums duplicates in another order than ``dedupe``'s segment sum, so
  the two agree to rounding.
  """
  num_rows = param.shape[0]
  indices = canonical_indices(jnp.asarray(g.indices), num_rows)
  values = jnp.asarray(g.values)
  acc_dtype = jnp.promote_types(values.dtype, jnp.float32)
  dense = scatter_add(jnp.zeros_like(param, acc_dtype), indices, values)
  mask = jnp.zeros((num_rows,), bool).at[indices].set(True, mode="drop")
  return dense.astype(values.dtype), mask


def gather_rows(table: jax.Array, rows: jax.Array) -> jax.Array:
  """Rows of ``table`` at sorted ``rows``; an out-of-range row (padding) reads the last row,
  whose result the scatter drops (clamping is cheaper than a filled gather)."""
  if table.shape[0] == 0:  # every index is padding
    return jnp.zeros((rows.shape[0], *table.shape[1:]), table.dtype)
  rows = jnp.minimum(rows, table.shape[0] - 1)
  return take_rows(table, rows, mode="promise_in_bounds", indices_are_sorted=True)


def scatter_rows(table: jax.Array, rows: jax.Array, values: jax.Array) -> jax.Array:
  return set_rows(table, rows, values, mode="drop", indices_are_sorted=True)


@dataclasses.dataclass(frozen=True, eq=False)
class RowsPlan:
  """What ``od.lazy`` does with a ``RowSparse`` leaf (a plain object, so a pytree leaf).

  ``update`` and ``param`` are what the inner optimizer sees: the summed values and the
  param's rows at ``rows``, the unique rows (``num_rows`` in the unused slots).
  """

  path: str
  shape: tuple[int, ...]
  update: Any
  param: Any
  rows: jax.Array

  merges_state = True  # its state rows are gathered and scattered back
  row_sparse = True  # from a RowSparse gradient: the inner must be elementwise on it
  merges_early = False  # its state is scattered back after the update (not read merged)

  @classmethod
  def make(cls, fn: str, g: RowSparse, param: Any, path: str) -> RowsPlan:
    check_row_sparse(fn, g, param, path)
    param = jnp.asarray(param)
    rows, values = dedupe(jnp.asarray(g.indices), jnp.asarray(g.values), param.shape[0])
    return cls(path, param.shape, values, gather_rows(param, rows), rows)

  def gather(self, s: jax.Array) -> jax.Array:
    return gather_rows(s, self.rows)

  def output(self, u: jax.Array) -> RowSparse:
    u = jnp.asarray(u)  # the inner's dtype, as on the dense path
    valid = expand_mask(self.rows < self.shape[0], u)
    return RowSparse(self.rows, jnp.where(valid, u, jnp.zeros_like(u)))

  def touched(self) -> jax.Array:
    return jnp.sum(self.rows < self.shape[0], dtype=jnp.int32)

  def merge(self, new: jax.Array, old: jax.Array) -> jax.Array:
    return scatter_rows(old, self.rows, new)


def gather_state(
  fn: str, inner: Any, plans: Any, state_plans: Any, args: tuple, extra_args: dict
) -> optax.OptState:
  """The inner state of ``args = (updates, state, params)`` (the inner update's arguments)
  with the rows of each ``RowsPlan`` of ``plans`` gathered from the state leaves that mirror
  its param (``state_plans``: the plan of each state leaf).

  Raises:
    ValueError: naming ``fn`` unless ``inner.update`` is elementwise on the leaves of every
      plan from a ``RowSparse`` gradient (``plan.row_sparse``: gathered rows, or a densified
      gradient, so that both paths accept the same inner optimizers).
  """
  updates, inner_state, params = args
  is_rows = lambda plan: plan.row_sparse
  gathered = jax.tree.map(lambda plan, s: plan.gather(s), state_plans, inner_state)
  row_updates = jax.tree.map(is_rows, plans)
  row_state = jax.tree.map(  # the flags mirror the state's leaves (none in a MaskedNode)
    lambda plan, s: jax.tree.map(lambda _: is_rows(plan), s), state_plans, gathered
  )
  lazy_elementwise.check_elementwise(
    fn, inner, (updates, gathered, params), (row_updates, row_state, row_updates), extra_args
  )
  return gathered
