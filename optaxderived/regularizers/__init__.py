"""Loss-side helpers: terms added to a loss before it is differentiated, not transformations.

Gradient penalties (exact, and the Rademacher estimate with one backward pass per draw) and
virtual adversarial training (the perturbation and its loss).
"""

from optaxderived.regularizers._gradient_penalty import gradient_penalty
from optaxderived.regularizers._gradient_penalty import rademacher_gradient_penalty
from optaxderived.regularizers._vat import vat_loss
from optaxderived.regularizers._vat import vat_perturbation

__all__ = (
  "gradient_penalty",
  "rademacher_gradient_penalty",
  "vat_perturbation",
  "vat_loss",
)
