"""optaxderived: derived optimizer techniques as optax GradientTransformations.

Import as ``import optaxderived as od``. The root holds what goes into ``optax.chain``, with
its states and accessors, the path helpers, the schedules (``piecewise_linear`` and the EMA
decays) and ``derive``. Three submodules hold the rest: ``od.ode`` (optimizers as ODE
integrators), ``od.sparse`` (row-sparse gradients) and ``od.regularizers`` (loss-side
helpers).
"""

from optaxderived import ode as ode
from optaxderived import regularizers as regularizers
from optaxderived import sparse as sparse

# Paths: how leaves are named and selected by patterns.
from optaxderived._core.paths import Patterns
from optaxderived._core.paths import path_mask
from optaxderived._core.paths import tree_paths

# Accumulation (soft batch).
from optaxderived._transforms.accumulate import AccumulateState
from optaxderived._transforms.accumulate import accumulate
from optaxderived._transforms.accumulate import has_updated

# Lookahead and weight averaging (parameter EMA, its decay schedules, SWA).
from optaxderived._transforms.lookahead import LookaheadState
from optaxderived._transforms.lookahead import lookahead
from optaxderived._transforms.lookahead import lookahead_params
from optaxderived._transforms.param_ema import ParamEmaState
from optaxderived._transforms.param_ema import ema_params
from optaxderived._transforms.param_ema import param_ema
from optaxderived._transforms.ema_schedules import ema_warmup
from optaxderived._transforms.ema_schedules import power_ema_decay
from optaxderived._transforms.swa import SWAState
from optaxderived._transforms.swa import swa
from optaxderived._transforms.swa import swa_params

# Lazy updates for embeddings (row-sparse gradients: od.sparse).
from optaxderived._transforms.lazy import LazyState
from optaxderived._transforms.lazy import lazy

# Clipping.
from optaxderived._transforms.clip_norm import ClipNormState
from optaxderived._transforms.clip_norm import clip_norm

# Training stability: history-based and unit-wise clipping, spike skipping, loss scaling.
from optaxderived._transforms.adaptive_grad_clip import adaptive_grad_clip
from optaxderived._transforms.autoclip import AutoClipState
from optaxderived._transforms.autoclip import autoclip
from optaxderived._transforms.zclip import ZClipState
from optaxderived._transforms.zclip import zclip
from optaxderived._transforms.loss_scale import LossScaleState
from optaxderived._transforms.loss_scale import dynamic_loss_scale
from optaxderived._transforms.loss_scale import loss_scale
from optaxderived._transforms.skip_spikes import SkipSpikesState
from optaxderived._transforms.skip_spikes import has_skipped
from optaxderived._transforms.skip_spikes import skip_spikes

# Sharding the optimizer state (ZeRO-1).
from optaxderived._transforms.shard_state import shard_state

# Per-path rules.
from optaxderived._transforms.scale_by_path import ScaleByPathState
from optaxderived._transforms.scale_by_path import scale_by_path
from optaxderived._transforms.transform_by_path import transform_by_path

# The derived family and its composition.
from optaxderived._transforms.weight_decay import WeightDecayState
from optaxderived._transforms.weight_decay import weight_decay
from optaxderived._transforms.layer_adaptation import layer_adaptation
from optaxderived._transforms.schedules import piecewise_linear
from optaxderived._transforms.learning_rate import LearningRateState
from optaxderived._transforms.learning_rate import learning_rate
from optaxderived._transforms.derive import derive

# Exponentiated gradient.
from optaxderived._transforms.exponentiated_gradient import ExponentiatedGradientState
from optaxderived._transforms.exponentiated_gradient import exponentiated_gradient
from optaxderived._transforms.eg_plus_minus import EGPlusMinusState
from optaxderived._transforms.eg_plus_minus import eg_plus_minus
from optaxderived._transforms.eg_step_size import EGStepSizeState
from optaxderived._transforms.eg_step_size import eg_step_size

__version__ = "0.2.0"

__all__ = (
  # Paths.
  "Patterns",
  "path_mask",
  "tree_paths",
  # Accumulation (soft batch).
  "AccumulateState",
  "accumulate",
  "has_updated",
  # Lookahead and weight averaging.
  "LookaheadState",
  "lookahead",
  "lookahead_params",
  "ParamEmaState",
  "ema_params",
  "param_ema",
  "ema_warmup",
  "power_ema_decay",
  "SWAState",
  "swa",
  "swa_params",
  # Lazy updates for embeddings.
  "LazyState",
  "lazy",
  # Clipping.
  "ClipNormState",
  "clip_norm",
  # Training stability.
  "adaptive_grad_clip",
  "AutoClipState",
  "autoclip",
  "ZClipState",
  "zclip",
  "LossScaleState",
  "dynamic_loss_scale",
  "loss_scale",
  "SkipSpikesState",
  "has_skipped",
  "skip_spikes",
  # Sharding the optimizer state (ZeRO-1).
  "shard_state",
  # Per-path rules.
  "ScaleByPathState",
  "scale_by_path",
  "transform_by_path",
  # The derived family and its composition.
  "WeightDecayState",
  "weight_decay",
  "layer_adaptation",
  "piecewise_linear",
  "LearningRateState",
  "learning_rate",
  "derive",
  # Exponentiated gradient.
  "EGPlusMinusState",
  "EGStepSizeState",
  "ExponentiatedGradientState",
  "eg_plus_minus",
  "eg_step_size",
  "exponentiated_gradient",
)
