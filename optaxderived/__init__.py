"""optaxderived: derived optimizer techniques as optax GradientTransformations.

Import as ``import optaxderived as od``. Every public name is re-exported here, one per
line; the implementation lives in private modules, one small module per family.
"""

# Paths: how leaves are named and selected by patterns.
from optaxderived._paths import Patterns
from optaxderived._paths import path_mask
from optaxderived._paths import tree_paths

# Accumulation (soft batch).

# Lookahead and parameter EMA.

# Lazy optimisation for embeddings.

# Clipping and per-path rules.

# The derived family.
from optaxderived._derived import WeightDecayState
from optaxderived._derived import layer_adaptation
from optaxderived._derived import piecewise_linear
from optaxderived._derived import weight_decay

# Exponentiated gradient.

# ODE steppers.

__version__ = "0.1.0"

__all__ = (
  "Patterns",
  "path_mask",
  "tree_paths",
  # Accumulation (soft batch).
  # Lookahead and parameter EMA.
  # Lazy optimisation for embeddings.
  # Clipping and per-path rules.
  # The derived family.
  "WeightDecayState",
  "layer_adaptation",
  "piecewise_linear",
  "weight_decay",
  # Exponentiated gradient.
  # ODE steppers.
)
