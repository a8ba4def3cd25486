import jax
import jax.numpy as jnp
import optax
import pytest

from optaxderived._core.checks import check_choice
from optaxderived._core.checks import check_finite
from optaxderived._core.checks import check_int
from optaxderived._core.checks import check_positive
from optaxderived._core.checks import check_range
from optaxderived._core.checks import check_transformation
from optaxderived._core.checks import require_params

FN = "od.example"


def test_messages_name_the_function_the_argument_and_the_value():
  with pytest.raises(ValueError, match=r"^od.example: rate must be > 0, got -1$"):
    check_positive(FN, "rate", -1)
  with pytest.raises(ValueError, match=r"^od.example: every_k must be an integer >= 1, got 0$"):
    check_int(FN, "every_k", 0)
  with pytest.raises(ValueError, match=r"every_k must be an integer >= 1, got 2.5"):
    check_int(FN, "every_k", 2.5)
  with pytest.raises(ValueError, match=r"every_k must be an integer >= 1, got <function"):
    check_int(FN, "every_k", lambda step: 2, schedule=False)
  with pytest.raises(ValueError, match=r"decay must be in \[0.0, 1.0\), got 1.0"):
    check_range(FN, "decay", 1.0, low=0.0, high=1.0, high_open=True)
  with pytest.raises(ValueError, match=r"decay must be in"):
    check_range(FN, "decay", float("nan"), low=0.0, high=1.0)
  with pytest.raises(ValueError, match=r"scope must be one of"):
    check_choice(FN, "scope", "rows", ("global", "leaf", "row"))
  with pytest.raises(ValueError, match=r"scope must be one of"):
    check_choice(FN, "scope", ["global"], ("global", "leaf", "row"))  # unhashable: no crash
  with pytest.raises(ValueError, match=r"learning_rate must be finite and >= 0.0, got inf"):
    check_finite(FN, "learning_rate", float("inf"), low=0.0)
  check_finite(FN, "learning_rate", 0.0, low=0.0)  # a warmup's first rate


def test_a_factory_instead_of_a_transformation_gets_a_hint():
  with pytest.raises(
    ValueError, match=r"^od.example: inner must be an optax.Gradient.*optax.adam\(1e-3\)"
  ):
    check_transformation(FN, "inner", optax.adam)
  with pytest.raises(ValueError, match=r"inner must be an optax.GradientTransformation, got 3"):
    check_transformation(FN, "inner", 3)
  check_transformation(FN, "inner", None, optional=True)
  check_transformation(FN, "inner", optax.sgd(0.1))


def test_an_array_with_dimensions_is_rejected_before_it_is_read():
  class Unreadable:
    ndim = 1

    def __array__(self, *args, **kwargs):  # what a global array of other processes does
      raise RuntimeError("Fetching value for jax.Array that spans non-addressable devices")

  with pytest.raises(ValueError, match="rate must be a real number or a schedule"):
    check_positive(FN, "rate", Unreadable())


def test_schedules_and_traced_values_pass():
  check_positive(FN, "lr", optax.constant_schedule(-1.0))
  check_int(FN, "every_k", lambda step: 2)
  jax.jit(lambda x: check_positive(FN, "lr", x) or x)(jnp.float32(-1.0))
  check_positive(FN, "lr", jnp.float32(0.5))
  check_int(FN, "every_k", jnp.asarray(3))  # what optax.inject_hyperparams passes at init
  with pytest.raises(ValueError, match="every_k must be an integer >= 1"):
    check_int(FN, "every_k", jnp.asarray(0))


def test_missing_params_names_the_transformation():
  with pytest.raises(ValueError, match="od.lookahead needs the current params"):
    require_params(None, "od.lookahead")
  require_params({}, "od.lookahead")
