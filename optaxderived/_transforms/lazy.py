"""Lazy optimisation for embeddings: row masks and row-sparse updates.

With momentum or Adam, the embedding rows of tokens that are absent from a batch keep moving
on stale moments, so rare tokens are over-updated. :func:`lazy` updates a row only when the
gradient touches it, either from a dense gradient (a row is touched when any of its entries
is non-zero: the row-mask path, here) or from a :class:`~optaxderived.sparse.RowSparse`
gradient (the touched rows are named explicitly, and the step costs what the touched rows
cost, not what the table costs: the row-sparse path, in ``lazy_rows``). A ``RowSparse``
gradient that names a large share of its table's rows is densified and takes the row-mask
path instead (``dense_above``), which is then faster, with the same results.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from optaxderived._core import checks
from optaxderived._core import paths
from optaxderived._core import state as state_lib
from optaxderived._transforms import lazy_elementwise
from optaxderived._transforms import lazy_rows
from optaxderived._transforms.lazy_rows import expand_mask
from optaxderived.sparse._row_sparse import check_row_sparse
from optaxderived.sparse._row_sparse import is_row_sparse

# The default share of a table's rows above which a RowSparse gradient is densified (see the
# lazy_rowsparse rows of benchmarks/RESULTS.md: where the two paths cross on CPU).
DENSE_ABOVE = 0.125


class LazyState(NamedTuple):
  """State of :func:`lazy`.

  Attributes:
    touched_rows: int32 scalar, the number of rows the last update touched, over the leaves
      that :func:`lazy` masks and the ``RowSparse`` leaves (a leaf with ``ndim <= 1`` counts
      as one row); for logging.
    inner_state: the inner optimizer's state, kept as it is (no second copy), so
      ``optax.tree.get(state, "mu")`` finds Adam's first moment.
  """

  touched_rows: jax.Array
  inner_state: optax.OptState


def _row_mask(g: jax.Array) -> jax.Array:
  """Touched rows of a dense gradient: per row of axis 0, or the whole leaf for ndim <= 1.

  A row is touched when any entry is non-zero, i.e. when the sum of its absolute values is
  non-zero (a sum of non-negative numbers rounds to 0 only when all are 0; NaN and inf count
  as touched). On CPU this float reduction fuses into one pass over the gradient, where
  ``any(g != 0)`` first writes a boolean array of the gradient's size.
  """
  g = jnp.asarray(g)
  axes = tuple(range(1, g.ndim)) if g.ndim >= 2 else None
  return jnp.sum(jnp.abs(g), axis=axes) != 0


@dataclasses.dataclass(frozen=True, eq=False)
class _DensePlan:
  """What :func:`lazy` does with a dense leaf (a plain object, so a pytree leaf): mask its
  rows (``mask``: bool ``[rows]`` or a scalar) or pass it through (``mask=None``).

  ``update`` and ``param`` are what the inner optimizer sees; ``lazy_rows.RowsPlan`` has
  the same methods for a ``RowSparse`` leaf. A densified ``RowSparse`` leaf is a dense plan
  with ``row_sparse=True``: its mask names the rows of the indices, its state is frozen.
  """

  path: str
  shape: tuple[int, ...]
  update: Any = None
  param: Any = None
  mask: Any = None
  freeze: bool = False  # keep the inner state of the untouched rows
  row_sparse: bool = False  # a densified RowSparse gradient (the inner must be elementwise)

  @property
  def merges_state(self) -> bool:
    return self.mask is not None and self.freeze

  @property
  def merges_early(self) -> bool:
    """The inner update may read the merged state (it is checked elementwise on it)."""
    return self.merges_state and self.row_sparse

  def gather(self, s: Any) -> Any:
    return s

  def output(self, u: Any) -> Any:
    if self.mask is None:
      return u
    return jnp.where(expand_mask(self.mask, u), u, jnp.zeros_like(u))

  def touched(self) -> jax.Array | None:
    return None if self.mask is None else jnp.sum(self.mask, dtype=jnp.int32)

  def merge(self, new: Any, old: Any) -> Any:
    if self.merges_state:
      return jnp.where(expand_mask(self.mask, new), new, old)
    return new


_NOT_PARAM = _DensePlan("", ())  # a state leaf that mirrors no param: taken as it is


def _row_sparse_plan(fn: str, g: Any, p: Any, path: str, dense_above: float | None) -> Any:
  """The plan of a ``RowSparse`` leaf: row-sparse, or densified when its indices can touch
  more than ``dense_above`` of the table's rows (known at trace time: a shape)."""
  p = jnp.asarray(p)
  check_row_sparse(fn, g, p, path)
  share = lazy_rows.dense_share(jnp.shape(g.indices)[0], p.shape[0])
  if dense_above is None or share <= dense_above:
    return lazy_rows.RowsPlan.make(fn, g, p, path)
  update, mask = lazy_rows.densify(g, p)
  return _DensePlan(path, p.shape, update, p, mask, freeze=True, row_sparse=True)


def _leaf_plans(
  fn: str, updates, params, included, freeze_state, dense_above
) -> tuple[list[Any], Any]:
  """The plan of each leaf of ``updates`` (a ``RowSparse`` is one leaf) and the treedef."""
  leaves, structure = jax.tree.flatten(updates, is_leaf=is_row_sparse)
  treedef: Any = structure  # jaxlib's PyTreeDef has no stub mypy can read
  leaf_paths = jax.tree.leaves(paths.tree_paths(treedef.unflatten(list(range(len(leaves))))))
  if any(is_row_sparse(g) for g in leaves):
    checks.require_params(params, f"{fn}: a RowSparse update")
  if params is None:
    param_leaves = [None] * len(leaves)
  else:
    try:
      param_leaves = treedef.flatten_up_to(params)
    except (ValueError, TypeError) as e:
      raise ValueError(f"{fn}: the params tree does not match the updates tree: {e}") from e
  plans: list[Any] = []
  for g, p, path in zip(leaves, param_leaves, leaf_paths, strict=True):
    if is_row_sparse(g):  # always row by row, whatever include says
      plans.append(_row_sparse_plan(fn, g, p, path, dense_above))
      continue
    g = jnp.asarray(g)
    chosen = included is None or included.matches(path, g)
    mask = _row_mask(g) if chosen else None
    plans.append(_DensePlan(path, g.shape, g, p, mask, freeze_state))
  return plans, treedef


def _state_plans(fn: str, inner, inner_state, plans, why: str) -> Any:
  """A tree with the structure of ``inner_state``: each leaf that mirrors a param gets the
  param's plan (found as ``optax.tree_map_params`` finds them), every other leaf
  ``_NOT_PARAM``. A leaf merged row by row must be shaped like its param."""
  try:
    # A MaskedNode (the state of a leaf that optax.masked / partition leaves out) is a
    # whole subtree with no leaves: it gets _NOT_PARAM as a unit.
    state_plans = optax.tree_map_params(
      inner,
      lambda s, plan: _NOT_PARAM if isinstance(s, optax.MaskedNode) else plan,
      inner_state,
      plans,
      transform_non_params=lambda _: _NOT_PARAM,
      is_leaf=lambda x: isinstance(x, optax.MaskedNode),
    )
  except Exception as e:  # the inner init could not run on optax's params placeholder
    raise ValueError(
      f"{fn}: {why} needs the parts of the inner state that mirror the params, found "
      "with optax.tree_map_params, which failed on this inner optimizer "
      f"({type(e).__name__}: {e})"
    ) from e

  def check_shape(plan, s):
    if plan.merges_state and jnp.shape(s) != plan.shape:
      raise ValueError(
        f"{fn}: {why} needs inner state leaves shaped like their params, but the "
        f"state of {plan.path} has shape {list(jnp.shape(s))} for a param of shape "
        f"{list(plan.shape)} (the inner optimizer is not elementwise)"
      )

  jax.tree.map(check_shape, state_plans, inner_state)
  return state_plans


def _update_merging_early(inner, args: tuple, extra_args: dict, state_plans: Any) -> Any:
  """``inner.update(*args)`` with the state of the densified ``RowSparse`` leaves merged as
  soon as it is computed, and read merged by the rest of the update: the same values (the
  inner is elementwise on these leaves, and their untouched rows' updates are masked), in
  the order in which XLA updates their state in place instead of copying it first (see
  ``lazy_elementwise.update_reading_merged_state``)."""
  updates, inner_state, _ = args
  leaf_plans = jax.tree.leaves(  # the plan of each state leaf (none in a MaskedNode)
    jax.tree.map(lambda plan, s: jax.tree.map(lambda _: plan, s), state_plans, inner_state)
  )
  old = jax.tree.leaves(inner_state)
  merges: list[Any] = [None] * len(jax.tree.leaves(updates))
  merges += [
    functools.partial(plan.merge, old=o) if plan.merges_early else None
    for plan, o in zip(leaf_plans, old, strict=True)
  ]
  return lazy_elementwise.update_reading_merged_state(inner, args, extra_args, merges)


def lazy(
  inner: optax.GradientTransformation,
  *,
  include: paths.Patterns | None = None,
  freeze_state: bool = False,
  dense_above: float | None = DENSE_ABOVE,
) -> optax.GradientTransformationExtraArgs:
  r"""Updates only the rows of a table that the gradient touches (lazy Adam and friends).

  For a leaf selected by ``include`` with gradient :math:`g` and a row :math:`i` of axis 0
  (the whole leaf when ``ndim <= 1``), the row is touched when any entry is non-zero:

  .. math::

    r_i = \bigvee_j [g_{ij} \neq 0], \qquad
    \Delta\theta_i = r_i \, u_i, \qquad
    s_i \leftarrow \begin{cases} s_i^{\text{new}} & r_i \text{ or not frozen} \\
    s_i^{\text{old}} & \text{otherwise} \end{cases}

  where :math:`u` and :math:`s^{\text{new}}` are the inner optimizer's update and state.
  ``freeze_state=False`` masks only the parameter change: the inner state updates as usual
  (Adam's moments of untouched rows keep decaying; the reference bert4keras semantics).
  ``freeze_state=True`` also keeps the untouched rows of every part of the inner state that
  mirrors the params (found as ``optax.tree_map_params`` finds them; TF ``LazyAdam``
  semantics). Either way the inner step count (Adam's bias correction) is global.

  **Row-sparse gradients.** A :class:`~optaxderived.sparse.RowSparse` leaf of ``updates``
  names its rows explicitly (duplicates summed, out-of-range indices are padding). Its rows
  of the params and of the inner state are gathered, the inner optimizer runs on them alone
  and the new state rows are scattered back; the update comes out as a ``RowSparse`` on the
  unique rows, for :func:`optaxderived.sparse.apply_updates` (up to the switch point, see
  below). The step costs
  :math:`O(n \log n)` in the ``n`` given rows, not :math:`O(\text{rows})`, and untouched rows
  keep their state whatever ``freeze_state`` says (a row given with an all-zero value counts
  as touched). It needs ``params`` and an elementwise inner optimizer (sgd, momentum,
  rmsprop, adagrad, adam, adamw, lion, ...): an inner update that reduces over the rows
  (global norms, trust ratios, factored moments), or that applies a JAX primitive
  :func:`lazy` does not know, raises ``ValueError`` when traced. On the rows it touches, the
  sparse path equals the dense path with ``freeze_state=True`` on the equivalent dense
  gradient, except for 1-D tables: the sparse path takes each index of a 1-D table as a row
  of its own (a per-item bias), where the dense path masks a 1-D leaf as a whole. Inner
  wrappers that accumulate across calls (``optax.MultiSteps``, ``optax.apply_every``,
  ``od.accumulate``) raise ``ValueError``: accumulate outside,
  ``od.accumulate(od.lazy(...), k)``.

  **Switch point.** A ``RowSparse`` of ``n`` indices on a table of ``rows`` rows touches at
  most :math:`s = \min(n, \text{rows}) / \text{rows}` of them, known when the step is traced
  (``n`` is a shape). When :math:`s` exceeds ``dense_above``, gathering and scattering rows
  costs more than streaming over the table, and :func:`lazy` densifies the leaf instead
  (a scatter-add into zeros, duplicates summed) and takes the row-mask path with the rows of
  the indices as the mask and the state of the other rows kept: the same params and state
  as the row-sparse path, to float32 rounding (duplicates are summed in another order), with
  the same requirements (``params``, an elementwise inner optimizer). Its update is then a
  dense array, zero on the untouched rows, which :func:`optaxderived.sparse.apply_updates`
  and ``optax.apply_updates`` add like any other. The default switch point is where the two
  paths cross on a 1,000,000 × 64 float32 table on CPU (``benchmarks/bench_lazy.py``); pass
  ``dense_above=None`` to keep every ``RowSparse`` leaf row-sparse (its update a
  ``RowSparse``), ``0.0`` to densify every one.

  Args:
    inner: the optimizer to make lazy.
    include: the dense leaves to mask: a regex over leaf paths, a sequence of regexes or
      a predicate ``(path, leaf) -> bool`` (see :func:`optaxderived.path_mask`); ``None``
      masks every leaf, an empty sequence none. ``RowSparse`` leaves are always masked by
      their indices, whatever ``include`` says.
    freeze_state: also keep the inner state of untouched rows of dense leaves.
    dense_above: the share of a table's rows in ``[0, 1]`` above which a ``RowSparse``
      gradient is densified (see "Switch point"), a Python number (it chooses the path when
      the step is traced); ``None`` (or ``1.0``: the share never exceeds 1) never
      densifies, ``0.0`` densifies every ``RowSparse`` leaf with at least one index.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a :class:`LazyState`.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optaxderived as od
    >>> params = {"embed": jnp.ones((3, 2))}
    >>> tx = od.lazy(optax.sgd(0.5, momentum=0.5))
    >>> state = tx.init(params)
    >>> for g in ([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]], [[1.0, 0.0], [0.0, 0.0], [0.0, 0.0]]):
    ...   updates, state = tx.update({"embed": jnp.array(g)}, state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> params["embed"]  # row 1 stays put at step 2 although its momentum is not 0
    Array([[-0.25,  1.  ],
           [ 0.5 ,  0.5 ],
           [ 1.  ,  1.  ]], dtype=float32)
    >>> sparse = od.sparse.RowSparse(indices=jnp.array([0, 0, -1]), values=jnp.ones((3, 2)))
    >>> tx = od.lazy(optax.sgd(0.5, momentum=0.5), dense_above=None)  # keep it a RowSparse
    >>> updates, state = tx.update({"embed": sparse}, state, params)
    >>> updates["embed"].indices  # row 0 twice is summed; -1 is padding (3: out of range)
    Array([0, 3, 3], dtype=int32)
    >>> od.sparse.apply_updates(params, updates)["embed"]  # only row 0 moves
    Array([[-1.625,  0.   ],
           [ 0.5  ,  0.5  ],
           [ 1.   ,  1.   ]], dtype=float32)

  References:
    Su Jianlin, "Keras 中的 Lookahead 与 LazyOptimizer", https://kexue.fm/archives/6869;
    bert4keras ``extend_with_lazy_optimization``; TF Addons ``LazyAdam``; PyTorch
    ``SparseAdam``.

  Differences from the references: bert4keras masks the parameter change only (our
  default), TF ``LazyAdam`` and PyTorch ``SparseAdam`` freeze the moments too (our
  ``freeze_state=True``) but need sparse gradient types; here one wrapper covers both,
  around any optax optimizer, on dense gradients or on row-sparse ones. No skipped-step
  compensation (:math:`\beta^n` decay on the next touch) is applied.
  """
  fn = "od.lazy"
  checks.check_transformation(fn, "inner", inner)
  checks.check_bool(fn, "freeze_state", freeze_state)
  if dense_above is not None:
    checks.check_range(fn, "dense_above", dense_above, low=0.0, high=1.0, schedule=False)
    if isinstance(dense_above, jax.core.Tracer):  # it chooses the path when tracing
      raise ValueError(f"{fn}: dense_above must be a concrete number, got {dense_above!r}")
    dense_above = float(dense_above)
  included = None if include is None else paths.selector(include, argname=f"{fn}: include")
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    if included is not None:
      included.check_used(params)
    inner_state = inner.init(params)
    # A wrapper that accumulates across calls and applies later would apply, and reset, only
    # the rows of the call that emits: every other row's gradients would be lost.
    accumulating = [
      t.__name__
      for t in (optax.MultiStepsState, optax.ApplyEvery)
      if state_lib.find_states(inner_state, t)
    ]
    if accumulating or state_lib.holds_micro_steps(inner_state):
      raise ValueError(
        f"{fn}: inner holds the state of a wrapper that accumulates across calls "
        f"({accumulating or 'od.accumulate'}): accumulate outside the lazy optimizer, e.g. "
        "od.accumulate(od.lazy(adam), k) on dense gradients"
      )
    return LazyState(touched_rows=jnp.zeros([], jnp.int32), inner_state=inner_state)

  def update_fn(updates, state, params=None, **extra_args):
    plans, treedef = _leaf_plans(fn, updates, params, included, freeze_state, dense_above)
    plan_tree = treedef.unflatten(plans)
    rows = any(plan.row_sparse for plan in plans)  # RowSparse leaves, densified or not
    inner_updates = treedef.unflatten([plan.update for plan in plans])
    inner_params = None if params is None else treedef.unflatten([plan.param for plan in plans])
    inner_state, state_plans = state.inner_state, None
    if any(plan.merges_state for plan in plans):  # row-sparse leaves, or freeze_state
      why = "a RowSparse gradient" if rows else "freeze_state=True"
      state_plans = _state_plans(fn, inner, inner_state, plan_tree, why)
    if rows:
      args = (inner_updates, inner_state, inner_params)
      inner_state = lazy_rows.gather_state(fn, inner, plan_tree, state_plans, args, extra_args)
    early = state_plans is not None and any(plan.merges_early for plan in plans)
    if early:  # densified RowSparse leaves: their merged state is read by the update
      new_updates, new_inner_state = _update_merging_early(
        inner, (inner_updates, inner_state, inner_params), extra_args, state_plans
      )
    else:
      new_updates, new_inner_state = inner.update(
        inner_updates, inner_state, inner_params, **extra_args
      )
    out = jax.tree.map(lambda plan, u: plan.output(u), plan_tree, new_updates)
    counts = [c for c in (plan.touched() for plan in plans) if c is not None]
    touched = sum(counts, jnp.zeros([], jnp.int32))
    if state_plans is not None:
      merge = lambda plan, new, old: (
        new if early and plan.merges_early else plan.merge(new, old)
      )
      new_inner_state = jax.tree.map(merge, state_plans, new_inner_state, state.inner_state)
    return out, LazyState(touched, new_inner_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
