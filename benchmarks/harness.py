"""Side-by-side timing of jitted training steps: each pair alternately, in one process.

A *subject* is a training step as users write it: ``step(carry, batch) -> carry``, jitted
with the carry (params and optimizer state) donated. A :class:`Case` times two subjects
alternately in one process (A, B, B, A, ...), each call covering a whole cycle of the
wrapper being measured, and reports the medians, their ratio and the compiled memory.
Before timing, each case checks that what it times computes the right thing.
"""

import dataclasses
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax


@dataclasses.dataclass(frozen=True)
class Subject:
  """A jittable training step and how to build its first carry.

  Attributes:
    name: how the table names it.
    init: ``params -> carry`` (the carry is donated to every step).
    step: ``(carry, batch) -> carry``, one micro step.
  """

  name: str
  init: Callable[[Any], Any]
  step: Callable[[Any, Any], Any]


def tx_subject(name: str, tx: optax.GradientTransformation, **extra: Any) -> Subject:
  """``update`` plus ``apply_updates``: the step of any optax transformation."""

  def step(carry, grads):
    params, state = carry
    updates, state = tx.update(grads, state, params, **extra)
    return optax.apply_updates(params, updates), state

  return Subject(name, lambda params: (params, tx.init(params)), step)


def floor_subject(num_state_trees: int) -> Subject:
  """The memory floor: a fused elementwise kernel moving the bytes of a real step.

  It reads params, grads and ``num_state_trees`` param-shaped state trees and writes
  params and the state trees (Adam: ``num_state_trees=2``, for mu and nu).
  """

  def init(params):
    return (params,) + tuple(
      jax.tree.map(lambda p, i=i: p * (i + 2.0), params) for i in range(num_state_trees)
    )

  def step(carry, grads):
    params, *states = carry
    states = [jax.tree.map(lambda s, g: 0.5 * s + g, s, grads) for s in states]
    total = grads
    for s in states:
      total = jax.tree.map(jnp.add, total, s)
    return (jax.tree.map(lambda p, t: p - 1e-3 * t, params, total), *states)

  return Subject(f"floor ({1 + num_state_trees} trees)", init, step)


@dataclasses.dataclass(frozen=True)
class Case:
  """Two subjects timed side by side on the same params and batch.

  Attributes:
    name: the row's name.
    ours: the optaxderived step.
    baseline: its counterpart (an optax step, or the floor).
    cycle: micro steps per timed call (a wrapper acting every k steps: k).
    target: the target ratio ours/baseline (None: none asked).
    check: ``(params, batch) -> None``, raises when ``ours`` computes the wrong thing.
    batch: ``(params, key) -> batch`` (default: a gradient tree of random normals).
    params: ``scale -> params`` (default: :func:`make_params`, about 4M at ``scale=1``).
  """

  name: str
  ours: Subject
  baseline: Subject
  cycle: int = 1
  target: float | None = None
  check: Callable[[Any, Any], None] | None = None
  batch: Callable[[Any, jax.Array], Any] | None = None
  params: Callable[[float], Any] | None = None


@dataclasses.dataclass(frozen=True)
class Result:
  case: Case
  ours_ms: float
  baseline_ms: float
  ours_memory: dict[str, int]
  baseline_memory: dict[str, int]
  ours_compile_s: float
  baseline_compile_s: float

  @property
  def ratio(self) -> float:
    return self.ours_ms / self.baseline_ms


def make_params(scale: float = 1.0, seed: int = 0) -> dict[str, jax.Array]:
  """16 float32 leaves of random normals, about 4M parameters at ``scale=1``.

  Twelve matrices and four vectors of mixed shapes, as in a small transformer block.
  """
  rows = max(1, round(512 * scale))
  shapes = [(rows, 640)] * 6 + [(rows, 512)] * 4 + [(rows, 768)] * 2 + [(640,)] * 4
  keys = jax.random.split(jax.random.key(seed), len(shapes))
  return {
    f"leaf_{i:02d}": jax.random.normal(k, s, jnp.float32)
    for i, (k, s) in enumerate(zip(keys, shapes, strict=True))
  }


def random_like(tree: Any, key: jax.Array) -> Any:
  """Random normals shaped like ``tree`` (never zeros: zeros can run faster)."""
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(key, len(leaves))
  return treedef.unflatten(
    [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves, strict=True)]
  )


def _copy(tree: Any) -> Any:
  return jax.tree.map(jnp.copy, tree)


def _compile(subject: Subject, params: Any, batch: Any):
  """The donated jitted step, its compile seconds and its memory analysis.

  A backend whose compiled programs have no memory analysis (or leave a size out: ``None``)
  reports 0 for that size.
  """
  jitted = jax.jit(subject.step, donate_argnums=0)
  carry = subject.init(_copy(params))
  start = time.perf_counter()
  compiled = jitted.lower(carry, batch).compile()
  seconds = time.perf_counter() - start
  try:
    analysis = compiled.memory_analysis()
  except (NotImplementedError, RuntimeError):  # a backend without it: sizes of 0
    analysis = None
  memory = {
    field: int(getattr(analysis, f"{field}_size_in_bytes", 0) or 0)
    for field in ("temp", "argument", "output")
  }
  return compiled, carry, seconds, memory


def _run_cycle(compiled, carry, batch, cycle: int):
  for _ in range(cycle):
    carry = compiled(carry, batch)
  jax.block_until_ready(carry)
  return carry


def run_case(
  case: Case, *, scale: float = 1.0, reps: int = 30, warmup: int = 3, seed: int = 0
) -> Result:
  """Checks, compiles and times ``case`` (median seconds per micro step)."""
  params = case.params(scale) if case.params else make_params(scale)
  key = jax.random.key(seed)
  batch = case.batch(params, key) if case.batch else random_like(params, key)
  if case.check is not None:
    case.check(params, batch)
  a, carry_a, compile_a, memory_a = _compile(case.ours, params, batch)
  b, carry_b, compile_b, memory_b = _compile(case.baseline, params, batch)
  for _ in range(warmup):
    carry_a = _run_cycle(a, carry_a, batch, case.cycle)
    carry_b = _run_cycle(b, carry_b, batch, case.cycle)
  times_a, times_b = [], []
  for rep in range(reps):
    order = ((a, times_a), (b, times_b)) if rep % 2 == 0 else ((b, times_b), (a, times_a))
    for compiled, times in order:
      carry = carry_a if compiled is a else carry_b
      start = time.perf_counter()
      carry = _run_cycle(compiled, carry, batch, case.cycle)
      times.append((time.perf_counter() - start) / case.cycle)
      if compiled is a:
        carry_a = carry
      else:
        carry_b = carry
  return Result(
    case=case,
    ours_ms=1e3 * statistics.median(times_a),
    baseline_ms=1e3 * statistics.median(times_b),
    ours_memory=memory_a,
    baseline_memory=memory_b,
    ours_compile_s=compile_a,
    baseline_compile_s=compile_b,
  )


def check_close(
  ours: Subject,
  reference: Subject,
  *,
  cycle: int = 1,
  rtol: float = 1e-5,
  atol: float = 1e-6,
) -> Callable[[Any, Any], None]:
  """A check that ``ours`` and ``reference`` give the same params after ``cycle`` steps."""

  def check(params, batch):
    results = []
    for subject in (ours, reference):
      carry = subject.init(_copy(params))
      step = jax.jit(subject.step)
      for _ in range(cycle):
        carry = step(carry, batch)
      results.append(carry[0])
    for x, y in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1]), strict=True):
      np.testing.assert_allclose(
        np.asarray(x, np.float64), np.asarray(y, np.float64), rtol=rtol, atol=atol
      )

  return check


def all_checks(*checks: Callable[[Any, Any], None]) -> Callable[[Any, Any], None]:
  """One check that runs each of ``checks`` in turn."""

  def check(params, batch):
    for c in checks:
      c(params, batch)

  return check


def _mib(n: int) -> str:
  return f"{n / 2**20:.1f}"


def markdown_table(results: list[Result]) -> str:
  """The results as the table of ``benchmarks/RESULTS.md``."""
  lines = [
    "| case | ours | baseline | ours ms/step | baseline ms/step | ratio | target "
    "| temp MiB ours / baseline | args MiB | compile s ours / baseline |",
    "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for r in results:
    target = "" if r.case.target is None else f"≤ {r.case.target:g}"
    verdict = "" if r.case.target is None else (" ✓" if r.ratio <= r.case.target else " ✗")
    lines.append(
      f"| {r.case.name} | {r.case.ours.name} | {r.case.baseline.name} "
      f"| {r.ours_ms:.2f} | {r.baseline_ms:.2f} | {r.ratio:.2f}{verdict} | {target} "
      f"| {_mib(r.ours_memory['temp'])} / {_mib(r.baseline_memory['temp'])} "
      f"| {_mib(r.ours_memory['argument'])} "
      f"| {r.ours_compile_s:.2f} / {r.baseline_compile_s:.2f} |"
    )
  return "\n".join(lines)
