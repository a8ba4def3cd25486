"""The main job: train a small Flax NNX MLP on scikit-learn's digits with each optimizer.

Run it with ``make demo`` or ``python -m optaxderived.demo [--steps N] [--seed S]
[--optimizers a,b,...] [--out DIR]`` (``--help`` lists the flags). It needs the ``demo``
extra (flax, scikit-learn, matplotlib, tqdm); the digits dataset ships with scikit-learn, so
nothing is downloaded.

Every row sees the same training examples (``--steps`` batches of 128, in micro-batches for
``accumulate``). It prints a table (its columns are explained by :data:`LEGEND`, printed under
it) and writes ``loss_curves.png``: one panel per family of techniques, each row of the family
against the optax baseline it derives from, the train loss over real updates.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optaxderived as od

BATCH = 128
FINAL_BATCHES = 20  # the final train loss is the mean over the last 20 batches of 128

# The panels of the plot, in order: family key -> panel title.
FAMILIES: dict[str, str] = {
  "accumulation": "Accumulation (soft batch)",
  "lookahead": "Lookahead and parameter EMA",
  "lazy": "Lazy updates",
  "clipping": "Clipping",
  "paths": "Per-path rules",
  "derive": "The derived family: od.derive",
  "eg": "Exponentiated gradient",
  "ode": "ODE steppers: od.ode",
}


@dataclasses.dataclass(frozen=True)
class Row:
  """One optimizer of the demo.

  Attributes:
    make: ``() -> optax.GradientTransformation``.
    note: what the row shows, for the table.
    family: a key of :data:`FAMILIES` (the panel of the plot), or ``None`` for an optax
      baseline.
    baseline: the name of the optax baseline row it is plotted against (``None`` for a
      baseline).
    batch_size: examples per update call (the row makes ``steps * 128 / batch_size`` calls).
    eval_params: ``(opt_state, params) -> params`` to evaluate with (default: params).
    grad_fn: pass ``grad_fn=`` (the gradient of the same loss on the same batch) to
      ``update``, as the ODE steppers of ``od.ode.as_transformation`` need.
  """

  make: Callable[[], optax.GradientTransformation]
  note: str
  family: str | None = None
  baseline: str | None = None
  batch_size: int = BATCH
  eval_params: Callable[[Any, Any], Any] | None = None
  grad_fn: bool = False


ROWS: dict[str, Row] = {
  # The optax baselines.
  "adam": Row(lambda: optax.adam(3e-3), "optax baseline: adam(3e-3)"),
  "adamw": Row(
    lambda: optax.adamw(3e-3, weight_decay=1e-2), "optax baseline: adamw(3e-3, wd=1e-2)"
  ),
  "sgd": Row(
    lambda: optax.sgd(1.0), "optax baseline: sgd(1.0), Euler's method h=1 on the gradient flow"
  ),
  # Accumulation.
  "accumulate": Row(
    lambda: od.accumulate(optax.adam(3e-3), 8),
    "adam on 8 micro-batches of 16 = one update per batch of 128",
    "accumulation",
    "adam",
    batch_size=16,
  ),
  # Lookahead and parameter EMA.
  "lookahead": Row(
    lambda: od.lookahead(optax.adam(3e-3), 5, 0.5),
    "adam + lookahead (k=5, alpha=0.5); evaluated with the slow weights",
    "lookahead",
    "adam",
    eval_params=lambda state, params: od.lookahead_params(state),
  ),
  "param_ema": Row(
    lambda: optax.chain(optax.adam(3e-3), od.param_ema(0.99)),
    "adam + param_ema(0.99); evaluated with the debiased average",
    "lookahead",
    "adam",
    eval_params=lambda state, params: od.ema_params(state, params),
  ),
  # Lazy updates.
  "lazy_adam": Row(
    lambda: od.lazy(optax.adam(3e-3), include="hidden/kernel", freeze_state=True),
    "lazy adam on the first layer: a kernel row moves only when its pixel is lit in the "
    "batch (on dense digits it tracks adam)",
    "lazy",
    "adam",
  ),
  # Clipping.
  "adam+clip": Row(
    lambda: optax.chain(od.clip_norm(0.25), optax.adam(3e-3)),
    "adam after hard global clipping min(1, γ/‖g‖), γ=0.25 (= clip_by_global_norm)",
    "clipping",
    "adam",
  ),
  "adam+softclip": Row(
    lambda: optax.chain(od.clip_norm(0.25, soft=True), optax.adam(3e-3)),
    "adam after soft global clipping γ/(‖g‖+γ), γ=0.25",
    "clipping",
    "adam",
  ),
  # Per-path rules.
  "adam+path_lr": Row(
    lambda: optax.chain(optax.adam(3e-3), od.scale_by_path({"out": 3.0})),
    "adam with the output layer's rate x3 (scale_by_path)",
    "paths",
    "adam",
  ),
  "adam+sgd_by_path": Row(
    lambda: od.transform_by_path(
      {"out": optax.sgd(0.1, momentum=0.9)}, default=optax.adam(3e-3)
    ),
    "adam on the hidden layer, sgd(0.1, momentum=0.9) on the output layer (transform_by_path)",
    "paths",
    "adam",
  ),
  # The derived family, composed by od.derive.
  "derive": Row(
    lambda: od.derive(
      3e-2,
      weight_decay=1e-2,
      exclude_from_weight_decay="bias",
      layer_adaptation=True,
      exclude_from_layer_adaptation="bias",
      lr_schedule={0: 0.1, 30: 1.0, 300: 0.1},
      lookahead=(5, 0.5),
      ema=0.9,
      clip=1.0,
    ),
    "clip + adam + wd + layer adaptation + lr 0.1x->1x over 30 updates, ->0.1x at 300 "
    "+ lookahead + EMA; evaluated with the EMA",
    "derive",
    "adamw",
    eval_params=lambda opt_state, params: od.ema_params(opt_state, params),
  ),
  # Exponentiated gradient.
  "adam+eg_gains": Row(
    lambda: od.eg_step_size(optax.adam(3e-3), 0.05),
    "adam with EG step-size adaptation: a gain per leaf, γ=0.05 (cosine, clipped)",
    "eg",
    "adam",
  ),
  "eg_plus_minus": Row(
    lambda: od.eg_plus_minus(3.0),
    "EG± (θ = u - v, multiplicative updates of u and v), η=3",
    "eg",
    "sgd",
  ),
  # ODE steppers.
  "heun": Row(
    lambda: od.ode.as_transformation(od.ode.heun(1.0)),
    "Heun's method on the gradient flow, h=1 (2 gradients per call)",
    "ode",
    "sgd",
    grad_fn=True,
  ),
  "rk23": Row(
    lambda: od.ode.as_transformation(od.ode.rk23(0.5, rtol=1e-2, atol=1e-3, max_step_size=2.0)),
    "adaptive RK23, h≤2 (4 gradients per call; a rejected call leaves the params)",
    "ode",
    "sgd",
    grad_fn=True,
  ),
}

COLUMNS = (
  "optimizer",
  "baseline",
  "final train loss",
  "test accuracy",
  "update calls",
  "real updates",
  "update calls/s",
  "note",
)

# What the columns measure, printed under the table.
LEGEND: dict[str, str] = {
  "baseline": "the optax row drawn dark, dashed or dotted, in the same panel of "
  "loss_curves.png",
  "final train loss": f"mean over the last {FINAL_BATCHES} batches of {BATCH} training "
  "examples",
  "test accuracy": "on the held-out 20% of the digits (360 images), with the params the note "
  "names (default: the trained ones)",
  "update calls": f"calls of the optimizer's update: --steps batches of {BATCH} examples, in "
  "micro-batches of 16 for accumulate (8 calls a batch)",
  "real updates": "update calls that changed the params: fewer than the calls for accumulate "
  "(8 micro-batches make one update) and rk23 (a rejected step leaves the params)",
  "update calls/s": "update calls per second after compilation, for the whole training step "
  "(gradient, update, Flax NNX overhead)",
}


def load_digits(seed: int):
  """Digits (8x8 images, 10 classes) scaled to [0, 1], split 80/20 by ``seed``."""
  from sklearn.datasets import load_digits as sk_load_digits
  from sklearn.model_selection import train_test_split

  x, y = sk_load_digits(return_X_y=True)
  x = (x / 16.0).astype(np.float32)
  return train_test_split(x, y.astype(np.int32), test_size=0.2, random_state=seed)


def make_model(seed: int):
  from flax import nnx

  class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
      self.hidden = nnx.Linear(64, 128, rngs=rngs)
      self.out = nnx.Linear(128, 10, rngs=rngs)

    def __call__(self, x):
      return self.out(jax.nn.relu(self.hidden(x)))

  return MLP(nnx.Rngs(seed))


def train(name: str, row: Row, data, *, steps: int, seed: int, progress=None) -> dict:
  """Trains one row; returns its losses, accuracy, speed and real updates."""
  from flax import nnx

  x_train, x_test, y_train, y_test = data
  model = make_model(seed)
  optimizer = nnx.Optimizer(model, row.make(), wrt=nnx.Param)

  def loss_fn(model, x, y):
    logits = model(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @nnx.jit
  def train_step(model, optimizer, x, y):
    before = nnx.as_pure(nnx.state(model, nnx.Param))
    loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
    extra = {}
    if row.grad_fn:  # the gradient at other points, on the same batch
      graphdef, _, rest = nnx.split(model, nnx.Param, ...)
      extra["grad_fn"] = jax.grad(lambda p: loss_fn(nnx.merge(graphdef, p, rest), x, y))
    optimizer.update(model, grads, **extra)
    after = nnx.as_pure(nnx.state(model, nnx.Param))
    changed = jax.tree.reduce(
      jnp.logical_or, jax.tree.map(lambda a, b: jnp.any(a != b), before, after)
    )
    return loss, changed

  calls = steps * BATCH // row.batch_size
  rng = np.random.default_rng(seed)
  order = np.concatenate(
    [rng.permutation(len(x_train)) for _ in range(calls * row.batch_size // len(x_train) + 1)]
  )
  losses, changes, start = [], [], 0.0
  for i in range(calls):
    idx = order[i * row.batch_size : (i + 1) * row.batch_size]
    loss, changed = train_step(model, optimizer, x_train[idx], y_train[idx])
    losses.append(float(loss))
    changes.append(bool(changed))
    if i == 0:
      start = time.perf_counter()  # after the first call, which compiles
    if progress is not None:
      progress.update(1)
  seconds = time.perf_counter() - start

  params = nnx.state(model, nnx.Param)
  if row.eval_params is not None:
    params = row.eval_params(nnx.as_pure(optimizer.opt_state), params)
    nnx.update(model, params)
  accuracy = float(jnp.mean(jnp.argmax(model(x_test), -1) == y_test))
  loss_per_call = np.asarray(losses)
  changed_per_call = np.asarray(changes)
  # The loss of a call is taken at the params before its update: group the calls by the
  # number of real updates made before them, so accumulate's 8 micro-batches (or rk23's
  # rejected call and its retry) give one point.
  updates_before = np.cumsum(changed_per_call) - changed_per_call
  counts = np.bincount(updates_before)
  final_calls = FINAL_BATCHES * BATCH // row.batch_size
  return {
    "name": name,
    "note": row.note,
    "family": row.family,
    "baseline": row.baseline,
    "losses": loss_per_call,
    "changed": changed_per_call,
    "update_losses": np.bincount(updates_before, weights=loss_per_call) / counts,
    "final_loss": float(np.mean(loss_per_call[-final_calls:])),
    "accuracy": accuracy,
    "calls": calls,
    "calls_per_s": (calls - 1) / seconds if calls > 1 else float("nan"),
    "real_updates": int(changed_per_call.sum()),
  }


def table(results: list[dict]) -> str:
  """The table of results, then its legend."""
  widths = [max(len(COLUMNS[0]), *(len(r["name"]) for r in results)), 8, 16, 13, 12, 12, 14]
  header = " ".join(
    f"{c:<{w}}" if i < 2 else f"{c:>{w}}"
    for i, (c, w) in enumerate(zip(COLUMNS[:-1], widths, strict=True))
  )
  header += "  " + COLUMNS[-1]
  lines = [header, "-" * len(header)]
  for r in results:
    cells = (
      f"{r['name']:<{widths[0]}}",
      f"{r['baseline'] or '-':<{widths[1]}}",
      f"{r['final_loss']:>{widths[2]}.4f}",
      f"{r['accuracy']:>{widths[3]}.3f}",
      f"{r['calls']:>{widths[4]}d}",
      f"{r['real_updates']:>{widths[5]}d}",
      f"{r['calls_per_s']:>{widths[6]}.0f}",
    )
    lines.append(" ".join(cells) + "  " + r["note"])
  width = max(map(len, LEGEND))
  legend = [f"{column:<{width}}  {text}" for column, text in LEGEND.items()]
  return "\n".join([*lines, "", *legend])


# The baselines' styles: dashed/dash-dotted dark lines, the family's rows solid and coloured.
BASELINE_STYLES = {"adam": ("--", "black"), "adamw": ("-.", "black"), "sgd": (":", "dimgray")}


def _curve(result: dict, window: int):
  """The train loss per real update, as a moving average over ``window`` updates."""
  y = result["update_losses"]
  window = max(1, min(window, len(y)))
  smooth = np.convolve(y, np.ones(window) / window, mode="valid")
  return np.arange(window - 1, len(y)) + 1, smooth


def panels(results: list[dict]) -> list[tuple[str, list[dict], list[dict]]]:
  """The panels of the plot: ``(title, baselines, rows)`` for each family that was run
  (its baselines when they were run too); only baselines make one panel of them."""
  by_name = {r["name"]: r for r in results}
  out = []
  for family, title in FAMILIES.items():
    rows = [r for r in results if r["family"] == family]
    if rows:
      names = dict.fromkeys(r["baseline"] for r in rows if r["baseline"] in by_name)
      out.append((title, [by_name[n] for n in names], rows))
  if not out:
    out.append(("optax baselines", [r for r in results if r["family"] is None], []))
  return out


def plot(results: list[dict], path: str, *, window: int = 10):
  """Writes one panel per family to ``path`` (PNG); returns the matplotlib ``Figure``."""
  from matplotlib.figure import Figure
  from matplotlib.ticker import MaxNLocator

  layout = panels(results)
  ncols = min(4, len(layout))
  nrows = -(-len(layout) // ncols)
  fig = Figure(figsize=(4.2 * ncols, 3.4 * nrows + 0.6), layout="constrained")
  axes = fig.subplots(nrows, ncols, sharex=True, sharey=True, squeeze=False).ravel()
  for ax, (title, baselines, rows) in zip(
    axes, layout, strict=False
  ):  # spare axes hidden below
    for b in baselines:  # on top, so a row that coincides with it shows in the gaps
      style, color = BASELINE_STYLES.get(b["name"], ("--", "black"))
      ax.plot(
        *_curve(b, window), style, color=color, lw=1.6, zorder=3, label=f"{b['name']} (optax)"
      )
    for i, r in enumerate(rows):
      ax.plot(*_curve(r, window), "-", color=f"C{i}", lw=1.8, label=r["name"])
    ax.set_title(title, fontsize=10)
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
  for ax in axes[len(layout) :]:
    ax.set_visible(False)
  for ax in axes[len(layout) - ncols : len(layout)]:  # the lowest panel of each column
    ax.set_xlabel("real updates")
    ax.xaxis.set_tick_params(labelbottom=True)
  for ax in axes[::ncols]:
    ax.set_ylabel("train loss")
  fig.suptitle(
    "Flax NNX MLP on digits: train loss of the trained params per real update (moving "
    f"average of {window}); optax baselines dark and dashed/dotted",
    fontsize=11,
  )
  fig.savefig(path, dpi=110)
  return fig


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
    prog="python -m optaxderived.demo",
    description="Train a Flax NNX MLP on scikit-learn's digits with each optimizer of "
    "optaxderived and its optax baselines; print a table and write OUT/loss_curves.png, "
    "one panel per family.",
  )
  parser.add_argument(
    "--steps", type=int, default=300, help="batches of 128 examples per optimizer (300)"
  )
  parser.add_argument("--seed", type=int, default=0, help="seed of the model and the data (0)")
  parser.add_argument(
    "--optimizers",
    default=",".join(ROWS),
    help=f"comma-separated rows to run (default: all): {', '.join(ROWS)}",
  )
  parser.add_argument(
    "--out", default="demo-output", help="folder for loss_curves.png (demo-output)"
  )
  args = parser.parse_args(argv)
  if args.steps < 1:
    parser.error(f"--steps must be >= 1, got {args.steps}")
  args.optimizers = [name.strip() for name in args.optimizers.split(",") if name.strip()]
  unknown = [name for name in args.optimizers if name not in ROWS]
  if unknown or not args.optimizers:
    parser.error(
      f"unknown optimizer(s) {unknown or args.optimizers}; choose from {', '.join(ROWS)}"
    )
  return args


def main(argv: list[str] | None = None) -> list[dict]:
  args = parse_args(argv)
  try:
    from tqdm.auto import tqdm
  except ImportError:  # the demo extra brings tqdm; without it, no progress bar
    tqdm = None
  data = load_digits(args.seed)
  total = sum(args.steps * BATCH // ROWS[name].batch_size for name in args.optimizers)
  progress = tqdm(total=total, unit="call", desc="training") if tqdm else None
  results = []
  for name in args.optimizers:
    if progress is not None:
      progress.set_postfix_str(name)
    results.append(
      train(name, ROWS[name], data, steps=args.steps, seed=args.seed, progress=progress)
    )
  if progress is not None:
    progress.close()
  print(table(results))
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, "loss_curves.png")
  plot(results, path)
  print(f"plot written to {path}", file=sys.stderr)
  return results


if __name__ == "__main__":
  main()
