"""Per-parameter transformations chosen by path patterns (``optax.partition`` by path)."""

from __future__ import annotations

from collections.abc import Mapping

import jax
import optax

from optaxderived._core import checks
from optaxderived._core import paths

DEFAULT_LABEL = "default"


def _rule_label(index: int) -> str:
  return f"rule_{index}"


def transform_by_path(
  rules: Mapping[paths.Patterns, optax.GradientTransformation],
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
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optaxderived as od
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
  fn = "od.transform_by_path"
  checks.check_bool(fn, "strict", strict)
  checks.check_bool(fn, "mask_compatible_extra_args", mask_compatible_extra_args)
  items = paths.rule_items(rules, fn, strict=strict)
  for key, _, value in items:
    checks.check_transformation(fn, f"the value of rule {key!r}", value)
  checks.check_transformation(fn, "default", default, optional=True)
  transforms = {_rule_label(i): tx for i, (_, _, tx) in enumerate(items)}
  transforms[DEFAULT_LABEL] = optax.identity() if default is None else default

  def rules_of(tree):
    """Each leaf's rule index (None: the default), in ``jax.tree.leaves`` order."""
    masks = paths.rule_masks(items, tree)
    num_leaves = len(jax.tree.leaves(paths.tree_paths(tree)))
    return masks, [
      next((r for r, m in enumerate(masks) if m[i]), None) for i in range(num_leaves)
    ]

  def labels_fn(tree):
    _, rules = rules_of(tree)
    labels = [DEFAULT_LABEL if r is None else _rule_label(r) for r in rules]
    return jax.tree.unflatten(jax.tree.structure(paths.tree_paths(tree)), labels)

  partition = optax.partition(
    transforms, labels_fn, mask_compatible_extra_args=mask_compatible_extra_args
  )

  def init_fn(params):
    for _, chosen, _ in items:
      chosen.check_used(params)
    masks, rules = rules_of(params)
    leaf_paths = jax.tree.leaves(paths.tree_paths(params))
    for r, (key, _, _) in enumerate(items):
      matched = [p for p, m in zip(leaf_paths, masks[r], strict=True) if m]
      if matched and r not in rules:
        paths.report(
          f"{fn}: rule {key!r} selects no parameter: every path it matches ({matched[:4]}) "
          "is taken by an earlier rule",
          strict=strict,
        )
    return partition.init(params)

  def update_fn(updates, state, params=None, **extra_args):
    if params is not None:
      checks.check_same_tree(fn, updates, params, "params")
    return partition.update(updates, state, params, **extra_args)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
