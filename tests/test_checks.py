import jax
import jax.numpy as jnp
import optax
import pytest

from optaxderived._checks import check_choice
from optaxderived._checks import check_int
from optaxderived._checks import check_positive
from optaxderived._checks import check_range


def test_messages_name_the_argument_and_value():
  with pytest.raises(ValueError, match=r"rate must be > 0, got -1"):
    check_positive("rate", -1)
  with pytest.raises(ValueError, match=r"every_k must be an integer >= 1, got 0"):
    check_int("every_k", 0)
  with pytest.raises(ValueError, match=r"every_k must be an integer >= 1, got 2.5"):
    check_int("every_k", 2.5)
  with pytest.raises(ValueError, match=r"decay must be in \[0.0, 1.0\), got 1.0"):
    check_range("decay", 1.0, low=0.0, high=1.0, high_open=True)
  with pytest.raises(ValueError, match=r"decay must be in"):
    check_range("decay", float("nan"), low=0.0, high=1.0)
  with pytest.raises(ValueError, match=r"scope must be one of"):
    check_choice("scope", "rows", ("global", "leaf", "row"))


def test_schedules_and_traced_values_pass():
  check_positive("lr", optax.constant_schedule(-1.0))
  check_int("every_k", lambda step: 2)
  jax.jit(lambda x: check_positive("lr", x) or x)(jnp.float32(-1.0))
  check_positive("lr", jnp.float32(0.5))
  check_int("every_k", jnp.asarray(3))  # what optax.inject_hyperparams passes at init
  with pytest.raises(ValueError, match="every_k must be an integer >= 1"):
    check_int("every_k", jnp.asarray(0))


def test_missing_params_names_the_transformation():
  from optaxderived._checks import require_params

  with pytest.raises(ValueError, match="od.lookahead needs the current params"):
    require_params(None, "od.lookahead")
  require_params({}, "od.lookahead")
