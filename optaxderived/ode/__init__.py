"""Optimizers as ODE integrators: explicit Runge–Kutta steppers on the gradient flow.

Gradient descent is Euler's method on the gradient flow ``dθ/dt = −∇L(θ)`` with the learning
rate as the step size. A Butcher tableau (data) gives a higher-order step; an embedded error
estimate and a step-size controller make the learning rate adaptive.

Use as ``import optaxderived as od`` then ``od.ode.heun(0.1)``, ``od.ode.RK4``, ...
"""

from optaxderived.ode._runge_kutta import BOSH3
from optaxderived.ode._runge_kutta import DOPRI5
from optaxderived.ode._runge_kutta import EULER
from optaxderived.ode._runge_kutta import HEUN
from optaxderived.ode._runge_kutta import MIDPOINT
from optaxderived.ode._runge_kutta import RALSTON
from optaxderived.ode._runge_kutta import RK4
from optaxderived.ode._runge_kutta import ButcherTableau
from optaxderived.ode._runge_kutta import StepInfo
from optaxderived.ode._runge_kutta import Stepper
from optaxderived.ode._runge_kutta import StepperState
from optaxderived.ode._runge_kutta import apply_gradients
from optaxderived.ode._runge_kutta import as_transformation
from optaxderived.ode._runge_kutta import euler
from optaxderived.ode._runge_kutta import heun
from optaxderived.ode._runge_kutta import midpoint
from optaxderived.ode._runge_kutta import ralston
from optaxderived.ode._runge_kutta import rk4
from optaxderived.ode._runge_kutta import rk23
from optaxderived.ode._runge_kutta import rk45
from optaxderived.ode._runge_kutta import runge_kutta

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
