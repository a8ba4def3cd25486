"""Two JAX processes on one machine: the battery's families on a global 8-device mesh.

The test starts ``tests/scripts/multiprocess_battery.py`` twice (``jax.distributed`` on
127.0.0.1, 4 CPU devices per process, gloo collectives) and, while they run, the same
checks in this process on its own 8 devices; then it compares the two runs. Every child is
bounded in time and killed when the test ends, whatever happens.
"""

import importlib.util
import json

import jax
import numpy as np
import pytest
from scripts.processes import SCRIPTS
from scripts.processes import Children
from scripts.processes import child_env
from scripts.processes import free_port

TIMEOUT = 240  # seconds for the whole run (about 30 on an idle 2-core machine)


def _load_script():
  spec = importlib.util.spec_from_file_location(
    "multiprocess_battery", SCRIPTS / "multiprocess_battery.py"
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _assert_close(got: np.ndarray, want: np.ndarray, key: str) -> bool:
  """Bitwise for integers and bools; floats to 1e-6 (gloo's all-reduce may add in another
  order than the in-process one). Returns whether they are bitwise equal."""
  assert got.dtype == want.dtype and got.shape == want.shape, key
  if np.array_equal(got, want, equal_nan=True):
    return True
  assert np.issubdtype(got.dtype, np.floating), key
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7, err_msg=key)
  return False


@pytest.mark.skipif(jax.device_count() < 8, reason="needs the 8 host devices of conftest.py")
def test_two_processes_equal_one(tmp_path):
  port = free_port()
  script = str(SCRIPTS / "multiprocess_battery.py")
  commands = [[script, str(i), "2", str(port), str(tmp_path)] for i in range(2)]
  with Children(commands, child_env(devices=4), tmp_path, "battery") as run:
    # The reference, meanwhile: the same checks in one process, on 8 devices.
    want, want_info = _load_script().run(tmp_path / "reference_checkpoints")
    codes = run.wait(TIMEOUT)
    assert codes == [0, 0], run.report()
  got = [dict(np.load(tmp_path / f"process_{i}.npz")) for i in range(2)]
  info = [json.loads((tmp_path / f"process_{i}.json").read_text()) for i in range(2)]
  assert info[0]["process_count"] == 2 and want_info["process_count"] == 1

  # Both processes hold the same (gathered) values, and they equal the one-process run.
  assert sorted(got[0]) == sorted(got[1]) == sorted(want)
  bitwise = 0
  for key in want:
    np.testing.assert_array_equal(got[0][key], got[1][key], err_msg=key)
    bitwise += _assert_close(got[0][key], want[key], key)
  assert bitwise >= 0.9 * len(want), (bitwise, len(want))
  for name in info[0]["cases"]:
    checked = info[0]["cases"][name]["param_shaped_state_leaves_checked"]
    assert checked == want_info["cases"][name]["param_shaped_state_leaves_checked"], name

  # The accessors read global states.
  assert got[0]["accumulate/has_updated"] and got[0]["dynamic_loss_scale/loss_scale"] > 0
  assert not got[0]["skip_spikes/has_skipped"]
  for name, what in (("lookahead", "lookahead_params"), ("param_ema", "ema_params")):
    assert any(k.startswith(f"{name}/{what}") for k in got[0]), name
  # An eager update on global arrays equals the jitted one.
  for key in [k for k in got[0] if k.startswith("lookahead/eager_")]:
    jitted = key.replace("/eager_", "/jitted_")
    np.testing.assert_allclose(got[0][key], got[0][jitted], rtol=1e-6, atol=1e-7, err_msg=key)
  # A checkpoint saved and restored on 2 processes continues bit for bit.
  for key in [k for k in got[0] if k.startswith("checkpoint/resumed")]:
    np.testing.assert_array_equal(
      got[0][key], got[0][key.replace("resumed", "uninterrupted")], err_msg=key
    )
  # The documented pitfall: eager init leaves process-local counters, which orbax refuses
  # to save on several processes; a plain jit(tx.init) puts the leaves that read no param
  # value on one device (pass out_shardings); od.shard_state's jitted init puts all on the
  # mesh.
  assert info[0]["eager_init_single_device_leaves"] > 0
  assert info[0]["eager_init_save"].startswith("Cannot serialize host local"), info[0]
  assert info[0]["jit_init_without_out_shardings_single_device_leaves"] > 0
  assert info[0]["shard_state_single_device_leaves"] == 0
  # od.lazy on a table split over the processes gathers nothing.
  assert info[0]["lazy_all_gathers"] == 0 and not info[0]["lazy_table_gathered"]
