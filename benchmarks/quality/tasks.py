"""The two tasks of the quality benchmark: the demo's digits MLP and a char-level Transformer.

Both install with the package: the digits ship with scikit-learn, and the text is the Python
source of optax itself (about 1.4 MB), split by file into training and held-out text.
"""

import dataclasses
import importlib.util
import pathlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax


@dataclasses.dataclass(frozen=True)
class Task:
  """A task: params, a loss, batches and an evaluation, all pure.

  Attributes:
    name: how the table names it.
    init: ``seed -> params`` (a plain pytree).
    loss: ``(params, batch) -> scalar``, the training loss.
    batches: ``(seed, steps, batch_size) -> batch`` with a leading axis of ``steps``.
    evaluate: ``params -> {"eval loss": ..., metric: ...}`` on held-out data.
    metric: the name of the second figure of ``evaluate`` (higher is better).
  """

  name: str
  init: Callable[[int], Any]
  loss: Callable[[Any, Any], jax.Array]
  batches: Callable[[int, int, int], Any]
  evaluate: Callable[[Any], dict[str, jax.Array]]
  metric: str


def digits() -> Task:
  """The demo's task: a 64-128-10 MLP on scikit-learn's digits, 80/20 split."""
  from sklearn.datasets import load_digits
  from sklearn.model_selection import train_test_split

  x, y = load_digits(return_X_y=True)
  x = (x / 16.0).astype(np.float32)
  x_train, x_test, y_train, y_test = train_test_split(
    x, y.astype(np.int32), test_size=0.2, random_state=0
  )

  def init(seed):
    keys = jax.random.split(jax.random.key(seed), 2)
    params = {}
    for name, key, (m, n) in zip(("hidden", "out"), keys, ((64, 128), (128, 10)), strict=True):
      params[name] = {
        "kernel": jax.random.normal(key, (m, n)) * jnp.sqrt(1.0 / m),
        "bias": jnp.zeros(n),
      }
    return params

  def logits(params, x):
    h = jax.nn.relu(x @ params["hidden"]["kernel"] + params["hidden"]["bias"])
    return h @ params["out"]["kernel"] + params["out"]["bias"]

  def loss(params, batch):
    x, y = batch
    return optax.softmax_cross_entropy_with_integer_labels(logits(params, x), y).mean()

  def batches(seed, steps, batch_size):
    idx = np.random.default_rng(seed).integers(0, len(x_train), size=(steps, batch_size))
    return jnp.asarray(x_train[idx]), jnp.asarray(y_train[idx])

  def evaluate(params):
    out = logits(params, x_test)
    return {
      "eval loss": optax.softmax_cross_entropy_with_integer_labels(out, y_test).mean(),
      "accuracy": jnp.mean(jnp.argmax(out, -1) == y_test),
    }

  return Task("digits MLP", init, loss, batches, evaluate, "accuracy")


def _optax_text() -> tuple[np.ndarray, np.ndarray]:
  """The optax sources as bytes (ASCII, other bytes dropped): every 10th file held out."""
  spec = importlib.util.find_spec("optax")
  assert spec is not None and spec.submodule_search_locations
  root = pathlib.Path(next(iter(spec.submodule_search_locations)))
  files = sorted(root.rglob("*.py"))
  train, held_out = [], []
  for i, path in enumerate(files):
    (held_out if i % 10 == 0 else train).append(path.read_bytes())
  as_array = lambda parts: np.frombuffer(b"\n".join(parts), np.uint8)
  train_text, eval_text = as_array(train), as_array(held_out)
  return train_text[train_text < 128], eval_text[eval_text < 128]


def char_lm(
  *, layers: int = 2, width: int = 128, heads: int = 4, length: int = 64, eval_windows: int = 64
) -> Task:
  """A char-level Flax NNX Transformer (pre-norm, learned positions) on optax's source."""
  from flax import nnx

  train_text, eval_text = _optax_text()
  vocab = 128

  class Block(nnx.Module):
    def __init__(self, rngs):
      self.norm1 = nnx.LayerNorm(width, rngs=rngs)
      self.attention = nnx.MultiHeadAttention(
        heads, width, decode=False, deterministic=True, rngs=rngs
      )
      self.norm2 = nnx.LayerNorm(width, rngs=rngs)
      self.up = nnx.Linear(width, 4 * width, rngs=rngs)
      self.down = nnx.Linear(4 * width, width, rngs=rngs)

    def __call__(self, x, mask):
      x = x + self.attention(self.norm1(x), mask=mask)
      return x + self.down(jax.nn.gelu(self.up(self.norm2(x))))

  class Transformer(nnx.Module):
    def __init__(self, rngs):
      self.embed = nnx.Embed(vocab, width, rngs=rngs)
      self.position = nnx.Param(0.02 * jax.random.normal(rngs.params(), (length, width)))
      self.blocks = nnx.List([Block(rngs) for _ in range(layers)])
      self.norm = nnx.LayerNorm(width, rngs=rngs)
      self.head = nnx.Linear(width, vocab, rngs=rngs)

    def __call__(self, tokens):
      x = self.embed(tokens) + self.position[: tokens.shape[-1]]
      mask = nnx.make_causal_mask(tokens)
      for block in self.blocks:
        x = block(x, mask)
      return self.head(self.norm(x))

  graphdef, _ = nnx.split(Transformer(nnx.Rngs(0)), nnx.Param)

  def init(seed):
    return nnx.as_pure(nnx.split(Transformer(nnx.Rngs(seed)), nnx.Param)[1])

  def mean_loss(params, windows):
    model = nnx.merge(graphdef, params)
    logits = model(windows[..., :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, windows[..., 1:]).mean()

  def windows_at(text, starts):
    return jnp.asarray(text[starts[..., None] + np.arange(length + 1)].astype(np.int32))

  def batches(seed, steps, batch_size):
    rng = np.random.default_rng(seed)
    return windows_at(
      train_text, rng.integers(0, len(train_text) - length - 1, (steps, batch_size))
    )

  eval_batch = windows_at(
    eval_text, np.linspace(0, len(eval_text) - length - 2, eval_windows).astype(np.int64)
  )

  def evaluate(params):
    loss = mean_loss(params, eval_batch)
    return {"eval loss": loss, "bits per char": loss / jnp.log(2.0)}

  return Task("char-level Transformer", init, mean_loss, batches, evaluate, "bits per char")
