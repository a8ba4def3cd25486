"""End to end: each technique inside a small Flax NNX Transformer's training step.

A user pays for the optimizer inside a training step. Each row times the whole jitted step
(forward, backward and update in one function, params and optimizer state donated) with an
optaxderived technique against the same step with its optax counterpart, on a causal LM loss
over random tokens (nothing downloaded; the same batch on every call). The row
``e2e_adam_vs_fwd_bwd`` times the ``optax.adam`` step against the forward and backward pass
alone (the gradients written out, no update), which gives the optimizer's share of the step:
``(adam - fwd/bwd) / adam``.

The model at ``scale=1``: 2 layers, d_model 256, 4 heads, MLP 1024, sequence 128, batch 2,
vocabulary 256 (1.74M params in 30 leaves): pre-LayerNorm blocks of ``nnx.MultiHeadAttention``
and a GELU MLP, learned position embeddings, an untied output layer. (4 layers and batch 8
would be 8 times the work per step: the rows would take far more than 5 minutes on 2 cores.)
The attention projections have no biases: the key bias's gradient is zero in exact
arithmetic, and Adam turns its rounding noise into steps of ±lr, so that no two programs
would agree on it after a second step. ``scale`` shrinks the width, depth, sequence and
vocabulary together (the batch stays 2). The params are the plain dict of
``nnx.to_pure_dict``; the loss rebuilds the module with ``nnx.merge`` inside the jitted step,
from a graph definition inferred from the params' shapes, so any size of this model runs
through the same subjects.

Each row first checks its step: where ours and the counterpart are the same mathematics,
their params agree after a few steps (ours against ``optax.adam`` where the technique is
inactive on those steps: the guards before their warmup or window is full, the EMA, the loss
scale); in every row the loss of ours is finite and falls over those steps.
``od.exponentiated_gradient`` has no row: it trains positive (or simplex) params, which an
LM's weights are not.
"""

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import optaxderived as od
from benchmarks.bench_derive import RECIPE
from benchmarks.harness import Case
from benchmarks.harness import Subject

LR = 1e-3
ACCUMULATE = 4
SYNC_PERIOD, SLOW_STEP_SIZE = 5, 0.5
DECAY = 0.999
BATCH = 2


@dataclasses.dataclass(frozen=True)
class LMConfig:
  """The Transformer's sizes (the defaults: ``scale=1``)."""

  vocab: int = 256
  seq_len: int = 128
  d_model: int = 256
  heads: int = 4
  mlp: int = 1024
  layers: int = 2

  @classmethod
  def at(cls, scale: float) -> "LMConfig":
    """The sizes at ``scale``: width, depth, sequence and vocabulary shrink together."""
    full = cls()
    d_model = max(4 * full.heads, round(full.d_model * scale / full.heads) * full.heads)
    return cls(
      vocab=max(16, round(full.vocab * scale)),
      seq_len=max(8, round(full.seq_len * scale)),
      d_model=d_model,
      heads=full.heads,
      mlp=4 * d_model,
      layers=max(1, round(full.layers * scale)),
    )

  @classmethod
  def of(cls, params: dict[str, Any]) -> "LMConfig":
    """The sizes of a params dict made by :func:`lm_params`, read from its shapes."""
    vocab, d_model = params["embed"]["embedding"].shape
    block = params["blocks"][0]
    return cls(
      vocab=vocab,
      seq_len=params["pos"]["embedding"].shape[0],
      d_model=d_model,
      heads=block["attn"]["query"]["kernel"].shape[1],
      mlp=block["up"]["kernel"].shape[1],
      layers=len(params["blocks"]),
    )


class Block(nnx.Module):
  """A pre-LayerNorm Transformer block: causal self-attention, then a GELU MLP."""

  def __init__(self, config: LMConfig, rngs: nnx.Rngs):
    d = config.d_model
    self.ln1 = nnx.LayerNorm(d, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(
      config.heads,
      d,
      use_bias=False,
      decode=False,
      deterministic=True,
      keep_rngs=False,
      rngs=rngs,
    )
    self.ln2 = nnx.LayerNorm(d, rngs=rngs)
    self.up = nnx.Linear(d, config.mlp, rngs=rngs)
    self.down = nnx.Linear(config.mlp, d, rngs=rngs)

  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    x = x + self.attn(self.ln1(x), mask=mask)
    return x + self.down(nnx.gelu(self.up(self.ln2(x))))


class TransformerLM(nnx.Module):
  """Token and position embeddings, ``layers`` blocks, a final LayerNorm and the logits."""

  def __init__(self, config: LMConfig, rngs: nnx.Rngs):
    self.embed = nnx.Embed(config.vocab, config.d_model, rngs=rngs)
    self.pos = nnx.Embed(config.seq_len, config.d_model, rngs=rngs)
    self.blocks = nnx.List([Block(config, rngs) for _ in range(config.layers)])
    self.ln = nnx.LayerNorm(config.d_model, rngs=rngs)
    self.head = nnx.Linear(config.d_model, config.vocab, rngs=rngs)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    x = self.embed(tokens) + self.pos(jnp.arange(tokens.shape[-1]))
    mask = nnx.make_causal_mask(tokens)
    for block in self.blocks:
      x = block(x, mask)
    return self.head(self.ln(x))


@functools.cache
def _graphdef(config: LMConfig):
  return nnx.split(nnx.eval_shape(lambda: TransformerLM(config, nnx.Rngs(0))))[0]


def lm_params(scale: float = 1.0, seed: int = 0) -> dict[str, Any]:
  """The initial params of the model at ``scale``, a plain nested dict."""
  return nnx.to_pure_dict(nnx.state(TransformerLM(LMConfig.at(scale), nnx.Rngs(seed))))


def lm_batch(params: dict[str, Any], key: jax.Array) -> jax.Array:
  """``[BATCH, seq_len + 1]`` random tokens: inputs ``[:, :-1]``, targets ``[:, 1:]``."""
  config = LMConfig.of(params)
  return jax.random.randint(key, (BATCH, config.seq_len + 1), 0, config.vocab)


def lm_loss(params: dict[str, Any], tokens: jax.Array) -> jax.Array:
  """The mean next-token cross-entropy."""
  model = nnx.merge(_graphdef(LMConfig.of(params)), params)
  logits = model(tokens[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


def lm_subject(name: str, tx: optax.GradientTransformation) -> Subject:
  """The training step with ``tx``: gradient of the loss, ``update``, ``apply_updates``."""

  def step(carry, tokens):
    params, state = carry
    grads = jax.grad(lm_loss)(params, tokens)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return Subject(name, lambda params: (params, tx.init(params)), step)


def loss_scaled_subject(name: str, tx: optax.GradientTransformation) -> Subject:
  """The step of a ``od.dynamic_loss_scale`` ``tx``: the loss is multiplied by its scale."""

  def step(carry, tokens):
    params, state = carry
    scale = od.loss_scale(state)
    grads = jax.grad(lambda p: lm_loss(p, tokens) * scale)(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return Subject(name, lambda params: (params, tx.init(params)), step)


def optax_lookahead_subject() -> Subject:
  """``optax.lookahead``: fast and slow weights in the params, the gradient at the fast."""
  tx = optax.lookahead(optax.adam(LR), SYNC_PERIOD, SLOW_STEP_SIZE)

  def init(params):
    # Two distinct buffers: the carry is donated, and one buffer cannot be donated twice.
    lparams = optax.LookaheadParams(fast=params, slow=jax.tree.map(jnp.copy, params))
    return lparams, tx.init(lparams)

  def step(carry, tokens):
    lparams, state = carry
    grads = jax.grad(lm_loss)(lparams.fast, tokens)
    updates, state = tx.update(grads, state, lparams)
    return optax.apply_updates(lparams, updates), state

  return Subject(f"optax.lookahead(adam, {SYNC_PERIOD}, {SLOW_STEP_SIZE})", init, step)


def forward_backward_subject() -> Subject:
  """The step without its update: the gradients are computed and written out."""

  def init(params):
    return params, jax.tree.map(jnp.zeros_like, params)

  def step(carry, tokens):
    params, _ = carry
    return params, jax.grad(lm_loss)(params, tokens)

  return Subject("fwd+bwd only (gradients written, no update)", init, step)


# The steps the checks compare with. One Subject each, so that their jitted steps compile once
# for all the rows that use them; each row times fresh subjects, whose compile it reports.
_loss = jax.jit(lm_loss)
_adam_reference = lm_subject("optax.adam(1e-3)", optax.adam(LR))


def _fast(carry):
  return carry[0]


def _check(
  ours: Subject,
  reference: Subject | None = None,
  *,
  steps: int,
  view=None,
  reference_view=None,
  rtol: float = 1e-4,
  atol: float = 1e-6,
):
  """Runs ``ours`` (and ``reference``) for ``steps`` steps from the same params.

  The views (default: the params) of both must agree at the end, and the loss at ours'
  params must be finite and lower than at the start.
  """
  view = view or _fast
  reference_view = reference_view or view

  def run(subject, params, tokens):
    carry = subject.init(jax.tree.map(jnp.copy, params))
    step = jax.jit(subject.step)
    for _ in range(steps):
      carry = step(carry, tokens)
    return carry

  def check(params, tokens):
    carry = run(ours, params, tokens)
    if reference is not None:
      expected = reference_view(run(reference, params, tokens))
      for x, y in zip(jax.tree.leaves(view(carry)), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)
    fast = carry[0].fast if isinstance(carry[0], optax.LookaheadParams) else carry[0]
    before, after = float(_loss(params, tokens)), float(_loss(fast, tokens))
    assert np.isfinite(after) and after < before, f"{ours.name}: loss {before} -> {after}"

  return check


CLIP_ADAM = "chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3))"


def _clip_adam() -> Subject:
  return lm_subject(CLIP_ADAM, optax.chain(optax.clip_by_global_norm(1.0), optax.adam(LR)))


def _adam() -> Subject:
  return lm_subject("optax.adam(1e-3)", optax.adam(LR))


def _case(name: str, ours: Subject, baseline: Subject, check, cycle: int = 1) -> Case:
  return Case(name, ours, baseline, cycle=cycle, check=check, batch=lm_batch, params=lm_params)


def cases() -> list[Case]:
  accumulate = lm_subject(
    f"od.accumulate(optax.adam(1e-3), {ACCUMULATE})",
    od.accumulate(optax.adam(LR), ACCUMULATE),
  )
  multi_steps = lm_subject(
    f"optax.MultiSteps(optax.adam(1e-3), {ACCUMULATE})",
    optax.MultiSteps(optax.adam(LR), ACCUMULATE),
  )
  lookahead = lm_subject(
    f"od.lookahead(adam, {SYNC_PERIOD}, {SLOW_STEP_SIZE})",
    od.lookahead(optax.adam(LR), SYNC_PERIOD, SLOW_STEP_SIZE),
  )
  optax_lookahead = optax_lookahead_subject()
  clip = lm_subject(
    'chain(od.clip_norm(1.0, scope="global"), optax.adam(1e-3))',
    optax.chain(od.clip_norm(1.0, scope="global"), optax.adam(LR)),
  )
  clip_reference = _clip_adam()
  derive = lm_subject("od.derive(1e-3, ...full recipe)", od.derive(1e-3, **RECIPE))
  spikes = lm_subject("od.skip_spikes(optax.adam(1e-3))", od.skip_spikes(optax.adam(LR)))
  zclip = lm_subject(
    "chain(od.zclip(), optax.adam(1e-3))", optax.chain(od.zclip(), optax.adam(LR))
  )
  loss_scale = loss_scaled_subject(
    "od.dynamic_loss_scale(optax.adam(1e-3))", od.dynamic_loss_scale(optax.adam(LR))
  )
  ema = lm_subject(
    f"chain(optax.adam(1e-3), od.param_ema({DECAY}))",
    optax.chain(optax.adam(LR), od.param_ema(DECAY)),
  )
  adam = _adam()
  # skip_spikes judges once its window (128) is full and zclip's first 25 calls are warmup:
  # in the check's 3 steps neither acts, and the step must be Adam's.
  same_as_adam = lambda s: _check(s, _adam_reference, steps=3)
  return [
    _case(
      f"e2e_accumulate_k{ACCUMULATE}",
      accumulate,
      multi_steps,
      _check(accumulate, multi_steps, steps=2 * ACCUMULATE),
      cycle=ACCUMULATE,
    ),
    _case(
      "e2e_lookahead",
      lookahead,
      optax_lookahead,
      _check(
        lookahead,
        optax_lookahead,
        steps=SYNC_PERIOD + 2,
        view=lambda c: (c[0], od.lookahead_params(c[1])),
        reference_view=lambda c: (c[0].fast, c[0].slow),
      ),
      cycle=SYNC_PERIOD,
    ),
    _case("e2e_clip_norm_global", clip, _clip_adam(), _check(clip, clip_reference, steps=3)),
    _case(
      "e2e_derive(full recipe)",
      derive,
      lm_subject("optax.adamw(1e-3)", optax.adamw(LR)),
      _check(derive, steps=RECIPE["lookahead"][0]),
      cycle=RECIPE["lookahead"][0],
    ),
    _case("e2e_skip_spikes", spikes, _clip_adam(), same_as_adam(spikes)),
    _case("e2e_zclip", zclip, _clip_adam(), same_as_adam(zclip)),
    _case("e2e_dynamic_loss_scale", loss_scale, _adam(), same_as_adam(loss_scale)),
    _case("e2e_param_ema", ema, _adam(), same_as_adam(ema)),
    _case("e2e_adam_vs_fwd_bwd", adam, forward_backward_subject(), _check(adam, steps=3)),
  ]
