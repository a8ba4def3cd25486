"""optaxderived: derived optimizer techniques as optax GradientTransformations.

Import as ``import optaxderived as od``. Every public name is re-exported here, one per
line; the implementation lives in private modules, one small module per family.
"""

# Paths: how leaves are named and selected by patterns.
from optaxderived._paths import Patterns, path_mask, tree_paths

__version__ = "0.1.0"

__all__ = (
  "Patterns",
  "path_mask",
  "tree_paths",
)
