"""Runs the quality benchmark: every arm on every task, over a learning-rate sweep and seeds.

Usage::

  python -m benchmarks --quality                  # the full table (about 20 min on 2 cores)
  python -m benchmarks --quality --smoke          # a few dozen updates: checks that all runs
  python -m benchmarks --quality --plot out.png   # also the eval-loss curves of the best rates

For each task, arm, learning rate and seed it trains from the same initial params on the same
batches (``--updates`` updates of ``--batch`` examples; an accumulating arm takes each batch as
micro-batches), evaluates the arm's evaluation params on held-out data, and reports for each
arm the learning rate with the best mean eval loss, that loss's mean and spread over seeds, the
task's metric and the wall-clock seconds per update (after compilation).
"""

import argparse
import dataclasses
import datetime
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks.quality import arms as arms_lib
from benchmarks.quality import tasks as tasks_lib


@dataclasses.dataclass(frozen=True)
class Run:
  task: str
  arm: str
  family: str
  rate: float
  seed: int
  eval_loss: float
  metric: float
  seconds_per_update: float
  curve: np.ndarray  # the eval loss every ``eval_every`` updates


def train(
  task: tasks_lib.Task,
  arm: arms_lib.Arm,
  rate: float,
  seed: int,
  *,
  updates: int,
  batch: int,
  eval_points: int = 20,
) -> Run:
  """One run: ``updates`` updates from ``task.init(seed)`` on ``task.batches(seed, ...)``."""
  tx = arm.make(rate, updates)
  params = task.init(seed)
  batches = task.batches(seed, updates, batch)
  if arm.micro > 1:  # each batch as micro-batches, one update call each
    batches = jax.tree.map(
      lambda b: b.reshape(updates * arm.micro, batch // arm.micro, *b.shape[2:]), batches
    )
  calls = updates * arm.micro
  every = max(1, calls // eval_points)
  read = arm.eval_params or (lambda state, params: params)

  def evaluate(state, params):
    return task.evaluate(read(state, params))

  @jax.jit
  def run(params, batches):
    def step(carry, xs):
      params, state = carry
      i, batch = xs
      grads = jax.grad(task.loss)(params, batch)
      updates_, state = tx.update(grads, state, params)
      params = optax.apply_updates(params, updates_)
      loss = jax.lax.cond(
        (i + 1) % every == 0,
        lambda: evaluate(state, params)["eval loss"],
        lambda: jnp.full([], jnp.nan),
      )
      return (params, state), loss

    (params, state), curve = jax.lax.scan(
      step, (params, tx.init(params)), (jnp.arange(calls), batches)
    )
    return evaluate(state, params), curve

  compiled = run.lower(params, batches).compile()
  start = time.perf_counter()
  final, curve = jax.block_until_ready(compiled(params, batches))
  seconds = time.perf_counter() - start
  curve = np.asarray(curve)
  return Run(
    task=task.name,
    arm=arm.name,
    family=arm.family,
    rate=rate,
    seed=seed,
    eval_loss=float(final["eval loss"]),
    metric=float(final[task.metric]),
    seconds_per_update=seconds / updates,
    curve=curve[~np.isnan(curve)],
  )


def best_rates(runs: list[Run]) -> dict[tuple[str, str], list[Run]]:
  """For each (task, arm), the seeds' runs at the rate with the best mean eval loss."""
  grouped: dict[tuple[str, str, float], list[Run]] = {}
  for r in runs:
    grouped.setdefault((r.task, r.arm, r.rate), []).append(r)
  best: dict[tuple[str, str], list[Run]] = {}
  for (task, arm, _), group in grouped.items():
    mean = statistics.fmean(_finite(r.eval_loss) for r in group)
    if (task, arm) not in best or mean < statistics.fmean(
      _finite(r.eval_loss) for r in best[(task, arm)]
    ):
      best[(task, arm)] = group
  return best


def _finite(x: float) -> float:
  return x if np.isfinite(x) else float("inf")


def _spread(values: list[float]) -> str:
  mean = statistics.fmean(values)
  if len(values) < 2:
    return f"{mean:.4f}"
  return f"{mean:.4f} ± {statistics.stdev(values):.4f}"


def markdown_table(runs: list[Run], metrics: dict[str, str]) -> str:
  """A table per task: each arm at its best rate, with the gap to the best baseline."""
  best = best_rates(runs)
  lines = []
  for task in dict.fromkeys(r.task for r in runs):
    rows = {arm: group for (t, arm), group in best.items() if t == task}
    baseline = min(
      statistics.fmean(r.eval_loss for r in g)
      for g in rows.values()
      if g[0].family == "baseline"
    )
    rates = sorted({r.rate for r in runs if r.task == task})
    lines += [
      f"**{task}** ({len(next(iter(rows.values())))} seeds, rates swept per arm among "
      f"{', '.join(f'{x:g}' for x in rates)})",
      "",
      f"| arm | family | best rate | eval loss | vs best baseline | {metrics[task]} "
      "| ms/update |",
      "|---|---|---:|---:|---:|---:|---:|",
    ]
    for arm, group in rows.items():
      losses = [r.eval_loss for r in group]
      lines.append(
        f"| {arm} | {group[0].family} | {group[0].rate:g} | {_spread(losses)} | "
        f"{statistics.fmean(losses) - baseline:+.4f} | {_spread([r.metric for r in group])} | "
        f"{1e3 * statistics.median(r.seconds_per_update for r in group):.2f} |"
      )
    lines.append("")
  return "\n".join(lines)


def plot(runs: list[Run], path: str) -> None:
  """The eval-loss curves of each arm at its best rate (mean over seeds), a panel per task."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  best = best_rates(runs)
  tasks = list(dict.fromkeys(r.task for r in runs))
  fig, axes = plt.subplots(1, len(tasks), figsize=(7 * len(tasks), 5), squeeze=False)
  colors = plt.get_cmap("tab20").colors  # one colour per arm (the default cycle has 10)
  for ax, task in zip(axes[0], tasks, strict=True):
    for i, ((t, arm), group) in enumerate(best.items()):
      if t != task:
        continue
      curve = np.mean([r.curve for r in group], axis=0)
      x = np.linspace(0, 1, len(curve) + 1)[1:]
      baseline = group[0].family == "baseline"
      style = {"color": "k", "lw": 2, "ls": "-" if arm == "adam" else "--"} if baseline else {}
      style = style or {"color": colors[i % len(colors)], "lw": 1.2}
      ax.plot(x, curve, label=f"{arm} (lr {group[0].rate:g})", **style)
    ax.set(title=task, xlabel="fraction of training", ylabel="eval loss", yscale="log")
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> list[Run]:
  parser = argparse.ArgumentParser(prog="python -m benchmarks --quality", description=__doc__)
  parser.add_argument("--smoke", action="store_true", help="a few dozen updates, 1 seed")
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument(
    "--only", default="", help="the arms whose name contains this (and the baselines)"
  )
  parser.add_argument("--plot", default="", help="write the eval-loss curves to this file")
  args = parser.parse_args(argv)
  if args.smoke:
    settings = {
      "digits MLP": (tasks_lib.digits(), 30, 32),
      "char-level Transformer": (tasks_lib.char_lm(layers=1, width=32, length=16), 30, 8),
    }
    seeds = 1
  else:
    settings = {
      "digits MLP": (tasks_lib.digits(), 400, 32),
      "char-level Transformer": (tasks_lib.char_lm(width=64, length=64), 300, 16),
    }
    seeds = args.seeds
  if not any(args.only in a.name for a in arms_lib.ARMS):
    parser.error(f"no arm matches --only {args.only!r}")
  chosen = [a for a in arms_lib.ARMS if args.only in a.name or a.family == "baseline"]
  runs = []
  for task, updates, batch in settings.values():
    for arm in chosen:
      for rate in arm.rates[1:2] if args.smoke else arm.rates:
        for seed in range(seeds):
          print(
            f"{task.name}: {arm.name}, lr {rate:g}, seed {seed}", file=sys.stderr, flush=True
          )
          runs.append(train(task, arm, rate, seed, updates=updates, batch=batch))
  metrics = {task.name: task.metric for task, _, _ in settings.values()}
  print(f"{datetime.date.today()}, JAX {jax.__version__} ({jax.default_backend()})")
  print(markdown_table(runs, metrics))
  if args.plot:
    plot(runs, args.plot)
  return runs
