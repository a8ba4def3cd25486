"""Lazy optimisation for embeddings: row masks and row-sparse updates.

With momentum or Adam, the embedding rows of tokens that are absent from a batch keep moving
on stale moments, so rare tokens are over-updated. :func:`lazy` updates a row only when the
gradient touches it, either from a dense gradient (a row is touched when any of its entries
is non-zero) or from a :class:`RowSparse` gradient (the touched rows are named explicitly,
and the step costs what the touched rows cost, not what the table costs).
"""

import dataclasses
from typing import Any
from typing import NamedTuple

import jax
import jax.extend as jex
import jax.numpy as jnp
import optax

from optaxderived._core import checks
from optaxderived._core import paths
from optaxderived._core import state as state_lib
from optaxderived.sparse._row_sparse import RowSparse
from optaxderived.sparse._row_sparse import canonical_indices
from optaxderived.sparse._row_sparse import check_row_sparse
from optaxderived.sparse._row_sparse import is_row_sparse


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


def _dedupe(indices: jax.Array, values: jax.Array, num_rows: int):
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
  summed = jnp.where(_broadcast_mask(unique < num_rows, summed), summed, 0)  # padding: 0
  return unique, summed.astype(values.dtype)


def _gather_rows(table: jax.Array, rows: jax.Array) -> jax.Array:
  """Rows of ``table`` at sorted ``rows``; an out-of-range row (padding) reads the last row,
  whose result the scatter drops (clamping is cheaper than a filled gather)."""
  if table.shape[0] == 0:  # every index is padding
    return jnp.zeros((rows.shape[0], *table.shape[1:]), table.dtype)
  rows = jnp.minimum(rows, table.shape[0] - 1)
  return table.at[rows].get(mode="promise_in_bounds", indices_are_sorted=True)


def _scatter_rows(table: jax.Array, rows: jax.Array, values: jax.Array) -> jax.Array:
  return table.at[rows].set(values.astype(table.dtype), mode="drop", indices_are_sorted=True)


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


def _broadcast_mask(mask: jax.Array, x: jax.Array) -> jax.Array:
  return mask.reshape(mask.shape + (1,) * (x.ndim - mask.ndim))


@dataclasses.dataclass(frozen=True, eq=False)
class _Plan:
  """What :func:`lazy` does with one leaf (a plain object, so a pytree leaf).

  kind: ``"plain"`` (passed through), ``"masked"`` (dense row mask) or ``"sparse"``.
  """

  kind: str
  path: str
  shape: tuple[int, ...]
  mask: Any = None  # "masked": bool [rows] or scalar
  rows: Any = None  # "sparse": the unique rows [n] (num_rows in unused slots)


_NOT_PARAM = _Plan("plain", "", ())


def _state_plans(inner, state, plan_tree, why: str) -> Any:
  """A tree with the structure of ``state``: each leaf that mirrors a param gets the
  param's plan (found as ``optax.tree_map_params`` finds them), every other leaf
  ``_NOT_PARAM``."""
  try:
    # A MaskedNode (the state of a leaf that optax.masked / partition leaves out) is a
    # whole subtree with no leaves: it gets _NOT_PARAM as a unit.
    return optax.tree_map_params(
      inner,
      lambda s, plan: _NOT_PARAM if isinstance(s, optax.MaskedNode) else plan,
      state,
      plan_tree,
      transform_non_params=lambda _: _NOT_PARAM,
      is_leaf=lambda x: isinstance(x, optax.MaskedNode),
    )
  except Exception as e:  # the inner init could not run on optax's params placeholder
    raise ValueError(
      f"od.lazy: {why} needs the parts of the inner state that mirror the params, found "
      "with optax.tree_map_params, which failed on this inner optimizer "
      f"({type(e).__name__}: {e})"
    ) from e


# Primitives whose every output element depends only on the same element of each input
# (scalars broadcast): an inner update built from these alone is elementwise.
_ELEMENTWISE = frozenset(
  """abs acos acosh add add_any and asin asinh atan atan2 atanh cbrt ceil clamp clz complex
  conj convert_element_type copy copy_p cos cosh digamma div eq erf erf_inv erfc exp exp2
  expm1 floor ge gt igamma igammac imag integer_pow is_finite le lgamma log log1p logistic
  lt max mesh_cast min mul ne neg nextafter not or polygamma population_count pow real
  reduce_precision rem reshard round rsqrt select_n sharding_constraint shift_left
  shift_right_arithmetic shift_right_logical sign sin sinh sqrt square sub tan tanh xor
  zeta""".split()
)
# Same shape in and out when the operand is a row value.
_SAME_SHAPE_OK = frozenset({"broadcast_in_dim", "reshape"})


def _is_var(v: Any) -> bool:
  return isinstance(v, jex.core.Var)


def _sub_jaxprs(params: dict) -> list[Any]:
  found = []
  for value in params.values():
    for v in value if isinstance(value, tuple | list) else (value,):
      if isinstance(v, jex.core.ClosedJaxpr):
        found.append(v.jaxpr)
      elif isinstance(v, jex.core.Jaxpr):
        found.append(v)
  return found


def _row_flow(jaxpr: Any, in_rows: list[bool]) -> tuple[list[bool], str | None]:
  """Propagates "derived from a touched-rows input" through ``jaxpr``.

  Returns the row flags of the outputs and the name of the first primitive that mixes row
  values across elements (a reduction, a reshape, a contraction, ...), or None.
  """
  rows = {v for v, r in zip(jaxpr.invars, in_rows, strict=True) if r}
  is_row = lambda v: _is_var(v) and v in rows
  for eqn in jaxpr.eqns:
    flags = [is_row(v) for v in eqn.invars]
    name = eqn.primitive.name
    if not any(flags):
      continue
    out_flags: list[bool]
    if name in _ELEMENTWISE:
      out_flags = [True] * len(eqn.outvars)
    elif name in _SAME_SHAPE_OK:
      if eqn.invars[0].aval.shape != eqn.outvars[0].aval.shape:
        return [], name
      out_flags = [True]
    elif name == "optimization_barrier":
      out_flags = flags
    elif name == "cond":
      if flags[0]:
        return [], name
      out_flags = [False] * len(eqn.outvars)
      for branch in eqn.params["branches"]:
        branch_flags, bad = _row_flow(branch.jaxpr, flags[1:])
        if bad:
          return [], bad
        out_flags = [a or b for a, b in zip(out_flags, branch_flags, strict=True)]
    else:
      subs = [
        j
        for j in _sub_jaxprs(eqn.params)
        if len(j.invars) == len(eqn.invars) and len(j.outvars) == len(eqn.outvars)
      ]
      if name in ("while", "scan") or not subs:
        return [], name
      out_flags, bad = _row_flow(subs[0], flags)
      if bad:
        return [], bad
    rows.update(v for v, r in zip(eqn.outvars, out_flags, strict=True) if r and _is_var(v))
  return [is_row(v) for v in jaxpr.outvars], None


def _check_elementwise(inner, args: tuple, row_args: tuple, extra: dict) -> None:
  """Raises ValueError when ``inner.update`` is not elementwise on the gathered rows."""
  leaves, treedef = jax.tree.flatten(args)
  row_flags = jax.tree.leaves(row_args)
  if len(row_flags) != len(leaves):
    raise AssertionError("od.lazy: internal error, row flags do not match the arguments")

  def update(*flat):
    return inner.update(*jax.tree.unflatten(treedef, flat), **extra)

  closed = jax.make_jaxpr(update)(*leaves)
  _, bad = _row_flow(closed.jaxpr, [bool(f) for f in row_flags])
  if bad is not None:
    raise ValueError(
      "od.lazy: RowSparse leaves need an elementwise inner optimizer (sgd, momentum, "
      "rmsprop, adagrad, adam, adamw, lion, ...), but this inner update applies "
      f"`{bad}` to values of the touched rows (a global norm, a trust ratio, a factored "
      "moment, ...), which would need the whole table. Pass a dense gradient for these "
      "leaves to use the row-masked path, or an elementwise inner optimizer."
    )


def lazy(
  inner: optax.GradientTransformation,
  *,
  include: paths.Patterns | None = None,
  freeze_state: bool = False,
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

  **Row-sparse gradients.** A :class:`RowSparse` leaf of ``updates`` names its rows
  explicitly (duplicates summed, out-of-range indices are padding). Its rows of the params
  and of the inner state are gathered, the inner optimizer runs on them alone and the new
  state rows are scattered back; the update comes out as a ``RowSparse`` on the unique rows,
  for :func:`apply_updates`. The step costs :math:`O(n \log n)` in the ``n`` given rows, not
  :math:`O(\text{rows})`, and untouched rows keep their state whatever ``freeze_state`` says
  (a row given with an all-zero value counts as touched). It needs ``params`` and an
  elementwise inner optimizer (sgd, momentum, rmsprop, adagrad, adam, adamw, lion, ...): an
  inner update that reduces over the rows (global norms, trust ratios, factored moments)
  raises ``ValueError`` when traced. On the rows it touches, the sparse path equals the
  dense path with ``freeze_state=True`` on the equivalent dense gradient, except for 1-D
  tables: the sparse path takes each index of a 1-D table as a row of its own (a per-item
  bias), where the dense path masks a 1-D leaf as a whole. Inner wrappers that accumulate
  across calls (``optax.MultiSteps``, ``optax.apply_every``, ``od.accumulate``) raise
  ``ValueError``: accumulate outside, ``od.accumulate(od.lazy(...), k)``.

  Args:
    inner: the optimizer to make lazy.
    include: patterns over leaf paths (see :func:`optaxderived.path_mask`) choosing the
      dense leaves to mask; ``None`` masks every leaf. ``RowSparse`` leaves are always
      row-sparse.
    freeze_state: also keep the inner state of untouched rows of dense leaves.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a :class:`LazyState`.

  Example:
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
  around any optax optimizer, on dense gradients or on :class:`RowSparse` ones. No
  skipped-step compensation (:math:`\beta^n` decay on the next touch) is applied.
  """
  fn = "od.lazy"
  checks.check_transformation(fn, "inner", inner)
  checks.check_bool(fn, "freeze_state", freeze_state)
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
    leaves, treedef = jax.tree.flatten(updates, is_leaf=is_row_sparse)
    leaf_paths = jax.tree.leaves(paths.tree_paths(treedef.unflatten(list(range(len(leaves))))))
    any_sparse = any(is_row_sparse(g) for g in leaves)
    if any_sparse:
      checks.require_params(params, "od.lazy with RowSparse updates")
    if params is not None:
      try:
        param_leaves = treedef.flatten_up_to(params)
      except (ValueError, TypeError) as e:
        raise ValueError(
          f"od.lazy: the params tree does not match the updates tree: {e}"
        ) from e
    else:
      param_leaves = [None] * len(leaves)
    if included is None:
      selected = [True] * len(leaves)
    else:  # matched on the paths (a RowSparse leaf is one leaf here)
      selected = [
        included.matches(path, leaf) for path, leaf in zip(leaf_paths, leaves, strict=True)
      ]

    plans, inner_updates, inner_params = [], [], []
    for g, p, path, chosen in zip(leaves, param_leaves, leaf_paths, selected, strict=True):
      if is_row_sparse(g):
        check_row_sparse(g, p, f"od.lazy ({path})")
        p = jnp.asarray(p)
        rows, values = _dedupe(jnp.asarray(g.indices), jnp.asarray(g.values), p.shape[0])
        plans.append(_Plan("sparse", path, p.shape, rows=rows))
        inner_updates.append(values)
        inner_params.append(_gather_rows(p, rows))
      else:
        g = jnp.asarray(g)
        if chosen:
          plans.append(_Plan("masked", path, g.shape, mask=_row_mask(g)))
        else:
          plans.append(_Plan("plain", path, g.shape))
        inner_updates.append(g)
        inner_params.append(p)
    inner_updates = treedef.unflatten(inner_updates)
    inner_params = None if params is None else treedef.unflatten(inner_params)
    any_masked = any(plan.kind == "masked" for plan in plans)

    inner_state = state.inner_state
    state_plans = None
    if any_sparse or (freeze_state and any_masked):
      why = "a RowSparse gradient" if any_sparse else "freeze_state=True"
      state_plans = _state_plans(inner, inner_state, treedef.unflatten(plans), why)

      def check_shape(plan, s):
        # only state merged row by row must be shaped like its param
        needed = plan.kind == "sparse" or (plan.kind == "masked" and freeze_state)
        if needed and jnp.shape(s) != plan.shape:
          raise ValueError(
            f"od.lazy: {why} needs inner state leaves shaped like their params, but the "
            f"state of {plan.path} has shape {list(jnp.shape(s))} for a param of shape "
            f"{list(plan.shape)} (the inner optimizer is not elementwise)"
          )

      jax.tree.map(check_shape, state_plans, inner_state)

    if any_sparse:
      gather = lambda plan, s: _gather_rows(s, plan.rows) if plan.kind == "sparse" else s
      inner_state = jax.tree.map(gather, state_plans, inner_state)
      row_updates = treedef.unflatten([plan.kind == "sparse" for plan in plans])
      row_state = jax.tree.map(  # the flags mirror the state's leaves (none in a MaskedNode)
        lambda plan, s: jax.tree.map(lambda _: plan.kind == "sparse", s),
        state_plans,
        inner_state,
      )
      _check_elementwise(
        inner,
        (inner_updates, inner_state, inner_params),
        (row_updates, row_state, row_updates),
        extra_args,
      )

    new_updates, new_inner_state = inner.update(
      inner_updates, inner_state, inner_params, **extra_args
    )

    out, touched = [], jnp.zeros([], jnp.int32)
    for plan, u in zip(plans, treedef.flatten_up_to(new_updates), strict=True):
      if plan.kind == "sparse":
        u = jnp.asarray(u)  # the inner's dtype, as on the dense path
        valid = _broadcast_mask(plan.rows < plan.shape[0], u)
        out.append(RowSparse(plan.rows, jnp.where(valid, u, jnp.zeros_like(u))))
        touched += jnp.sum(plan.rows < plan.shape[0], dtype=jnp.int32)
      elif plan.kind == "masked":
        out.append(jnp.where(_broadcast_mask(plan.mask, u), u, jnp.zeros_like(u)))
        touched += jnp.sum(plan.mask, dtype=jnp.int32)
      else:
        out.append(u)

    if state_plans is not None:

      def merge(plan, new, old):
        if plan.kind == "sparse":
          return _scatter_rows(old, plan.rows, new)
        if plan.kind == "masked" and freeze_state:
          return jnp.where(_broadcast_mask(plan.mask, new), new, old)
        return new

      new_inner_state = jax.tree.map(merge, state_plans, new_inner_state, state.inner_state)
    return treedef.unflatten(out), LazyState(touched, new_inner_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
