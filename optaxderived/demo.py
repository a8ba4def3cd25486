"""The main job: train a small Flax NNX MLP on scikit-learn's digits with each optimizer.

Run it with ``make demo`` or ``python -m optaxderived.demo [--steps N] [--seed S]
[--optimizers a,b,...] [--out DIR]``. It needs the ``demo`` extra (flax, scikit-learn,
matplotlib, tqdm); the digits dataset ships with scikit-learn, so nothing is downloaded.

Every row sees the same number of training examples (``--steps`` batches of 128); a row
with smaller micro-batches makes more calls. The table reports the final train loss (mean
of the last 20 calls), the test accuracy (of the evaluation params: the slow weights of
lookahead, the EMA, ...), calls per second after compilation, and the number of real
updates (calls that changed the params).
"""

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


@dataclasses.dataclass(frozen=True)
class Row:
  """One optimizer of the demo.

  Attributes:
    make: ``() -> optax.GradientTransformation``.
    note: what the row shows, for the table.
    batch_size: examples per call (the row makes ``steps * 128 / batch_size`` calls).
    eval_params: ``(opt_state, params) -> params`` to evaluate with (default: params).
    grad_fn: pass ``grad_fn=`` (the gradient of the same loss on the same batch) to
      ``update``, as the ODE steppers of ``od.ode.as_transformation`` need.
  """

  make: Callable[[], optax.GradientTransformation]
  note: str
  batch_size: int = BATCH
  eval_params: Callable[[Any, Any], Any] | None = None
  grad_fn: bool = False


ROWS: dict[str, Row] = {
  "adam": Row(lambda: optax.adam(3e-3), "optax baseline"),
  "sgd": Row(lambda: optax.sgd(0.1, momentum=0.9), "optax baseline"),
  "adamw": Row(lambda: optax.adamw(3e-3, weight_decay=1e-2), "optax baseline for derive"),
  "accumulate": Row(
    lambda: od.accumulate(optax.adam(3e-3), 8),
    "adam on 8 micro-batches of 16 = one batch of 128",
    batch_size=16,
  ),
  "lookahead": Row(
    lambda: od.lookahead(optax.adam(3e-3), 5, 0.5),
    "adam + lookahead (k=5, alpha=0.5); evaluated with the slow weights",
    eval_params=lambda state, params: od.lookahead_params(state),
  ),
  "param_ema": Row(
    lambda: optax.chain(optax.adam(3e-3), od.param_ema(0.99)),
    "adam + param_ema(0.99); evaluated with the debiased average",
    eval_params=lambda state, params: od.ema_params(state, params),
  ),
  "adam+clip": Row(
    lambda: optax.chain(od.clip_norm(0.25), optax.adam(3e-3)),
    "adam after hard global clipping min(1, γ/‖g‖), γ=0.25 (= clip_by_global_norm)",
  ),
  "adam+softclip": Row(
    lambda: optax.chain(od.clip_norm(0.25, soft=True), optax.adam(3e-3)),
    "adam after soft global clipping γ/(‖g‖+γ), γ=0.25",
  ),
  "derive": Row(
    lambda: od.derive(
      3e-2,
      weight_decay=1e-2,
      exclude_from_weight_decay="bias",
      layer_adaptation=True,
      exclude_from_layer_adaptation="bias",
      lr_schedule={30: 1.0, 300: 0.1},
      lookahead=(5, 0.5),
      ema=0.9,
      clip=1.0,
    ),
    "clip + adam + wd + layer adaptation + warmup/decay + lookahead + EMA",
    eval_params=lambda opt_state, params: od.ema_params(opt_state, params),
  ),
  "adam+eg_gains": Row(
    lambda: od.eg_step_size(optax.adam(3e-3), 0.05),
    "adam with EG step-size adaptation: a gain per leaf, γ=0.05 (cosine, clipped)",
  ),
  "heun": Row(
    lambda: od.ode.as_transformation(od.ode.heun(1.0)),
    "Heun's method on the gradient flow, h=1 (2 gradients per call)",
    grad_fn=True,
  ),
  "rk23": Row(
    lambda: od.ode.as_transformation(od.ode.rk23(0.5, rtol=1e-2, atol=1e-3, max_step_size=2.0)),
    "adaptive RK23, h≤2 (4 gradients per call; a rejected call leaves the params)",
    grad_fn=True,
  ),
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
  losses, real_updates, start = [], 0, None
  for i in range(calls):
    idx = order[i * row.batch_size : (i + 1) * row.batch_size]
    loss, changed = train_step(model, optimizer, x_train[idx], y_train[idx])
    losses.append(float(loss))
    real_updates += int(changed)
    if start is None:
      start = time.perf_counter()  # after the first call, which compiles
    if progress is not None:
      progress.update(row.batch_size / BATCH)
  seconds = time.perf_counter() - start

  params = nnx.state(model, nnx.Param)
  if row.eval_params is not None:
    params = row.eval_params(nnx.as_pure(optimizer.opt_state), params)
    nnx.update(model, params)
  accuracy = float(jnp.mean(jnp.argmax(model(x_test), -1) == y_test))
  return {
    "name": name,
    "note": row.note,
    "losses": np.asarray(losses),
    "examples": row.batch_size * np.arange(1, calls + 1),
    "final_loss": float(np.mean(losses[-20:])),
    "accuracy": accuracy,
    "calls_per_s": (calls - 1) / seconds if calls > 1 else float("nan"),
    "real_updates": real_updates,
  }


def table(results: list[dict]) -> str:
  header = (
    f"{'optimizer':<16} {'final loss':>10} {'test acc':>8} {'calls/s':>8} "
    f"{'real upd.':>9}  note"
  )
  lines = [header, "-" * len(header)]
  for r in results:
    lines.append(
      f"{r['name']:<16} {r['final_loss']:>10.4f} {r['accuracy']:>8.3f} "
      f"{r['calls_per_s']:>8.0f} {r['real_updates']:>9d}  {r['note']}"
    )
  return "\n".join(lines)


def plot(results: list[dict], path: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(10, 5))
  colors = plt.cm.tab20(np.linspace(0, 1, 20))
  for i, r in enumerate(results):
    window = max(1, len(r["losses"]) // 50)
    smooth = np.convolve(r["losses"], np.ones(window) / window, mode="valid")
    style = "--" if r["note"].startswith("optax baseline") else "-"
    ax.plot(
      r["examples"][window - 1 :] / 1000, smooth, style, color=colors[i % 20], label=r["name"]
    )
  ax.set(xlabel="training examples seen (thousands)", ylabel="train loss (smoothed)")
  ax.set_yscale("log")
  ax.set_title("optaxderived demo: Flax NNX MLP on digits (dashed: optax baselines)")
  ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
    prog="python -m optaxderived.demo",
    description="Train a Flax NNX MLP on digits with each optimizer; print a table "
    "and write a loss plot.",
  )
  parser.add_argument("--steps", type=int, default=300, help="batches of 128 per optimizer")
  parser.add_argument("--seed", type=int, default=0, help="seed of the model and the data")
  parser.add_argument(
    "--optimizers",
    default=",".join(ROWS),
    help=f"comma-separated rows to run, from: {', '.join(ROWS)}",
  )
  parser.add_argument("--out", default="demo-output", help="folder for the plot")
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
  results = []
  for name in args.optimizers:
    progress = tqdm(total=args.steps, desc=f"{name:<16}", unit="step") if tqdm else None
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
