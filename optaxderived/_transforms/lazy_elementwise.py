"""Whether an inner update is elementwise on some of its inputs, read from its jaxpr.

The row-sparse path of ``od.lazy`` runs the inner optimizer on the gathered rows of a table
alone. That is right only when every output element depends on the same element of each
row input (scalars such as a step count or a learning rate broadcast). The update is traced
once and the values derived from the rows are followed through its equations. A primitive is
judged by its name: elementwise, known to mix elements (a reduction, a contraction, a
shape change, a loop), or a call whose body is followed. JAX adds and renames primitives
between releases, so a primitive on none of these lists is refused with a ``ValueError``
that names it (a conservative answer, never a guess), and a jaxpr this module cannot read
gives a ``ValueError`` too, not an error from inside JAX.
"""

from __future__ import annotations

import contextlib
from typing import Any

import jax
import jax.extend as jex

# Primitives whose every output element depends only on the same element of each input
# (scalars broadcast): an inner update built from these alone is elementwise.
ELEMENTWISE = frozenset(
  """abs acos acosh add add_any and asin asinh atan atan2 atanh bessel_i0e bessel_i1e cbrt
  ceil clamp clz complex conj convert_element_type copy copy_p cos cosh digamma div eq erf
  erf_inv erfc exp exp2 expm1 floor ge gt igamma igamma_grad_a igammac imag integer_pow
  is_finite le lgamma log log1p logistic lt max mesh_cast min mul ne neg nextafter not or
  polygamma population_count pow random_gamma_grad real reduce_precision
  regularized_incomplete_beta rem reshard round rsqrt select_n sharding_constraint
  shift_left shift_right_arithmetic shift_right_logical sign sin sinh sqrt square sub tan
  tanh xor zeta""".split()
)
# Elementwise when the output has the operand's shape (a reshape or broadcast to itself).
SAME_SHAPE = frozenset({"bitcast_convert_type", "broadcast_in_dim", "reshape"})
# Each output is its own operand, unchanged.
PER_OPERAND = frozenset({"device_put", "optimization_barrier", "pvary"})
# Known to mix the elements of a row value (for the message; anything unknown is refused too).
MIXING = frozenset(
  """all_gather all_to_all approx_top_k argmax argmin cholesky concatenate
  conv_general_dilated cumlogsumexp cummax cummin cumprod cumsum dot_general dynamic_slice
  dynamic_update_slice eig eigh fft gather lu pad pmax pmin ppermute psum qr reduce
  reduce_and reduce_max reduce_min reduce_or reduce_prod reduce_sum reduce_xor rev scan
  scatter scatter-add scatter_add scatter_max scatter_min scatter_mul select_and_scatter_add
  slice sort split squeeze svd top_k transpose triangular_solve while""".split()
)
LOOPS = frozenset({"scan", "while"})


def check_elementwise(fn: str, inner: Any, args: tuple, row_args: tuple, extra: dict) -> None:
  """Raises ``ValueError`` naming ``fn`` unless ``inner.update(*args, **extra)`` is
  elementwise on the leaves of ``args`` flagged True in ``row_args`` (same structure)."""
  leaves, treedef = jax.tree.flatten(args)
  row_flags = jax.tree.leaves(row_args)
  if len(row_flags) != len(leaves):
    raise AssertionError(f"{fn}: internal error, row flags do not match the arguments")

  def update(*flat):
    return inner.update(*jax.tree.unflatten(treedef, flat), **extra)

  closed = jax.make_jaxpr(update)(*leaves)  # errors of the inner update itself surface here
  try:
    _, bad = row_flow(closed.jaxpr, [bool(f) for f in row_flags])
  except (AttributeError, KeyError, IndexError, TypeError, ValueError) as e:
    raise ValueError(
      f"{fn}: RowSparse leaves need an elementwise inner optimizer, and the inner update's "
      f"jaxpr could not be read with JAX {jax.__version__} to check it "
      f"({type(e).__name__}: {e}). Pass a dense gradient for these leaves to use the "
      "row-masked path."
    ) from e
  if bad is None:
    return
  if bad in MIXING or bad in SAME_SHAPE or bad == "cond":
    raise ValueError(
      f"{fn}: RowSparse leaves need an elementwise inner optimizer (sgd, momentum, "
      "rmsprop, adagrad, adam, adamw, lion, ...), but this inner update applies "
      f"`{bad}` to values of the touched rows (a global norm, a trust ratio, a factored "
      "moment, ...), which would need the whole table. Pass a dense gradient for these "
      "leaves to use the row-masked path, or an elementwise inner optimizer."
    )
  raise ValueError(
    f"{fn}: RowSparse leaves need an elementwise inner optimizer, but this inner update "
    f"applies the primitive `{bad}` to values of the touched rows, and {fn} does not know "
    f"whether `{bad}` is elementwise (it may be new in JAX {jax.__version__}), so it "
    "refuses rather than guess. Pass a dense gradient for these leaves to use the "
    "row-masked path."
  )


def _is_var(v: Any) -> bool:
  return isinstance(v, jex.core.Var)


def _same_signature(jaxpr: Any, eqn: Any) -> bool:
  """Whether ``jaxpr`` takes the equation's inputs and gives its outputs (a call body)."""

  def avals(vs: list[Any]) -> list[Any]:
    return [(getattr(v.aval, "shape", None), getattr(v.aval, "dtype", None)) for v in vs]

  return (
    len(jaxpr.invars) == len(eqn.invars)
    and len(jaxpr.outvars) == len(eqn.outvars)
    and avals(jaxpr.invars) == avals(eqn.invars)
    and avals(jaxpr.outvars) == avals(eqn.outvars)
  )


def _sub_jaxprs(params: dict) -> list[Any]:
  found = []
  for value in params.values():
    for v in value if isinstance(value, tuple | list) else (value,):
      if isinstance(v, jex.core.ClosedJaxpr):
        found.append(v.jaxpr)
      elif isinstance(v, jex.core.Jaxpr):
        found.append(v)
  return found


def row_flow(jaxpr: Any, in_rows: list[bool]) -> tuple[list[bool], str | None]:
  """Propagates "derived from a touched-rows input" through ``jaxpr``.

  Returns the row flags of the outputs and the name of the first primitive that may mix row
  values across elements (a reduction, a reshape, a contraction, an unknown primitive, ...),
  or None.
  """
  rows = {v for v, r in zip(jaxpr.invars, in_rows, strict=True) if r}
  is_row = lambda v: _is_var(v) and v in rows
  for eqn in jaxpr.eqns:
    flags = [is_row(v) for v in eqn.invars]
    if not any(flags):
      continue
    out_flags, bad = _eqn_flow(eqn, flags)
    if bad is not None:
      return [], bad
    rows.update(v for v, r in zip(eqn.outvars, out_flags, strict=True) if r and _is_var(v))
  return [is_row(v) for v in jaxpr.outvars], None


def _eqn_flow(eqn: Any, flags: list[bool]) -> tuple[list[bool], str | None]:
  """The row flags of one equation's outputs, or the name of the primitive that mixes."""
  name = eqn.primitive.name
  if name in ELEMENTWISE:
    return [True] * len(eqn.outvars), None
  if name in SAME_SHAPE:
    if eqn.invars[0].aval.shape != eqn.outvars[0].aval.shape:
      return [], name
    return [True] * len(eqn.outvars), None
  if name in PER_OPERAND and len(eqn.invars) == len(eqn.outvars):
    return flags, None
  if name in LOOPS or name in MIXING:
    return [], name
  if name == "cond":
    if flags[0]:  # the branch taken would depend on row values
      return [], name
    out_flags = [False] * len(eqn.outvars)
    for branch in eqn.params["branches"]:
      branch_flags, bad = row_flow(branch.jaxpr, flags[1:])
      if bad is not None:
        return [], bad
      out_flags = [a or b for a, b in zip(out_flags, branch_flags, strict=True)]
    return out_flags, None
  # A call (jit, custom_jvp_call, custom_vjp_call, ...): one body with the equation's
  # inputs and outputs, followed; anything else is unknown.
  bodies = [j for j in _sub_jaxprs(eqn.params) if _same_signature(j, eqn)]
  if not bodies:
    return [], name
  out_flags = [False] * len(eqn.outvars)
  for body in bodies:
    body_flags, bad = row_flow(body, flags)
    if bad is not None:
      return [], bad
    out_flags = [a or b for a, b in zip(out_flags, body_flags, strict=True)]
  return out_flags, None


def update_reading_merged_state(
  inner: Any, args: tuple, extra: dict, merges: list[Any]
) -> tuple[Any, Any]:
  """``inner.update(*args, **extra)`` where each output leaf ``i`` with ``merges[i]`` (in
  the order of ``jax.tree.leaves((updates, state))``) is replaced by ``merges[i](value)``
  as soon as it is computed, so that the rest of the update reads the replaced value.

  ``od.lazy`` merges the new state of a densified table with the old one row by row
  (``where(mask, new, old)``). An update that is elementwise on the table (which the caller
  has checked) reads the new state at the same element only: at a touched row the merged
  value is the new one, at an untouched row the update is masked to zero. So reading the
  merged state changes nothing, and it gives XLA a hand-written step's order: the state
  first, in place, then the update from it. Reading the old state instead, the update and
  the in-place state writes are unordered, and XLA copies every merged state buffer first
  (two table-sized temporaries for Adam, each a fresh allocation at every step on CPU).

  An output that is an input passed through, or that is given for several leaves, is
  merged at the end only. The jaxpr is run equation by equation as ``jax.core.eval_jaxpr``
  does (each primitive bound again), so the values are those of ``inner.update``.
  """
  leaves, treedef = jax.tree.flatten(args)

  def update(*flat):
    return inner.update(*jax.tree.unflatten(treedef, flat), **extra)

  closed, out_shape = jax.make_jaxpr(update, return_shape=True)(*leaves)
  jaxpr = closed.jaxpr
  if len(merges) != len(jaxpr.outvars):
    raise AssertionError("internal error: the merges do not match the inner's outputs")
  outs = [v for v in jaxpr.outvars if _is_var(v)]
  early = {
    v: merge
    for v, merge in zip(jaxpr.outvars, merges, strict=True)
    if merge is not None and _is_var(v) and outs.count(v) == 1 and v not in jaxpr.invars
  }
  env: dict[Any, Any] = dict(zip(jaxpr.constvars, closed.consts, strict=True))
  env.update(zip(jaxpr.invars, leaves, strict=True))
  read = lambda v: env[v] if _is_var(v) else v.val
  for eqn in jaxpr.eqns:
    params = eqn.primitive.get_bind_params(eqn.params)
    ctx = getattr(getattr(eqn, "ctx", None), "manager", None)
    with ctx if ctx is not None else contextlib.nullcontext():
      ans = eqn.primitive.bind(*map(read, eqn.invars), **params)
    for v, x in zip(eqn.outvars, ans if eqn.primitive.multiple_results else [ans], strict=True):
      if _is_var(v):  # not a DropVar
        env[v] = early[v](x) if v in early else x
  values = [
    merge(read(v)) if merge is not None and v not in early else read(v)
    for v, merge in zip(jaxpr.outvars, merges, strict=True)
  ]
  return jax.tree.unflatten(jax.tree.structure(out_shape), values)
