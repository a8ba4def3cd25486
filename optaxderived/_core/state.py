"""Finding a transformation's state inside any optimizer state (chains, wrappers, masks)."""

from __future__ import annotations

from typing import Any
from typing import TypeVar

import jax

from optaxderived._core import checks

S = TypeVar("S")


def find_states(state: Any, state_type: type[S]) -> list[S]:
  """Every ``state_type`` instance inside ``state``, outermost first, in tree order.

  ``state`` may be the instance itself or any optimizer state that holds it: a chain's
  tuple, a wrapper's ``inner_state``, a ``partition``/``masked`` state, a dict.

  Example:
    >>> import jax
    >>> import optax
    >>> from optaxderived._core.state import find_states
    >>> tx = optax.chain(optax.clip(1.0), optax.adam(1e-3))
    >>> state = tx.init({"w": jax.numpy.ones(2)})
    >>> [type(s).__name__ for s in find_states(state, optax.ScaleByAdamState)]
    ['ScaleByAdamState']
  """
  is_target = lambda x: isinstance(x, state_type)
  return [s for s in jax.tree.leaves(state, is_leaf=is_target) if is_target(s)]


def find_state(state: Any, state_type: type[S], *, accessor: str, index: int = 0) -> S:
  """The ``index``-th ``state_type`` inside ``state`` (0: the outermost; then in tree order,
  which is chain order).

  Raises:
    ValueError: naming ``accessor`` when ``state`` holds no ``state_type``, or naming
      ``index`` when it holds ``index`` or fewer of them.
  """
  checks.check_int(accessor, "index", index, low=0, schedule=False)
  found = find_states(state, state_type)
  if not found:
    raise ValueError(
      f"{accessor}: the optimizer state holds no {state_type.__name__} "
      f"(got a {type(state).__name__})"
    )
  if index >= len(found):
    raise ValueError(
      f"{accessor}: index must be < {len(found)}, the number of {state_type.__name__}s in "
      f"the optimizer state, got {index!r}"
    )
  return found[index]


def holds_micro_steps(state: Any) -> bool:
  """Whether ``state`` holds the state of a wrapper that runs its inner update on some calls
  only (its state has a ``micro_steps`` property that is True, as ``AccumulateState`` has), so
  a wrapper that must see every update (``od.lazy``'s row masks) can refuse it."""
  marked = lambda x: getattr(x, "micro_steps", None) is True
  return any(marked(x) for x in jax.tree.leaves(state, is_leaf=marked))
