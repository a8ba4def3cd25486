"""Per-parameter multipliers (per-parameter learning rates) chosen by path patterns."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from optaxderived._core import checks
from optaxderived._core import numerics
from optaxderived._core import paths


def _check_multiplier(name: str, value: Any) -> None:
  """A multiplier is a finite real number (any sign), a schedule or a traced value."""
  checks.check_finite("od.scale_by_path", name, value)


def _scale(u: jax.Array, multiplier: Any) -> jax.Array:
  """``u · multiplier`` in at least float32, returned in ``u``'s dtype."""
  if isinstance(multiplier, int | float) and multiplier == 1:
    return u
  return (numerics.wide(u) * multiplier).astype(u.dtype)


class ScaleByPathState(NamedTuple):
  """State of :func:`scale_by_path`.

  Attributes:
    count: the number of update calls so far (int32); schedules are evaluated at it.
  """

  count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax


def scale_by_path(
  rules: Mapping[paths.Patterns, optax.ScalarOrSchedule],
  *,
  default: optax.ScalarOrSchedule = 1.0,
  strict: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""Multiplies each leaf's update by the product of the multipliers of the rules it matches.

  With :math:`R(p)` the rules whose patterns search a leaf's path :math:`p` (a rule matches
  when any of its regexes ``re.search``\ es the path) and :math:`m_r(t)` their multipliers
  at the number of update calls :math:`t`:

  .. math::

    u_p \leftarrow u_p \prod_{r \in R(p)} m_r(t)
    \quad\text{if } R(p) \neq \emptyset, \qquad
    u_p \leftarrow \texttt{default}(t)\, u_p \quad\text{otherwise}.

  This is the per-parameter (per-layer) learning rate of bert4keras'
  ``extend_with_parameter_wise_lr``, with regexes instead of substrings. It scales the
  *update*, so place it after the optimizer (``chain(optax.adam(lr), od.scale_by_path(...))``):
  the Adam moments are those of the unscaled run, and a multiplier of 0.1 is exactly a ten
  times smaller learning rate for those leaves, under Adam as under SGD (a gradient
  multiplier placed before Adam would be normalised away). A leaf's path is its key path
  joined with ``"/"`` (``params/Dense_0/kernel``, ``layers/3/bias``), the same in dicts,
  FrozenDicts, linen params and ``nnx.State`` (see :func:`optaxderived.tree_paths`). A
  pattern that matches no leaf warns once (raises with ``strict=True``): it is almost
  always a typo.

  Args:
    rules: a mapping from patterns (a regex, or a tuple of regexes) to multipliers, each a
      finite number (any sign; 0 freezes) or a schedule of the number of update calls.
    default: the multiplier of a leaf that matches no rule (a number or a schedule).
    strict: raise ``ValueError`` instead of warning when a pattern matches no leaf.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a :class:`ScaleByPathState`.

  Raises:
    ValueError: for a pattern that does not compile, a multiplier that is not a finite
      number or a schedule, or (with ``strict=True``, at ``init``) a pattern that matches no
      leaf.

  Example:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optaxderived as od
    >>> params = {"encoder": {"kernel": jnp.ones(2), "bias": jnp.ones(2)}, "head": jnp.ones(2)}
    >>> tx = optax.chain(
    ...   optax.sgd(0.1), od.scale_by_path({"encoder": 0.5, "kernel": 0.2}, default=2.0)
    ... )
    >>> updates, _ = tx.update(params, tx.init(params))  # gradients of ones
    >>> jax.tree.map(lambda u: float(u[0]), updates)  # kernel: 0.5 * 0.2; bias: 0.5
    {'encoder': {'bias': -0.05, 'kernel': -0.01}, 'head': -0.2}

  References:
    Su, `bert4keras optimizers: extend_with_parameter_wise_lr
    <https://github.com/bojone/bert4keras/blob/master/bert4keras/optimizers.py>`_, 2020.

    Su, `Layer-wise learning rates and gradient manipulation
    <https://kexue.fm/archives/6418>`_, 2019.
  """
  checks.check_bool("od.scale_by_path", "strict", strict)
  items = paths.rule_items(rules, "od.scale_by_path", strict=strict)
  for key, _, value in items:
    _check_multiplier(f"the multiplier of rule {key!r}", value)
  _check_multiplier("default", default)

  def init_fn(params):
    for _, chosen, _ in items:
      chosen.check_used(params)
    return ScaleByPathState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    masks = paths.rule_masks(items, updates)
    values = [numerics.value_at(v, state.count) for _, _, v in items]
    default_value = numerics.value_at(default, state.count)
    leaves, treedef = jax.tree.flatten(updates)
    new_leaves = []
    for i, u in enumerate(leaves):
      matched = [value for value, mask in zip(values, masks, strict=True) if mask[i]]
      if not matched:
        multiplier = default_value
      else:  # Python numbers multiply exactly in float64, arrays in JAX
        multiplier = matched[0]
        for value in matched[1:]:
          multiplier = multiplier * value
      new_leaves.append(_scale(u, multiplier))
    return jax.tree.unflatten(treedef, new_leaves), ScaleByPathState(
      optax.safe_increment(state.count)
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
