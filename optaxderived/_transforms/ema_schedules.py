"""Decay schedules for :func:`param_ema`, of the number of averaging updates already made."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optaxderived._core import checks


def _float(count: jnp.ndarray) -> jnp.ndarray:
  """The count as a float: float32, float64 under x64 (where the EMA's decay is float64)."""
  return jnp.asarray(count, dtype=float)


def ema_warmup(
  max_decay: float = 0.9999, *, gamma: float = 1.0, power: float = 2 / 3, min_decay: float = 0.0
) -> optax.Schedule:
  r"""The EMA warmup of timm's ``ModelEmaV3``: a decay that grows with the updates averaged.

  .. math::

    \mu(n) = \mathrm{clip}\big(1 - (1 + n/\gamma)^{-p},\ \mu_{\min},\ \mu_{\max}\big),
    \qquad \mu(0) = 0,

  where :math:`n` is the number of updates :func:`param_ema` has already averaged (so the
  first update copies the params). Early on the average forgets fast and follows the
  params; with :math:`p = 2/3` the decay reaches 0.999 after about 3e4 updates and 0.9999
  after 1e6. Use it with ``debias=False``: the warmup does the debiasing's job.

  Args:
    max_decay: :math:`\mu_{\max} \in [0, 1)`, the decay the warmup tends to.
    gamma: :math:`\gamma > 0`, the warmup's scale in updates.
    power: :math:`p > 0`; larger values warm up faster.
    min_decay: :math:`\mu_{\min} \in [0, \mu_{\max}]`, the smallest decay after the first
      update.

  Returns:
    An ``optax.Schedule``: ``n -> decay`` (float32, float64 under x64).

  Example:
    >>> import optaxderived as od
    >>> schedule = od.ema_warmup(0.999)
    >>> [round(float(schedule(n)), 4) for n in (0, 1, 10, 1000, 100_000)]
    [0.0, 0.37, 0.7978, 0.99, 0.999]
    >>> tx = od.param_ema(schedule, debias=False)

  References:
    Ross Wightman, timm ``ModelEmaV3.get_decay``,
    https://github.com/huggingface/pytorch-image-models/blob/main/timm/utils/model_ema.py.
  """
  fn = "od.ema_warmup"
  checks.check_range(
    fn, "max_decay", max_decay, low=0.0, high=1.0, high_open=True, schedule=False
  )
  for name, value in (("gamma", gamma), ("power", power)):
    checks.check_range(
      fn, name, value, low=0.0, high=math.inf, low_open=True, high_open=True, schedule=False
    )
  # (a max_decay traced by optax.inject_hyperparams bounds min_decay only at run time)
  high = 1.0 if isinstance(max_decay, jax.core.Tracer) else float(max_decay)
  checks.check_range(fn, "min_decay", min_decay, low=0.0, high=high, schedule=False)

  def schedule(count):
    n = _float(count)
    # 1 - (1 + n/gamma)^-power, without the cancellation of 1 - x for x close to 1
    decay = -jnp.expm1(-power * jnp.log1p(n / gamma))
    return jnp.where(n <= 0, 0.0, jnp.clip(decay, min_decay, max_decay)).astype(n.dtype)

  return schedule


def power_ema_decay(sigma_rel: float) -> optax.Schedule:
  r"""The decay of the power-function EMA of Karras et al. (EDM2), of width ``sigma_rel``.

  .. math::

    \mu(n) = \Big(1 - \frac{1}{n + 1}\Big)^{\gamma + 1},

  where :math:`n` is the number of updates :func:`param_ema` has already averaged. Started
  from any :math:`m_0` (:math:`\mu(0) = 0` discards it), after :math:`N` updates the average
  is exactly

  .. math::

    m_N = \sum_{i=1}^{N} \frac{i^{\gamma+1} - (i-1)^{\gamma+1}}{N^{\gamma+1}}\, \theta_i,

  weights that grow about as :math:`(\gamma+1)\, i^\gamma / N^{\gamma+1}`: a fixed fraction
  of the run is averaged, whatever its length (a plain EMA averages a fixed number of
  updates).
  :math:`\gamma` is the largest real root of
  :math:`\gamma^3 + 7\gamma^2 + (16 - \sigma^{-2})\gamma + (12 - \sigma^{-2}) = 0`, for which
  the profile's standard deviation relative to its length is :math:`\sigma` = ``sigma_rel``
  (:math:`\sigma_{\rm rel} = 0.05` gives :math:`\gamma \approx 16.97`, 0.10 gives 6.94). Use
  it with ``debias=False`` (as :math:`\mu(0) = 0`, debiasing changes nothing).

  Args:
    sigma_rel: :math:`\sigma_{\rm rel} \in (0, 0.25]`, the width of the average as a fraction
      of the run.

  Returns:
    An ``optax.Schedule``: ``n -> decay`` (float32, float64 under x64).

  Example:
    >>> import optaxderived as od
    >>> schedule = od.power_ema_decay(0.1)  # gamma = 6.94
    >>> [round(float(schedule(n)), 4) for n in (0, 1, 10, 1000)]
    [0.0, 0.0041, 0.4693, 0.9921]
    >>> tx = od.param_ema(schedule, debias=False)

  References:
    Karras, Aittala, Lehtinen, Hellsten, Aila, Laine, "Analyzing and Improving the Training
    Dynamics of Diffusion Models", CVPR 2024, https://arxiv.org/abs/2312.02696 (section 3.1
    and appendix C; ``std_to_exp`` and ``power_function_beta`` in
    https://github.com/NVlabs/edm2/blob/main/training/phema.py).
  """
  fn = "od.power_ema_decay"
  checks.check_range(
    fn, "sigma_rel", sigma_rel, low=0.0, high=0.25, low_open=True, schedule=False
  )
  t = float(sigma_rel) ** -2
  gamma = float(np.roots([1, 7, 16 - t, 12 - t]).real.max())

  def schedule(count):
    n = _float(count)
    return jnp.exp((gamma + 1) * jnp.log1p(-1 / (n + 1)))

  return schedule
