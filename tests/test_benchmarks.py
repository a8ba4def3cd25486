"""Every benchmark case runs (its correctness check included) on a tiny tree."""

import pytest

from benchmarks import harness
from benchmarks import run

CASES = run.all_cases()


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_case_runs_and_checks_itself(case):
  result = harness.run_case(case, scale=0.01, reps=1, warmup=1)
  assert result.ours_ms > 0 and result.baseline_ms > 0
  assert "| " + case.name in harness.markdown_table([result])


def test_full_size_params_are_about_4m_in_16_leaves():
  import jax

  shapes = jax.eval_shape(harness.make_params)
  assert len(shapes) == 16
  assert 3.5e6 < sum(x.size for x in jax.tree.leaves(shapes)) < 4.5e6
