"""The path convention: how a parameter leaf is named and how patterns select leaves.

A leaf's *path* is its pytree key path joined with ``"/"``: dict keys and attribute names
as they are, sequence indices as numbers (``params/Dense_0/kernel``, ``layers/3/bias``).
The ``value`` attribute of a Flax nnx ``Variable`` is not part of the path, so a leaf has
the same path in ``nnx.State`` and in the plain arrays that ``nnx.Optimizer`` passes to
``update``. Every transformation that takes patterns goes through this module, and this
module alone warns about (or, with ``strict``, refuses) a pattern that selects nothing.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any
from typing import TypeAlias

import jax

Patterns: TypeAlias = str | re.Pattern | Sequence[str | re.Pattern] | Callable[[str, Any], bool]
"""A regex, a sequence of regexes (a leaf matches when any of them ``re.search``\\ es its
path), or a predicate ``(path, leaf) -> bool`` such as ``lambda path, p: p.ndim < 2``."""


def _key_name(key: Any) -> str:
  if isinstance(key, jax.tree_util.DictKey):
    return str(key.key)
  if isinstance(key, jax.tree_util.GetAttrKey):
    return key.name
  if isinstance(key, jax.tree_util.SequenceKey):
    return str(key.idx)
  if isinstance(key, jax.tree_util.FlattenedIndexKey):
    return str(key.key)
  return str(key)


def path_str(key_path: Sequence[Any]) -> str:
  """Joins a JAX key path into the ``"a/b/0/c"`` form."""
  return "/".join(_key_name(k) for k in key_path)


def _is_nnx_variable(x: Any) -> bool:
  """A Flax nnx ``Variable`` (checked by class, so flax need not be installed)."""
  return any(
    c.__name__ == "Variable" and c.__module__.startswith("flax.nnx") for c in type(x).__mro__
  )


def _map_with_paths(fn: Callable[[str, Any], Any], tree: Any) -> Any:
  """``fn(path, leaf)`` over ``tree``; an nnx Variable's value gets the Variable's path."""

  def leaf(key_path, x):
    if _is_nnx_variable(x):  # its value gets the Variable's own path, without ".value"
      return jax.tree.map(lambda v: fn(path_str(key_path), v), x)
    return fn(path_str(key_path), x)

  return jax.tree_util.tree_map_with_path(leaf, tree, is_leaf=_is_nnx_variable)


def tree_paths(tree: Any) -> Any:
  """A pytree with the structure of ``tree`` whose leaves are the leaves' paths.

  Example:
    >>> import jax.numpy as jnp
    >>> import optaxderived as od
    >>> od.tree_paths({"dense": {"kernel": jnp.ones(2)}, "layers": [jnp.ones(1)]})
    {'dense': {'kernel': 'dense/kernel'}, 'layers': ['layers/0']}
  """
  return _map_with_paths(lambda path, _: path, tree)


@dataclasses.dataclass(frozen=True)
class Selector:
  """Validated patterns, with the argument they came from (for messages) and ``strict``.

  A factory turns its ``Patterns`` argument into a ``Selector`` once, with
  :func:`selector`; :func:`optaxderived.derive` passes its own ``Selector`` on, so a message
  names the argument the user wrote (``od.derive: exclude_from_weight_decay``).
  """

  regexes: tuple[re.Pattern, ...]
  predicate: Callable[[str, Any], Any] | None
  argname: str
  strict: bool = False
  source: Any = None  # the patterns as the user gave them, for messages

  def __repr__(self) -> str:
    return repr(self.source)

  def __call__(self, path: str, leaf: Any) -> bool:  # so a Selector is a Patterns predicate
    return self.matches(path, leaf)

  def __bool__(self) -> bool:
    return bool(self.regexes) or self.predicate is not None

  def matches(self, path: str, leaf: Any) -> bool:
    if any(r.search(path) for r in self.regexes):
      return True
    if self.predicate is None:
      return False
    result = self.predicate(path, leaf)
    try:
      return bool(result)
    except jax.errors.ConcretizationTypeError:
      raise ValueError(
        f"{self.argname}: the predicate must decide from the path and the leaf's shape or "
        f"dtype, not its values; got {result!r} for {path!r}"
      ) from None

  def mask(self, tree: Any) -> Any:
    """A bool pytree with the structure of ``tree``: True where a leaf is selected.

    Runs at trace time on the paths, shapes and dtypes only (no array is read).
    """
    return _map_with_paths(self.matches, tree)

  def check_used(self, tree: Any) -> None:
    """Warns (raises ``ValueError`` with ``strict``) for a pattern that selects no leaf of
    ``tree``: it is almost always a typo. Call it from ``init``, where the tree is known;
    an empty tree (a placeholder such as ``optax.tree_map_params`` passes) is not checked."""
    paths = jax.tree.leaves(tree_paths(tree))
    if not paths:
      return
    leaves = list(zip(paths, jax.tree.leaves(tree), strict=True))
    unused = [r.pattern for r in self.regexes if not any(r.search(p) for p in paths)]
    if self.predicate is not None and not any(self.matches(p, x) for p, x in leaves):
      unused.append(self.predicate)
    for pattern in unused:
      report(
        f"{self.argname}: pattern {pattern!r} matches no parameter; some paths are {paths[:4]}",
        strict=self.strict,
      )


def report(message: str, *, strict: bool) -> None:
  """Raises ``ValueError(message)`` with ``strict``, else warns (Python's warning registry
  shows each message once per place)."""
  if strict:
    raise ValueError(message)
  warnings.warn(message, UserWarning, stacklevel=4)


def selector(patterns: Any, *, argname: str, strict: bool = False) -> Selector:
  """Validates ``patterns`` (:data:`Patterns` or None, which selects nothing) into a
  :class:`Selector`; a ``Selector`` passes through unchanged.

  Raises:
    ValueError: naming ``argname`` when a pattern is not a string, a compiled regex or a
      callable, or does not compile.
  """
  if isinstance(patterns, Selector):
    return patterns
  if patterns is None:
    return Selector((), None, argname, strict, patterns)
  if callable(patterns) and not isinstance(patterns, re.Pattern):
    return Selector((), patterns, argname, strict, patterns)
  if isinstance(patterns, str | re.Pattern):
    patterns = (patterns,)
  if not isinstance(patterns, Sequence) or isinstance(patterns, Mapping):
    raise ValueError(
      f"{argname} must be a regex, a sequence of regexes or a callable (path, leaf) -> bool, "
      f"got {patterns!r}"
    )
  source, compiled = patterns, []
  for pattern in patterns:
    if isinstance(pattern, re.Pattern):
      compiled.append(pattern)
    elif isinstance(pattern, str):
      try:
        compiled.append(re.compile(pattern))
      except re.error as e:
        raise ValueError(f"{argname}: invalid regex {pattern!r}: {e}") from None
    else:
      raise ValueError(f"{argname} must hold regex strings, got {pattern!r}")
  return Selector(tuple(compiled), None, argname, strict, source)


def path_mask(patterns: Patterns, *, strict: bool = False) -> Callable[[Any], Any]:
  r"""A mask function ``params -> bool pytree``, True where a leaf is selected.

  It plugs into any optax ``mask=`` argument (``optax.masked``,
  ``optax.add_decayed_weights``, ...). A leaf's path is its key path joined with ``"/"``
  (see :func:`tree_paths`); a leaf matches when any regex ``re.search``\ es it, or when the
  predicate ``(path, leaf) -> bool`` is true. An empty sequence matches no leaf. A pattern
  that matches no leaf warns, or raises ``ValueError`` when ``strict=True``.

  Args:
    patterns: a regex, a sequence of regexes, or a predicate ``(path, leaf) -> bool``.
    strict: raise instead of warning on a pattern that matches nothing.

  Returns:
    A callable ``params -> bool pytree`` with the structure of ``params``.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optaxderived as od
    >>> params = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}}
    >>> od.path_mask("kernel")(params)
    {'dense': {'bias': False, 'kernel': True}}
    >>> od.path_mask(lambda path, p: p.ndim < 2)(params)  # every vector: biases, norm scales
    {'dense': {'bias': True, 'kernel': False}}
    >>> decay = optax.add_decayed_weights(0.1, mask=od.path_mask("kernel"))
    >>> updates, _ = decay.update(params, decay.init(params), params)
    >>> updates["dense"]["bias"]
    Array([1., 1.], dtype=float32)
  """
  chosen = selector(patterns, argname="od.path_mask: patterns", strict=strict)

  def mask(params: Any) -> Any:
    chosen.check_used(params)
    return chosen.mask(params)

  return mask


def rule_items(
  rules: Any, argname: str, *, strict: bool = False
) -> list[tuple[Any, Selector, Any]]:
  """``(key, selector, value)`` for each rule of a per-path rules argument, in order.

  ``rules`` is a mapping from patterns to values, or a sequence of ``(patterns, value)``
  pairs (a sequence of regexes is given as a tuple key in a mapping).
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
    chosen = selector(key, argname=f"{argname}: rule {key!r}", strict=strict)
    if not chosen:
      raise ValueError(f"{argname}: rule {key!r} names no pattern")
    items.append((key, chosen, value))
  return items


def rule_masks(items: list[tuple[Any, Selector, Any]], tree: Any) -> list[list[bool]]:
  """For each rule of :func:`rule_items`, whether it selects each leaf of ``tree`` (in
  ``jax.tree.leaves`` order)."""
  return [jax.tree.leaves(chosen.mask(tree)) for _, chosen, _ in items]
