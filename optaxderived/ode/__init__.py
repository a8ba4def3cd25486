"""Optimizers as ODE integrators: explicit Runge–Kutta steppers on the gradient flow.

Gradient descent is Euler's method on the gradient flow ``dθ/dt = −∇L(θ)`` with the learning
rate as the step size. A Butcher tableau (data) gives a higher-order step; an embedded error
estimate and a step-size controller make the learning rate adaptive.

Use as ``import optaxderived as od`` then ``od.ode.heun(0.1)``, ``od.ode.RK4``, ...
"""

from __future__ import annotations

from optaxderived.ode._flax import apply_gradients
from optaxderived.ode._stepper import StepInfo
from optaxderived.ode._stepper import Stepper
from optaxderived.ode._stepper import StepperState
from optaxderived.ode._stepper import euler
from optaxderived.ode._stepper import heun
from optaxderived.ode._stepper import midpoint
from optaxderived.ode._stepper import ralston
from optaxderived.ode._stepper import rk4
from optaxderived.ode._stepper import rk23
from optaxderived.ode._stepper import rk45
from optaxderived.ode._stepper import runge_kutta
from optaxderived.ode._tableaus import BOSH3
from optaxderived.ode._tableaus import DOPRI5
from optaxderived.ode._tableaus import EULER
from optaxderived.ode._tableaus import HEUN
from optaxderived.ode._tableaus import MIDPOINT
from optaxderived.ode._tableaus import RALSTON
from optaxderived.ode._tableaus import RK4
from optaxderived.ode._tableaus import ButcherTableau
from optaxderived.ode._transformation import as_transformation

__all__ = (
  # Tableaus (data).
  "ButcherTableau",
  "EULER",
  "HEUN",
  "MIDPOINT",
  "RALSTON",
  "RK4",
  "BOSH3",
  "DOPRI5",
  # Steppers.
  "Stepper",
  "StepperState",
  "StepInfo",
  "runge_kutta",
  "euler",
  "heun",
  "midpoint",
  "ralston",
  "rk4",
  "rk23",
  "rk45",
  # Adapters: optax and Flax.
  "as_transformation",
  "apply_gradients",
)
