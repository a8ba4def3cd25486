"""optaxderived: derived optimizer techniques as optax GradientTransformations.

Import as ``import optaxderived as od``. Every public name is re-exported here, one per
line; the implementation lives in private modules, one small module per family.
"""

# Paths: how leaves are named and selected by patterns.
from optaxderived._paths import Patterns
from optaxderived._paths import path_mask
from optaxderived._paths import tree_paths

# Accumulation (soft batch).
from optaxderived._accumulation import AccumulateState
from optaxderived._accumulation import accumulate
from optaxderived._accumulation import has_updated

# Lookahead and parameter EMA.
from optaxderived._ema import ParamEmaState
from optaxderived._ema import ema_params
from optaxderived._ema import param_ema
from optaxderived._lookahead import LookaheadState
from optaxderived._lookahead import lookahead
from optaxderived._lookahead import lookahead_params

# Lazy optimisation for embeddings.
from optaxderived._lazy import LazyState
from optaxderived._lazy import RowSparse
from optaxderived._lazy import apply_updates
from optaxderived._lazy import lazy
from optaxderived._lazy import row_sparse_grad

# Clipping and per-path rules.
from optaxderived._clipping import ClipNormState
from optaxderived._clipping import clip_norm
from optaxderived._path_rules import ScaleByPathState
from optaxderived._path_rules import scale_by_path
from optaxderived._path_rules import transform_by_path

# The derived family.
from optaxderived._derived import WeightDecayState
from optaxderived._derived import layer_adaptation
from optaxderived._derived import piecewise_linear
from optaxderived._derived import weight_decay
from optaxderived._derive import derive

# Exponentiated gradient.
from optaxderived._exponentiated import EGPlusMinusState
from optaxderived._exponentiated import EGStepSizeState
from optaxderived._exponentiated import ExponentiatedGradientState
from optaxderived._exponentiated import eg_plus_minus
from optaxderived._exponentiated import eg_step_size
from optaxderived._exponentiated import exponentiated_gradient

# ODE steppers.
from optaxderived._runge_kutta import BOSH3
from optaxderived._runge_kutta import DOPRI5
from optaxderived._runge_kutta import EULER
from optaxderived._runge_kutta import HEUN
from optaxderived._runge_kutta import MIDPOINT
from optaxderived._runge_kutta import RALSTON
from optaxderived._runge_kutta import RK4
from optaxderived._runge_kutta import ButcherTableau
from optaxderived._runge_kutta import Stepper
from optaxderived._runge_kutta import StepperState
from optaxderived._runge_kutta import StepInfo
from optaxderived._runge_kutta import apply_gradients
from optaxderived._runge_kutta import as_transformation
from optaxderived._runge_kutta import euler
from optaxderived._runge_kutta import heun
from optaxderived._runge_kutta import midpoint
from optaxderived._runge_kutta import ralston
from optaxderived._runge_kutta import rk23
from optaxderived._runge_kutta import rk4
from optaxderived._runge_kutta import rk45
from optaxderived._runge_kutta import runge_kutta

# Regularizers from the posts (gradient penalty, virtual adversarial training).
from optaxderived._regularizers import gradient_penalty
from optaxderived._regularizers import rademacher_gradient_penalty
from optaxderived._regularizers import vat_loss
from optaxderived._regularizers import vat_perturbation

__version__ = "0.1.0"

__all__ = (
  "Patterns",
  "path_mask",
  "tree_paths",
  # Accumulation (soft batch).
  "AccumulateState",
  "accumulate",
  "has_updated",
  # Lookahead and parameter EMA.
  "ParamEmaState",
  "ema_params",
  "param_ema",
  "LookaheadState",
  "lookahead",
  "lookahead_params",
  # Lazy optimisation for embeddings.
  "LazyState",
  "RowSparse",
  "apply_updates",
  "lazy",
  "row_sparse_grad",
  # Clipping and per-path rules.
  "ClipNormState",
  "clip_norm",
  "ScaleByPathState",
  "scale_by_path",
  "transform_by_path",
  # The derived family.
  "WeightDecayState",
  "layer_adaptation",
  "piecewise_linear",
  "weight_decay",
  "derive",
  # Exponentiated gradient.
  "EGPlusMinusState",
  "EGStepSizeState",
  "ExponentiatedGradientState",
  "eg_plus_minus",
  "eg_step_size",
  "exponentiated_gradient",
  # ODE steppers.
  "BOSH3",
  "DOPRI5",
  "EULER",
  "HEUN",
  "MIDPOINT",
  "RALSTON",
  "RK4",
  "ButcherTableau",
  "Stepper",
  "StepperState",
  "StepInfo",
  "apply_gradients",
  "as_transformation",
  "euler",
  "heun",
  "midpoint",
  "ralston",
  "rk23",
  "rk4",
  "rk45",
  "runge_kutta",
  # Regularizers from the posts (gradient penalty, virtual adversarial training).
  "gradient_penalty",
  "rademacher_gradient_penalty",
  "vat_loss",
  "vat_perturbation",
)
