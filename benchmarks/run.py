"""Runs the benchmark cases and prints the table of ``benchmarks/RESULTS.md``.

Every module ``benchmarks/bench_*.py`` contributes its rows through a function
``cases() -> list[Case]``. Usage::

  python -m benchmarks                      # every case, about 4M params
  python -m benchmarks --only adam --reps 50
  python -m benchmarks --scale 0.01 --reps 2   # a quick smoke run
  python -m benchmarks --list --only e2e      # the names of the cases (for --only)
  python -m benchmarks --quality [--smoke]    # training quality, not speed: benchmarks/quality

The backend is JAX's default: the same command runs on a GPU when JAX has one, and
``JAX_PLATFORMS`` picks the backend (no flag here)::

  JAX_PLATFORMS=cuda python -m benchmarks --reps 50    # needs jax[cuda12]; errors without a GPU
  JAX_PLATFORMS=cpu python -m benchmarks

The first line printed names the machine, the backend and the device kind
(``jax.devices()[0].device_kind``): keep it with the table. Every timed call waits for its
results (``block_until_ready``), so asynchronous dispatch on an accelerator is timed in full.
"""

import argparse
import datetime
import importlib
import os
import pkgutil
import platform
import sys

import jax
import optax

import benchmarks
from benchmarks import harness


def all_cases() -> list[harness.Case]:
  """The cases of every ``bench_*`` module, in module order."""
  cases = []
  for module in sorted(m.name for m in pkgutil.iter_modules(benchmarks.__path__)):
    if module.startswith("bench_"):
      cases.extend(importlib.import_module(f"benchmarks.{module}").cases())
  return cases


def devices() -> str:
  """The backend, and the number and kind of its devices: ``gpu, 1 device(s): NVIDIA H100``."""
  kind = jax.devices()[0].device_kind
  return f"{jax.default_backend()}, {len(jax.devices())} device(s): {kind}"


def machine() -> str:
  """One line naming the machine and the versions the figures were taken with."""
  return (
    f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
    f"JAX {jax.__version__} ({devices()}), "
    f"optax {optax.__version__}, Python {platform.python_version()}"
  )


def main(argv: list[str] | None = None) -> list[harness.Result]:
  parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
  parser.add_argument("--only", default="", help="run the cases whose name contains this")
  parser.add_argument("--reps", type=int, default=30, help="timed repetitions per subject")
  parser.add_argument("--scale", type=float, default=1.0, help="params size (1: about 4M)")
  parser.add_argument(
    "--list", action="store_true", help="print the matching cases' names and stop"
  )
  args = parser.parse_args(argv)
  if args.reps < 1 or args.scale <= 0:
    parser.error("--reps must be >= 1 and --scale > 0")
  cases = [c for c in all_cases() if args.only in c.name]
  if not cases:
    parser.error(f"no case matches --only {args.only!r}")
  if args.list:
    print("\n".join(c.name for c in cases))
    return []
  results = []
  for case in cases:
    print(f"running {case.name} ...", file=sys.stderr, flush=True)
    results.append(harness.run_case(case, scale=args.scale, reps=args.reps))
  command = "python -m benchmarks " + " ".join(argv if argv is not None else sys.argv[1:])
  print(f"{datetime.date.today()}, {machine()}")
  print(f"`{command.strip()}`: medians of {args.reps} reps per subject\n")
  print(harness.markdown_table(results))
  return results
