"""optax.microbatching (micro-batches in one step) against od.accumulate (across calls).

``optax.microbatching.micro_grad`` computes the batch gradient in one jitted step, looping over
micro-batches of per-example gradients; ``od.accumulate`` averages micro-batch gradients given
on successive calls. Both must give the full-batch gradient, and so the same params after the
update, with our transformations after them; the references are ``jax.grad`` of the whole
(concatenated) batch's loss.

``micro_grad`` splits the batch column-major: with ``n`` micro-batches of ``m`` examples,
micro-batch ``j`` holds examples ``j, j + n, j + 2n, ...`` (``reshape_batch_axis``), so the
accumulation tests feed ``od.accumulate`` exactly those micro-batches.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import assert_trees_close

import optaxderived as od

MB = optax.microbatching
BATCH, FEATURES, OUTPUTS, TOKENS = 12, 4, 2, 5


def _params(seed=0):
  rng = np.random.default_rng(seed)
  shapes = {"w1": (FEATURES, 8), "b1": (8,), "w2": (8, OUTPUTS)}
  return {k: jnp.asarray(rng.normal(size=s) * 0.5, jnp.float32) for k, s in shapes.items()}


def _predict(params, x):
  return jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"]


def example_mean_loss(params, x, y):
  """The mean over examples of ½|f(x) − y|² (x: [batch, features])."""
  return 0.5 * jnp.mean(jnp.sum((_predict(params, x) - y) ** 2, axis=-1))


def token_sum_loss(params, x, y, mask):
  """The sum over real tokens of ½|f(x_t) − y_t|² (x: [sequences, tokens, features])."""
  return 0.5 * jnp.sum(mask * jnp.sum((_predict(params, x) - y) ** 2, axis=-1))


def token_mean_loss(params, x, y, mask):
  """The mean over real tokens (padding excluded): the loss a token-weighted batch trains."""
  return token_sum_loss(params, x, y, mask) / jnp.sum(mask)


def _examples(steps, seed=1):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(steps, BATCH, FEATURES)), jnp.float32)
  y = jnp.asarray(rng.normal(size=(steps, BATCH, OUTPUTS)), jnp.float32)
  return x, y


def _sequences(steps, seed=2):
  """Padded sequences: lengths 1..TOKENS, so micro-batches hold unequal token counts."""
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(steps, BATCH, TOKENS, FEATURES)), jnp.float32)
  y = jnp.asarray(rng.normal(size=(steps, BATCH, TOKENS, OUTPUTS)), jnp.float32)
  lengths = rng.integers(1, TOKENS + 1, size=(steps, BATCH))
  mask = jnp.asarray(np.arange(TOKENS) < lengths[..., None], jnp.float32)
  return x, y, mask


def _reference_run(tx, params, grad_fn, batches):
  """One ``tx`` step per global batch on the full-batch gradient (``jax.grad``)."""
  state, history = tx.init(params), []
  for batch in batches:
    updates, state = jax.jit(tx.update)(grad_fn(params, *batch), state, params)
    params = optax.apply_updates(params, updates)
    history.append(params)
  return history


def _accumulated_run(tx, params, micro_grad_fn, batches, micro):
  """``od.accumulate`` across calls: one call per micro-batch of each global batch.

  ``micro_grad_fn(params, *micro_batch) -> (grads, weight)``; the params after each window.
  """
  state, history = tx.init(params), []
  update = jax.jit(tx.update)
  for batch in batches:
    pieces = MB.reshape_batch_axis(batch, micro)  # [n, micro, ...]: micro_grad's split
    n = jax.tree.leaves(pieces)[0].shape[0]
    for j in range(n):
      grads, weight = micro_grad_fn(params, *jax.tree.map(lambda a, j=j: a[j], pieces))
      updates, state = update(grads, state, params, weight=weight)
      params = optax.apply_updates(params, updates)
    assert bool(od.has_updated(state))
    history.append(params)
  return history


def _in_step_run(tx, params, grad_fn, batches):
  """One jitted step per global batch: ``grad_fn`` (a micro_grad) then ``tx``."""

  @jax.jit
  def step(params, state, batch):
    updates, state = tx.update(grad_fn(params, *batch), state, params)
    return optax.apply_updates(params, updates), state

  state, history = tx.init(params), []
  for batch in batches:
    params, state = step(params, state, batch)
    history.append(params)
  return history


def _assert_histories_close(got, want):
  assert len(got) == len(want)
  for g, w in zip(got, want, strict=True):
    assert_trees_close(g, w, rtol=2e-5, atol=2e-6)


def _split(stacked):
  """A tuple of stacked arrays as a list of per-step tuples."""
  return [tuple(a[i] for a in stacked) for i in range(stacked[0].shape[0])]


_TRANSFORMS = {
  # (Adam's first step is nearly -lr·sign(g): SGD shows the gradient's size at once)
  "clip_norm+sgd": lambda: optax.chain(od.clip_norm(0.5), optax.sgd(0.1, momentum=0.9)),
  "clip_norm+adamw": lambda: optax.chain(
    od.clip_norm(0.5), optax.adamw(0.05, weight_decay=0.01)
  ),
  "derive": lambda: od.derive(0.05, clip=0.5, weight_decay=0.01),
}


# Equal micro-batches: the example mean.


@pytest.mark.parametrize("name", sorted(_TRANSFORMS))
def test_micro_grad_in_one_step_equals_accumulate_across_calls(name):
  """MEAN accumulation of per-example gradients is the batch-mean gradient: one step with
  micro_grad, three calls of od.accumulate and jax.grad of the whole batch all agree."""
  micro, params = 4, _params()
  batches = _split(_examples(3))
  micro_grad = MB.micro_grad(
    example_mean_loss,
    batch_argnums=(1, 2),
    microbatch_size=micro,
    accumulator=MB.AccumulationType.MEAN,
  )
  in_step = _in_step_run(
    _TRANSFORMS[name](), params, lambda p, x, y: micro_grad(p, x, y)[0], batches
  )
  across = _accumulated_run(
    od.accumulate(_TRANSFORMS[name](), BATCH // micro),
    params,
    lambda p, x, y: (jax.grad(example_mean_loss)(p, x, y), 1.0),
    batches,
    micro,
  )
  want = _reference_run(_TRANSFORMS[name](), params, jax.grad(example_mean_loss), batches)
  _assert_histories_close(in_step, want)
  _assert_histories_close(across, want)


def test_the_gradient_of_micro_grad_is_the_full_batch_gradient():
  """The sanity check under the others: MEAN is the mean, SUM is BATCH times it."""
  params, (x, y) = _params(), _examples(1)
  full = jax.grad(example_mean_loss)(params, x[0], y[0])
  for accumulator, scale in ((MB.AccumulationType.MEAN, 1), (MB.AccumulationType.SUM, BATCH)):
    grads, aux = MB.micro_grad(
      example_mean_loss, batch_argnums=(1, 2), microbatch_size=3, accumulator=accumulator
    )(params, x[0], y[0])
    assert_trees_close(
      grads, jax.tree.map(lambda g, s=scale: s * g, full), rtol=1e-5, atol=1e-6
    )
  assert aux.values.shape == (BATCH,)  # the per-example losses, in batch order
  np.testing.assert_allclose(jnp.mean(aux.values), example_mean_loss(params, x[0], y[0]), 1e-6)


# Token weights: micro-batches of unequal token counts (a padding mask).


def token_weighted_micro_grad(micro):
  """The token-weighted mean gradient with micro_grad: SUM accumulation of per-sequence
  token-sum losses, divided by the batch's token count."""
  summed = MB.micro_grad(
    token_sum_loss,
    batch_argnums=(1, 2, 3),
    microbatch_size=micro,
    accumulator=MB.AccumulationType.SUM,
  )

  def grad_fn(params, x, y, mask):
    grads, _ = summed(params, x, y, mask)
    return jax.tree.map(lambda g: g / jnp.sum(mask), grads)

  return grad_fn


def test_token_weighted_micro_grad_equals_accumulate_with_token_weights():
  micro, params = 3, _params(3)
  batches = _split(_sequences(3))
  tokens = [float(jnp.sum(m)) for _, _, m in batches]
  assert len(set(tokens)) > 1
  want = _reference_run(optax.adam(0.05), params, jax.grad(token_mean_loss), batches)
  in_step = _in_step_run(optax.adam(0.05), params, token_weighted_micro_grad(micro), batches)
  # Across calls: each call's token-mean gradient, weighted by its token count.
  token_mean_and_count = lambda p, x, y, m: (jax.grad(token_mean_loss)(p, x, y, m), jnp.sum(m))
  across = _accumulated_run(
    od.accumulate(optax.adam(0.05), BATCH // micro),
    params,
    token_mean_and_count,
    batches,
    micro,
  )
  _assert_histories_close(in_step, want)
  _assert_histories_close(across, want)
  # The weights matter: micro-batch means averaged with equal weights are another gradient.
  unweighted = _accumulated_run(
    od.accumulate(optax.adam(0.05), BATCH // micro),
    params,
    lambda p, x, y, m: (jax.grad(token_mean_loss)(p, x, y, m), 1.0),
    batches,
    micro,
  )
  for leaf in want[-1]:
    assert not np.allclose(unweighted[-1][leaf], want[-1][leaf], rtol=1e-3, atol=1e-5), leaf


def test_token_sums_with_reduction_sum_equal_the_token_mean_of_the_batch():
  """reduction="sum" with token-sum gradients (weight 1) gives the window's token-sum
  gradient, as micro_grad's SUM does; scaling by 1/tokens inside gives the token mean."""
  micro, params = 4, _params(4)
  (x, y, mask) = (a[0] for a in _sequences(1, seed=5))
  total = jnp.sum(mask)
  inner = optax.chain(optax.scale(1 / total), optax.sgd(0.1))
  tx = od.accumulate(inner, BATCH // micro, reduction="sum")
  state, p = tx.init(params), params
  pieces = MB.reshape_batch_axis((x, y, mask), micro)
  for j in range(BATCH // micro):
    grads = jax.grad(token_sum_loss)(params, *(a[j] for a in pieces))
    updates, state = tx.update(grads, state, params)
    p = optax.apply_updates(p, updates)
  full = jax.grad(token_mean_loss)(params, x, y, mask)
  assert_trees_close(p, jax.tree.map(lambda q, g: q - 0.1 * g, params, full), 1e-5, 1e-6)


# Both: micro_grad inside each call, od.accumulate across calls.


@pytest.mark.parametrize("weighted", [False, True], ids=["examples", "tokens"])
def test_micro_grad_inside_each_call_and_accumulate_across_calls_equal_one_big_batch(weighted):
  """A global batch of 3 × 12 examples (or sequences): each call gets 12, micro_grad loops over
  micro-batches of 3 inside it, od.accumulate averages the 3 calls (by token count)."""
  calls, micro, params = 3, 3, _params(6)
  tx = lambda: od.derive(0.05, clip=0.5, weight_decay=0.01)
  if weighted:
    data = _sequences(2 * calls, seed=7)
    call_grad = token_weighted_micro_grad(micro)
    grad_and_weight = lambda p, x, y, m: (call_grad(p, x, y, m), jnp.sum(m))
    big_grad = jax.grad(token_mean_loss)
  else:
    data = _examples(2 * calls, seed=8)
    call_grad = MB.micro_grad(
      example_mean_loss,
      batch_argnums=(1, 2),
      microbatch_size=micro,
      accumulator=MB.AccumulationType.MEAN,
    )
    grad_and_weight = lambda p, x, y: (call_grad(p, x, y)[0], 1.0)
    big_grad = jax.grad(example_mean_loss)
  # The global batches: `calls` consecutive call batches, concatenated.
  per_call = _split(data)
  big_batches = [
    tuple(jnp.concatenate(parts) for parts in zip(*per_call[i : i + calls], strict=True))
    for i in range(0, len(per_call), calls)
  ]
  want = _reference_run(tx(), params, big_grad, big_batches)
  acc, step_grad = od.accumulate(tx(), calls), jax.jit(grad_and_weight)
  update = jax.jit(acc.update)
  state, p, got = acc.init(params), params, []
  for i, batch in enumerate(per_call):
    grads, weight = step_grad(p, *batch)
    updates, state = update(grads, state, p, weight=weight)
    p = optax.apply_updates(p, updates)
    if i % calls == calls - 1:
      got.append(p)
  _assert_histories_close(got, want)


@functools.cache
def _padded_micro_grad(micro):
  return jax.jit(
    MB.micro_grad(
      example_mean_loss,
      batch_argnums=(1, 2),
      microbatch_size=micro,
      accumulator=MB.AccumulationType.RUNNING_MEAN,
      num_real_microbatches=2,
    )
  )


def test_running_mean_over_the_real_micro_batches_of_a_padded_batch():
  """A fixed-shape batch whose last micro-batches are padding: with num_real_microbatches
  only micro-batches 0..r-1 run (examples j + n·i, column-major), and RUNNING_MEAN averages
  over them; od.accumulate with every_k=r over the same micro-batches agrees."""
  micro, params, (x, y) = 3, _params(9), _examples(1, seed=10)
  x, y = x[0], y[0]
  grads, _ = _padded_micro_grad(micro)(params, x, y)
  pieces = MB.reshape_batch_axis((x, y), micro)  # 4 micro-batches, 2 real
  real = tuple(jnp.concatenate([a[0], a[1]]) for a in pieces)
  assert_trees_close(grads, jax.grad(example_mean_loss)(params, *real), rtol=1e-5, atol=1e-6)
  tx = od.accumulate(optax.identity(), 2)
  state = tx.init(params)
  for j in range(2):
    updates, state = tx.update(
      jax.grad(example_mean_loss)(params, pieces[0][j], pieces[1][j]), state
    )
  assert_trees_close(updates, grads, rtol=1e-5, atol=1e-6)
