"""Killed runs resume bit for bit: SIGKILL at seeded points, restore the latest checkpoint.

``tests/scripts/train_and_checkpoint.py`` trains with
``od.skip_spikes(od.accumulate(od.lookahead(adam)))`` and saves with orbax every 3 steps; the
tests kill it (SIGKILL, no chance to clean up) when it prints a chosen line (``step N``, or
``saving step N``: in the middle of an asynchronous save), start it again until it finishes,
and compare the final params and optimizer state with an uninterrupted run, bitwise. Every
child is bounded in time and killed when the test ends.
"""

import random
import re
import time

import numpy as np
from scripts.processes import SCRIPTS
from scripts.processes import Children
from scripts.processes import child_env
from scripts.processes import free_port

SCRIPT = str(SCRIPTS / "train_and_checkpoint.py")
STEPS, SAVE_EVERY = 20, 3  # as in the script
TIMEOUT = 120  # seconds per process start (about 5 on an idle machine)
BUDGET = 300  # seconds for all the starts of one test


def kill_plan(seed: int, kills: int, saves: int, low: int = 1) -> list[str]:
  """``kills`` lines to kill at, in the order they come: ``saves`` of them ``saving step N``
  (a kill during a save), the others ``step N``, at distinct steps ``N >= low`` chosen by
  ``seed``."""
  rng = random.Random(seed)
  save_steps = rng.sample([n for n in range(SAVE_EVERY, STEPS, SAVE_EVERY) if n >= low], saves)
  others = [n for n in range(low, STEPS) if n not in save_steps]
  step_steps = rng.sample(others, kills - saves)
  events = [(n, f"saving step {n}") for n in save_steps]
  events += [(n, f"step {n}") for n in step_steps]
  return [line for _, line in sorted(events)]


def compilation_cache(tmp_path) -> dict:
  """JAX's persistent compilation cache, as a production job uses it: a restart loads the
  compiled step instead of compiling it again (the same executable: bitwise the same)."""
  return {
    "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache"),
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
  }


def remaining(deadline: float) -> float:
  return max(1.0, min(TIMEOUT, deadline - time.perf_counter()))


def restarts(run: Children) -> list[str]:
  return [text for _, text in run.lines[0] if text.startswith(("restored", "start from"))]


def assert_bitwise(got: dict, want: dict) -> None:
  assert sorted(got) == sorted(want)
  for key in want:
    assert got[key].dtype == want[key].dtype, key
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_killed_runs_resume_bit_identically(tmp_path, record_property):
  plan = kill_plan(seed=0, kills=5, saves=2)
  env = child_env(devices=1, **compilation_cache(tmp_path))
  ref_dir, dir_ = tmp_path / "reference", tmp_path / "killed"
  log = []
  deadline = time.perf_counter() + BUDGET
  with Children(
    [[SCRIPT, str(ref_dir / "ckpt"), str(ref_dir / "final.npz")]], env, tmp_path, "reference"
  ) as reference:
    for attempt, line in enumerate([*plan, None]):
      command = [SCRIPT, str(dir_ / "ckpt"), str(dir_ / "final.npz")]
      with Children([command], env, tmp_path, f"attempt{attempt}") as run:
        if line is None:
          assert run.wait(remaining(deadline)) == [0], run.report()
          log.append(("finished", round(run.seconds(), 2), restarts(run)))
          break
        found = run.wait_for_line(line, remaining(deadline))
        assert found, f"ended before {line!r}:\n{run.report()}"
        run.kill()  # SIGKILL
        log.append((line, round(run.seconds(), 2), restarts(run)))
    assert reference.wait(remaining(deadline)) == [0], reference.report()
  record_property("kills", log)
  print("\n".join(map(str, log)))
  assert_bitwise(dict(np.load(dir_ / "final.npz")), dict(np.load(ref_dir / "final.npz")))
  # The restarts resumed from saved steps, and one of them (the last: it restores the save
  # of step 12 or of step 15, whichever had committed) inside an accumulation window and
  # inside a Lookahead period.
  resumed = [
    tuple(map(int, m.groups()))
    for _, _, lines in log
    for r in lines
    if (m := re.match(r"restored step (\d+): micro_step (\d) of 2, lookahead step (\d+)", r))
  ]
  assert resumed, log
  assert any(micro == 1 and slow % 4 != 0 for _, micro, slow in resumed), resumed


def test_killed_two_process_runs_resume_bit_identically(tmp_path, record_property):
  """Two processes, the params and the state sharded over both: both are killed (a
  preempted job) while process 0 saves, and a new pair restores and finishes. The last pair
  also trains from scratch, uninterrupted, in the same processes: the reference."""
  # (from step 12 on: "saving step 9" waited for the save of step 6 to finish, so a complete
  # checkpoint exists whatever the machine's load)
  (line,) = kill_plan(seed=1, kills=1, saves=1, low=12)
  env = child_env(devices=4, **compilation_cache(tmp_path))
  log = []
  deadline = time.perf_counter() + BUDGET
  for attempt, kill_at in enumerate([line, None]):
    port = free_port()
    extra = ["--reference"] if kill_at is None else []
    commands = [
      [SCRIPT, str(tmp_path / "ckpt"), str(tmp_path / "final.npz"), str(i), "2", str(port)]
      + extra
      for i in range(2)
    ]
    with Children(commands, env, tmp_path, f"pair{attempt}") as run:
      if kill_at is None:
        assert run.wait(remaining(deadline)) == [0, 0], run.report()
        log.append(("finished", round(run.seconds(), 2), restarts(run)))
      else:
        assert run.wait_for_line(kill_at, remaining(deadline)), run.report()
        run.kill()
        log.append((kill_at, round(run.seconds(), 2), restarts(run)))
  record_property("kills", log)
  print("\n".join(map(str, log)))
  results = dict(np.load(tmp_path / "final.npz"))
  want = {k[len("reference/") :]: v for k, v in results.items() if k.startswith("reference/")}
  got = {k: v for k, v in results.items() if not k.startswith("reference/")}
  assert want
  assert_bitwise(got, want)
  assert any(r.startswith("restored") for _, _, lines in log for r in lines), log
