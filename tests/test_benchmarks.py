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


def test_list_prints_the_case_names_and_runs_nothing(capsys):
  assert run.main(["--list", "--only", "e2e"]) == []
  names = capsys.readouterr().out.split("\n")[:-1]
  assert names == [c.name for c in CASES if "e2e" in c.name]
  assert "e2e_adam_vs_fwd_bwd" in names


def test_machine_line_names_the_backend_and_the_device_kind():
  import jax

  line = run.machine()
  assert f"({jax.default_backend()}, {len(jax.devices())} device(s): " in line
  assert jax.devices()[0].device_kind in line


def test_end_to_end_model_sizes_follow_the_scale():
  import jax
  import numpy as np

  from benchmarks import bench_end_to_end as e2e

  full = jax.eval_shape(e2e.lm_params)
  assert e2e.LMConfig.of(full) == e2e.LMConfig()
  assert 1.7e6 < sum(x.size for x in jax.tree.leaves(full)) < 1.8e6
  tiny = e2e.lm_params(0.01)
  config = e2e.LMConfig.of(tiny)
  assert config == e2e.LMConfig.at(0.01) and config.layers == 1 and config.d_model == 16
  tokens = e2e.lm_batch(tiny, jax.random.key(0))
  assert tokens.shape == (e2e.BATCH, config.seq_len + 1)
  loss = float(e2e.lm_loss(tiny, tokens))
  assert abs(loss - np.log(config.vocab)) < 1.0  # near uniform at initialisation
