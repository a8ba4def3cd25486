"""The quality benchmark's smoke version: every arm still trains, and the table is built."""

import jax
import numpy as np
import pytest

from benchmarks.quality import arms
from benchmarks.quality import run
from benchmarks.quality import tasks

UPDATES = 30


@pytest.fixture(scope="module")
def small_tasks():
  return (tasks.digits(), 32), (tasks.char_lm(layers=1, width=32, length=16), 8)


@pytest.mark.parametrize("arm", arms.ARMS, ids=lambda a: a.name)
def test_every_arm_lowers_the_eval_loss_of_both_tasks(arm, small_tasks):
  for task, batch in small_tasks:
    before = float(task.evaluate(task.init(0))["eval loss"])
    result = run.train(task, arm, arm.rates[1], 0, updates=UPDATES, batch=batch)
    assert np.isfinite(result.eval_loss) and result.eval_loss < before, (task.name, result)
    # At least 20 evaluations, the last one after the last update.
    assert len(result.curve) >= 20 and np.isclose(result.curve[-1], result.eval_loss)
    assert result.seconds_per_update > 0


def test_the_text_is_split_by_file_and_ascii():
  train, held_out = tasks._optax_text()
  assert len(train) > 9 * len(held_out) / 2 > 0
  assert train.max() < 128 and held_out.max() < 128


def test_the_table_picks_the_best_rate_per_arm_and_compares_with_the_best_baseline():
  def fake(arm, family, rate, seed, loss):
    return run.Run("task", arm, family, rate, seed, loss, 1 - loss, 1e-3, np.ones(3))

  runs = [
    fake("adam", "baseline", 1e-3, 0, 0.5),
    fake("adam", "baseline", 1e-3, 1, 0.7),  # mean 0.6 at 1e-3
    fake("adam", "baseline", 1e-2, 0, 0.4),
    fake("adam", "baseline", 1e-2, 1, 0.6),  # mean 0.5 at 1e-2: the best
    fake("ema", "averaging", 1e-3, 0, 0.45),
    fake("ema", "averaging", 1e-3, 1, float("nan")),  # a diverged seed loses its rate
    fake("ema", "averaging", 1e-2, 0, 0.55),
    fake("ema", "averaging", 1e-2, 1, 0.65),
  ]
  best = run.best_rates(runs)
  assert {r.rate for r in best[("task", "adam")]} == {1e-2}
  assert {r.rate for r in best[("task", "ema")]} == {1e-2}
  table = run.markdown_table(runs, {"task": "accuracy"})
  assert "| adam | baseline | 0.01 | 0.5000 ± 0.1414 | +0.0000 |" in table
  assert "| ema | averaging | 0.01 | 0.6000 ± 0.0707 | +0.1000 |" in table


def test_an_accumulating_arm_sees_the_same_examples_in_micro_batches(small_tasks):
  (task, batch), _ = small_tasks
  accumulating = next(a for a in arms.ARMS if a.name == "accumulate(adam, 4)")
  adam = next(a for a in arms.ARMS if a.name == "adam")
  ours = run.train(task, accumulating, 3e-3, 0, updates=10, batch=batch)
  reference = run.train(task, adam, 3e-3, 0, updates=10, batch=batch)
  # The mean of 4 micro-batch gradients is the batch gradient: the same run, to rounding.
  np.testing.assert_allclose(ours.eval_loss, reference.eval_loss, rtol=1e-4)
  assert jax.numpy.isfinite(ours.metric)
