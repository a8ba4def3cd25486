"""Per-path rules: multipliers (per-parameter learning rates) and transformations by path.

Both take ``rules`` that map :data:`~optaxderived.Patterns` (regexes searched in a leaf's
path, see :mod:`optaxderived._paths`) to a value, and match at trace time on the tree's
structure only, so they cost nothing at run time beyond the arithmetic they ask for.
"""

import re
import warnings
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from optaxderived import _checks
from optaxderived import _paths

DEFAULT_LABEL = "default"


def _rule_items(rules: Any, argname: str) -> list[tuple[Any, tuple[re.Pattern, ...], Any]]:
  """``(key, compiled patterns, value)`` for each rule, in order.

  ``rules`` is a mapping from patterns to values, or a sequence of ``(patterns, value)``
  pairs (a sequence of patterns is given as a tuple key in a mapping).
  """
  if isinstance(rules, Mapping):
    pairs = list(rules.items())
  elif isinstance(rules, Sequence) and not isinstance(rules, str):
    pairs = list(rules)
    for pair in pairs:
      if not (isinstance(pair, Sequence) and not isinstance(pair, str) and len(pair) == 2):
        raise ValueError(f"{argname}: rules must map patterns to values, got the item {pair!r}")
  else:
    raise ValueError(
      f"{argname}: rules must be a mapping from patterns to values, got {type(rules).__name__}"
    )
  items = []
  for key, value in pairs:
    compiled = _paths.compile_patterns(key, argname=f"{argname} rule {key!r}")
    if not compiled:
      raise ValueError(f"{argname}: rule {key!r} names no pattern")
    items.append((key, compiled, value))
  return items


def _masks(items, tree: Any, argname: str, strict: bool) -> list[list[bool]]:
  """For each rule, the leaves (in ``jax.tree.leaves`` order) that its patterns search."""
  if not jax.tree.leaves(tree):
    # Nothing to match, nothing to warn about (e.g. the placeholder that
    # ``optax.tree_map_params`` passes to ``init`` to find the param-shaped state).
    return [[] for _ in items]
  return [
    jax.tree.leaves(_paths.match_tree(compiled, tree, argname=argname, strict=strict))
    for _, compiled, _ in items
  ]


def _check_multiplier(name: str, value: Any) -> None:
  """A multiplier is a finite real number (any sign), a schedule or a traced value."""
  if isinstance(value, bool) or (
    not callable(value) and not hasattr(value, "dtype") and not isinstance(value, int | float)
  ):
    raise ValueError(f"{name} must be a number or a schedule, got {value!r}")
  if hasattr(value, "dtype") and jnp.ndim(value) != 0:
    raise ValueError(f"{name} must be a scalar or a schedule, got shape {jnp.shape(value)}")
  _checks.check_range(
    name, value, low=-float("inf"), high=float("inf"), low_open=True, high_open=True
  )


def _scale(u: jax.Array, multiplier: Any) -> jax.Array:
  """``u · multiplier`` in at least float32, returned in ``u``'s dtype."""
  if isinstance(multiplier, int | float) and multiplier == 1:
    return u
  wide = u.astype(jnp.promote_types(u.dtype, jnp.float32))
  return (wide * multiplier).astype(u.dtype)


class ScaleByPathState(NamedTuple):
  """State of :func:`scale_by_path`.

  Attributes:
    count: the number of update calls so far (int32); schedules are evaluated at it.
  """

  count: jax.Array


def scale_by_path(
  rules: Mapping[_paths.Patterns, optax.ScalarOrSchedule],
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
  items = _rule_items(rules, "scale_by_path")
  for key, _, value in items:
    _check_multiplier(f"scale_by_path: the multiplier of rule {key!r}", value)
  _check_multiplier("default", default)

  def init_fn(params):
    _masks(items, params, "scale_by_path", strict)  # checks the patterns early
    return ScaleByPathState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    masks = _masks(items, updates, "scale_by_path", strict)
    values = [v(state.count) if callable(v) else v for _, _, v in items]
    default_value = default(state.count) if callable(default) else default
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
    return treedef.unflatten(new_leaves), ScaleByPathState(optax.safe_increment(state.count))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _rule_label(index: int) -> str:
  return f"rule_{index}"


def transform_by_path(
  rules: Mapping[_paths.Patterns, optax.GradientTransformation],
  *,
  default: optax.GradientTransformation | None = None,
  strict: bool = False,
  mask_compatible_extra_args: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""Applies to each leaf the transformation of the first rule whose patterns match it.

  The rules are tried in order; the first whose patterns search a leaf's path picks the
  leaf's transformation, and a leaf that matches no rule gets ``default`` (``None``: the
  identity, the leaf's update passes unchanged). Each transformation keeps its own state,
  sized for the leaves it owns:

  .. math::

    u_p \leftarrow T_{r(p)}(u_p), \qquad
    r(p) = \min\{r : \text{a pattern of rule } r \text{ searches } p\}.

  It is ``optax.partition`` with the labels computed from the leaves' paths, so no label
  tree has to be built by hand, and it works where a hand-built label tree breaks: the
  labels are recomputed from whatever tree is passed, so ``nnx.Optimizer`` (whose ``init``
  gets ``nnx.State`` of Variables and whose ``update`` gets plain arrays), linen params,
  FrozenDicts and plain dicts all work. The state is ``optax.PartitionState`` whose
  ``inner_states`` are keyed ``"rule_0"``, ``"rule_1"``, ... in the order of ``rules``, and
  ``"default"``. A pattern that matches no leaf warns once (raises with ``strict=True``), and
  so does a rule all of whose leaves are taken by earlier rules: both are almost always
  mistakes.

  Args:
    rules: a mapping from patterns (a regex, or a tuple of regexes) to transformations, in
      order of priority.
    default: the transformation of the leaves that match no rule (``None``: identity).
    strict: raise ``ValueError`` instead of warning for a pattern that matches no leaf or a
      rule shadowed by earlier ones.
    mask_compatible_extra_args: passed to ``optax.partition``: also mask the extra
      arguments of ``update`` that have the updates' tree structure.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Raises:
    ValueError: for a pattern that does not compile, a value that is not an
      ``optax.GradientTransformation``, or (with ``strict=True``, at ``init``) a pattern that
      matches no leaf or a shadowed rule.

  Example:
    >>> params = {"dense": {"kernel": jnp.ones(2), "bias": jnp.ones(2)}, "embed": jnp.ones(2)}
    >>> tx = od.transform_by_path(
    ...   {"embed": optax.set_to_zero(), "kernel": optax.adam(0.1)}, default=optax.sgd(0.1)
    ... )
    >>> state = tx.init(params)
    >>> sorted(state.inner_states)
    ['default', 'rule_0', 'rule_1']
    >>> updates, state = tx.update(params, state, params)  # gradients of ones
    >>> jax.tree.map(lambda u: float(u[0]), updates)
    {'dense': {'bias': -0.1, 'kernel': -0.1}, 'embed': 0.0}

  References:
    optax, `optax.partition
    <https://optax.readthedocs.io/en/latest/api/combining_optimizers.html>`_ (the engine).

    Su, `Layer-wise learning rates and gradient manipulation
    <https://kexue.fm/archives/6418>`_, 2019.
  """
  items = _rule_items(rules, "transform_by_path")
  for key, _, value in items:
    if not isinstance(value, optax.GradientTransformation):
      raise ValueError(
        f"transform_by_path: the value of rule {key!r} must be an "
        f"optax.GradientTransformation, got {value!r}"
      )
  if default is not None and not isinstance(default, optax.GradientTransformation):
    raise ValueError(
      f"default must be an optax.GradientTransformation or None, got {default!r}"
    )
  transforms = {_rule_label(i): tx for i, (_, _, tx) in enumerate(items)}
  transforms[DEFAULT_LABEL] = optax.identity() if default is None else default

  def labels_fn(tree):
    masks = _masks(items, tree, "transform_by_path", strict)
    paths, treedef = jax.tree.flatten(_paths.tree_paths(tree))
    labels = []
    for i in range(len(paths)):
      rule = next((r for r, mask in enumerate(masks) if mask[i]), None)
      labels.append(DEFAULT_LABEL if rule is None else _rule_label(rule))
    for r, (key, _, _) in enumerate(items):
      matched = [p for p, m in zip(paths, masks[r], strict=True) if m]
      if matched and _rule_label(r) not in labels:
        _shadowed(key, matched, strict)
    return treedef.unflatten(labels)

  partition = optax.partition(
    transforms, labels_fn, mask_compatible_extra_args=mask_compatible_extra_args
  )

  def update_fn(updates, state, params=None, **extra_args):
    if params is not None:
      _checks.check_same_tree("transform_by_path", updates, params, "params")
    return partition.update(updates, state, params, **extra_args)

  return optax.GradientTransformationExtraArgs(partition.init, update_fn)


def _shadowed(key: Any, matched: list[str], strict: bool) -> None:
  message = (
    f"transform_by_path: rule {key!r} selects no parameter: every path it matches "
    f"({matched[:4]}) is taken by an earlier rule"
  )
  if strict:
    raise ValueError(message)
  if ("transform_by_path:shadowed", repr(key)) not in _paths._warned:
    _paths._warned.add(("transform_by_path:shadowed", repr(key)))
    warnings.warn(message, UserWarning, stacklevel=4)
