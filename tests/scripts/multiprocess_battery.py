"""One process of a multi-process run of the battery (``tests/test_multiprocess.py`` starts 2).

    python tests/scripts/multiprocess_battery.py PROCESS_ID NUM_PROCESSES PORT OUT_DIR

Each process joins ``jax.distributed`` on ``127.0.0.1:PORT`` (4 CPU devices each, from
``XLA_FLAGS``; gloo collectives, JAX's default on CPU), runs :func:`run` on the global mesh
and writes ``OUT_DIR/process_<id>.npz`` (every result, gathered to the host) and
``OUT_DIR/process_<id>.json`` (what was checked, and timings). The test runs the same
:func:`run` in its own process on 8 devices and compares.
"""

from __future__ import annotations

import json
import pathlib
import sys
import time
from typing import Any

TESTS = pathlib.Path(__file__).resolve().parent.parent

# One case of the battery's registry per family.
CASES = (
  "accumulate",
  "lookahead",
  "param_ema",
  "lazy",
  "clip_norm_soft_row",
  "scale_by_path",
  "derive_bert",  # weight decay, layer adaptation, a schedule and accumulation via derive
  "exponentiated_gradient",
  "skip_spikes",
  "zclip",
  "dynamic_loss_scale",
  "heun",
)
EAGER = ("lookahead",)  # also an eager (unjitted) update on global arrays


def _flatten(prefix: str, tree: Any, out: dict) -> None:
  """Every leaf of ``tree``, gathered to the host, under ``prefix/<key path>``."""
  import jax
  import numpy as np
  from jax.experimental import multihost_utils

  gathered = multihost_utils.process_allgather(tree, tiled=True)
  for path, leaf in jax.tree_util.tree_leaves_with_path(gathered):
    out[prefix + jax.tree_util.keystr(path)] = np.asarray(leaf)


def _global(tree: Any, shardings: Any) -> Any:
  """Host values as global arrays (every process holds the same values)."""
  import jax
  import numpy as np

  return jax.device_put(jax.tree.map(np.asarray, tree), shardings)


def run(checkpoint_dir: pathlib.Path) -> tuple[dict, dict]:
  """The checks, on the global devices; returns the results and what was checked."""
  import jax
  import numpy as np
  import optax
  import orbax.checkpoint as ocp
  from jax.sharding import Mesh
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  import optaxderived as od
  from optaxderived._transforms.shard_state import shard_state

  if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))
  import test_battery as battery

  assert jax.device_count() == 8, jax.devices()
  out: dict = {}
  info: dict = {"cases": {}, "process_count": jax.process_count()}

  # 1. The battery's cases, params sharded over the 8 global devices.
  for i, name in enumerate(CASES):
    t0 = time.perf_counter()
    case = battery.CASES[name]
    tx = case.make()
    layout = "fsdp" if i % 2 == 0 else "2d"  # "2d": the "data" axis spans the processes
    shardings = battery.shardings_for(layout)
    host = jax.tree.map(np.asarray, battery.make_params(case))
    params = _global(host, shardings)
    # Under jit with out_shardings: every leaf a global array (see docs/scaling.md).
    init = jax.jit(tx.init, out_shardings=battery.state_shardings(tx, host, shardings))
    state = init(params)
    battery.assert_follows_params(state, params)
    compiled = battery.make_run(case, tx, 4).lower(params, state).compile()
    got_params, got_state = compiled(params, state)
    for p, s in zip(jax.tree.leaves(got_params), jax.tree.leaves(shardings), strict=True):
      assert p.sharding.is_equivalent_to(s, p.ndim), (name, p.sharding, s)
    checked = battery.assert_follows_params(got_state, params)
    gathered = battery.gathered_params(compiled.as_text(), host)
    assert not gathered, (name, gathered)
    _flatten(f"{name}/params", got_params, out)
    _flatten(f"{name}/state", got_state, out)

    # The accessors, on global states.
    if name == "accumulate":
      out[f"{name}/has_updated"] = np.asarray(bool(od.has_updated(got_state)))
    if name == "lookahead":
      _flatten(f"{name}/lookahead_params", od.lookahead_params(got_state), out)
    if name == "param_ema":
      _flatten(f"{name}/ema_params", od.ema_params(got_state, got_params), out)
    if name == "skip_spikes":
      out[f"{name}/has_skipped"] = np.asarray(bool(od.has_skipped(got_state)))
    if name == "dynamic_loss_scale":
      out[f"{name}/loss_scale"] = np.asarray(float(od.loss_scale(got_state)))

    # An eager (unjitted) update on global arrays equals the jitted one.
    if name in EAGER:
      grads = battery.grads_of(params)
      updates, eager_state = tx.update(grads, state, params, **battery.extra_args(case))
      eager_params = optax.apply_updates(params, updates)
      _flatten(f"{name}/eager_params", eager_params, out)
      _flatten(f"{name}/eager_state", eager_state, out)
      jitted = jax.jit(battery.make_step(case, tx))(params, state)
      _flatten(f"{name}/jitted_params", jitted[0], out)
      _flatten(f"{name}/jitted_state", jitted[1], out)
    info["cases"][name] = {
      "layout": layout,
      "param_shaped_state_leaves_checked": checked,
      "seconds": round(time.perf_counter() - t0, 2),
    }

  # 2. Checkpoints: a save after an eager init fails on several processes (its scalar
  # counters are process-local); the jitted init with out_shardings saves and restores.
  case = battery.CASES["accumulate"]
  tx = case.make()
  shardings = battery.shardings_for("fsdp")
  host = jax.tree.map(np.asarray, battery.make_params(case))
  params = _global(host, shardings)
  state_shardings = battery.state_shardings(tx, host, shardings)
  eager_state = tx.init(params)
  info["eager_init_single_device_leaves"] = sum(
    len(x.sharding.device_set) == 1 for x in jax.tree.leaves(eager_state)
  )
  jit_no_out = jax.jit(tx.init)(params)
  info["jit_init_without_out_shardings_single_device_leaves"] = sum(
    len(x.sharding.device_set) == 1 for x in jax.tree.leaves(jit_no_out)
  )
  try:
    with ocp.StandardCheckpointer() as checkpointer:
      checkpointer.save(checkpoint_dir / "eager", {"opt_state": eager_state})
    info["eager_init_save"] = "saved"
  except ValueError as e:
    info["eager_init_save"] = str(e).split("(")[0].strip()
  run3 = battery.make_run(case, tx, 3)
  params3, state3 = run3(params, jax.jit(tx.init, out_shardings=state_shardings)(params))
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(checkpoint_dir / "jitted", {"params": params3, "opt_state": state3})
  target = jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
    jax.eval_shape(lambda: {"params": params3, "opt_state": state3}),
    {"params": shardings, "opt_state": state_shardings},
  )
  with ocp.StandardCheckpointer() as checkpointer:
    restored = checkpointer.restore(checkpoint_dir / "jitted", target)
  battery.assert_follows_params(restored["opt_state"], params)
  _flatten("checkpoint/uninterrupted", run3(params3, state3), out)
  _flatten("checkpoint/resumed", run3(restored["params"], restored["opt_state"]), out)

  # 3. od.lazy on a RowSparse gradient of a table whose rows are split over the processes
  # (rows 0-31 on process 0's devices, 32-63 on process 1's): no gather of the table.
  mesh = Mesh(np.array(jax.devices()), ("rows",))
  replicated = NamedSharding(mesh, P())
  table = (np.arange(64 * 4, dtype=np.float32).reshape(64, 4) / 100).astype(np.float32)
  lazy_host = {"embed": table, "bias": np.ones(3, np.float32)}
  lazy_shardings = {"embed": NamedSharding(mesh, P("rows", None)), "bias": replicated}
  lazy_params = _global(lazy_host, lazy_shardings)
  ids = np.array([3, 60, 3, -1, 17, 40, 33, 60], np.int32)  # rows of both processes
  lazy_grads = _global(
    {
      "embed": od.sparse.RowSparse(ids, np.linspace(-1, 1, 32, dtype=np.float32).reshape(8, 4)),
      "bias": np.ones(3, np.float32),
    },
    replicated,
  )
  lazy_tx = od.lazy(optax.adam(0.1))

  def lazy_step(p, s, g):
    u, s = lazy_tx.update(g, s, p)
    return od.sparse.apply_updates(p, u), s

  lazy_state = jax.jit(
    lazy_tx.init, out_shardings=battery.state_shardings(lazy_tx, lazy_host, lazy_shardings)
  )(lazy_params)
  compiled = jax.jit(lazy_step).lower(lazy_params, lazy_state, lazy_grads).compile()
  hlo = compiled.as_text()
  info["lazy_all_gathers"] = hlo.count("all-gather(") + hlo.count("all-gather-start(")
  info["lazy_table_gathered"] = bool(battery.gathered_params(hlo, {"t": table}))
  p, s = lazy_params, lazy_state
  for _ in range(2):
    p, s = compiled(p, s, lazy_grads)
  rows = NamedSharding(mesh, P("rows", None))
  assert p["embed"].sharding.is_equivalent_to(rows, 2)
  for moment in ("mu", "nu"):
    assert optax.tree.get(s, moment)["embed"].sharding.is_equivalent_to(rows, 2)
  _flatten("lazy/params", p, out)
  _flatten("lazy/state", s, out)

  # 4. od.shard_state across processes: params replicated, the moments split over the 8
  # devices (half on each process); a plain jitted init puts the whole state on the mesh.
  zero_params = _global(host, jax.tree.map(lambda _: replicated, host))
  zero_tx = shard_state(optax.adam(1e-2), lambda path, x: P("rows"), mesh=mesh)
  zero_state = jax.jit(zero_tx.init)(zero_params)
  info["shard_state_single_device_leaves"] = sum(
    len(x.sharding.device_set) == 1 for x in jax.tree.leaves(zero_state)
  )
  # (one jitted step per call, as a training loop runs: the input pins the params' sharding;
  # inside a lax.scan over steps on Auto axes XLA picks the carry's, see docs/scaling.md)
  zero_step = jax.jit(battery.make_step(battery.Case(lambda: zero_tx, None), zero_tx))
  for _ in range(3):
    zero_params, zero_state, _ = zero_step(zero_params, zero_state)
  for x in jax.tree.leaves(optax.tree.get(zero_state, "mu")):
    assert x.sharding.is_equivalent_to(NamedSharding(mesh, P("rows")), x.ndim)
    assert not x.is_fully_addressable or jax.process_count() == 1
  for x in jax.tree.leaves(zero_params):
    assert x.sharding.is_equivalent_to(replicated, x.ndim)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(checkpoint_dir / "zero", {"opt_state": zero_state})
  _flatten("shard_state/params", zero_params, out)
  _flatten("shard_state/state", zero_state, out)
  return out, info


def main() -> None:
  process_id, num_processes, port = (int(a) for a in sys.argv[1:4])
  out_dir = pathlib.Path(sys.argv[4]).resolve()
  import jax

  jax.distributed.initialize(
    coordinator_address=f"127.0.0.1:{port}",
    num_processes=num_processes,
    process_id=process_id,
    initialization_timeout=120,
    heartbeat_timeout_seconds=30,  # a dead peer ends this process instead of a hang
  )
  import numpy as np

  t0 = time.perf_counter()
  results, info = run(out_dir / "checkpoints")
  info["seconds"] = round(time.perf_counter() - t0, 2)
  np.savez(out_dir / f"process_{process_id}.npz", **results)
  (out_dir / f"process_{process_id}.json").write_text(json.dumps(info, indent=1))
  jax.distributed.shutdown()


if __name__ == "__main__":
  main()
