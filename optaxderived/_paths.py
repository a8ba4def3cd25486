"""The path convention: how a parameter leaf is named and how patterns select leaves.

A leaf's *path* is its pytree key path joined with ``"/"``: dict keys and attribute names
as they are, sequence indices as numbers (``params/Dense_0/kernel``, ``layers/3/bias``).
The ``value`` attribute of a Flax nnx ``Variable`` is not part of the path, so a leaf has
the same path in ``nnx.State`` and in the plain arrays that ``nnx.Optimizer`` passes to
``update``. Every transformation that takes patterns goes through this module.
"""

import re
import warnings
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import jax

Patterns = str | re.Pattern | Sequence[str | re.Pattern]
"""A regex or a sequence of regexes; a leaf matches when any of them ``re.search``es its
path."""


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


def tree_paths(tree: Any) -> Any:
  """A pytree with the structure of ``tree`` whose leaves are the leaves' paths.

  Example:
    >>> import jax.numpy as jnp
    >>> import optaxderived as od
    >>> od.tree_paths({"dense": {"kernel": jnp.ones(2)}, "layers": [jnp.ones(1)]})
    {'dense': {'kernel': 'dense/kernel'}, 'layers': ['layers/0']}
  """

  def path_of(key_path, x):
    if _is_nnx_variable(x):  # its value gets the Variable's own path, without ".value"
      return jax.tree.map(lambda _: path_str(key_path), x)
    return path_str(key_path)

  return jax.tree_util.tree_map_with_path(path_of, tree, is_leaf=_is_nnx_variable)


def compile_patterns(patterns: Patterns | None, *, argname: str) -> tuple[re.Pattern, ...]:
  """Validates ``patterns`` and compiles them; ``None`` gives no pattern.

  Raises:
    ValueError: naming ``argname`` when a pattern is not a string or regex, or does not
      compile.
  """
  if patterns is None:
    return ()
  if isinstance(patterns, str | re.Pattern):
    patterns = (patterns,)
  compiled = []
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
  return tuple(compiled)


_warned: set[tuple[str, str]] = set()


def check_all_used(
  compiled: Sequence[re.Pattern],
  paths: Sequence[str],
  *,
  argname: str,
  strict: bool = False,
) -> None:
  """Warns once (raises with ``strict``) for a pattern that matches none of ``paths``.

  A pattern that selects nothing is almost always a typo, so the message names the pattern
  and a few paths that exist.
  """
  for pattern in compiled:
    if any(pattern.search(p) for p in paths):
      continue
    message = (
      f"{argname}: pattern {pattern.pattern!r} matches no parameter; "
      f"some paths are {list(paths[:4])}"
    )
    if strict:
      raise ValueError(message)
    if (argname, pattern.pattern) not in _warned:
      _warned.add((argname, pattern.pattern))
      warnings.warn(message, UserWarning, stacklevel=3)


def match_tree(
  compiled: Sequence[re.Pattern],
  tree: Any,
  *,
  argname: str,
  strict: bool = False,
) -> Any:
  """A bool pytree: True where any of ``compiled`` searches the leaf's path.

  Runs at trace time on the tree structure only (no array is read).
  """
  paths = tree_paths(tree)
  check_all_used(compiled, jax.tree.leaves(paths), argname=argname, strict=strict)
  return jax.tree.map(lambda p: any(c.search(p) for c in compiled), paths)


def path_mask(patterns: Patterns, *, strict: bool = False) -> Callable[[Any], Any]:
  r"""A mask function ``params -> bool pytree``, True where a leaf's path matches.

  It plugs into any optax ``mask=`` argument (``optax.masked``,
  ``optax.add_decayed_weights``, ...). A leaf's path is its key path joined with ``"/"``
  (see :func:`tree_paths`); a leaf matches when any pattern ``re.search``\ es it. A pattern
  that matches no leaf warns once, or raises ``ValueError`` when ``strict=True``.

  Args:
    patterns: a regex or a sequence of regexes.
    strict: raise instead of warning on a pattern that matches nothing.

  Returns:
    A callable ``params -> bool pytree`` with the structure of ``params``.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optaxderived as od
    >>> params = {"dense": {"kernel": jnp.ones(2), "bias": jnp.ones(2)}}
    >>> od.path_mask("kernel")(params)
    {'dense': {'bias': False, 'kernel': True}}
    >>> decay = optax.add_decayed_weights(0.1, mask=od.path_mask("kernel"))
    >>> updates, _ = decay.update(params, decay.init(params), params)
    >>> updates["dense"]["bias"], updates["dense"]["kernel"]
    (Array([1., 1.], dtype=float32), Array([1.1, 1.1], dtype=float32))
  """
  compiled = compile_patterns(patterns, argname="patterns")
  if not compiled:
    raise ValueError(f"patterns must name at least one regex, got {patterns!r}")
  return lambda params: match_tree(compiled, params, argname="path_mask", strict=strict)
