"""A small training run that checkpoints with orbax and resumes where a kill stopped it.

    python tests/scripts/train_and_checkpoint.py CKPT_DIR OUT_FILE [ID PROCESSES PORT]

It trains a two-layer MLP with ``od.skip_spikes(od.accumulate(od.lookahead(adam)))`` for
``STEPS`` micro-batches (two of them spikes, which are skipped) and saves the params and
the whole optimizer state with an ``orbax.checkpoint.CheckpointManager`` (asynchronously)
every ``SAVE_EVERY`` steps, so a checkpoint falls inside an accumulation window, inside a
Lookahead period and with a partly filled spike history. On start it restores the latest
complete checkpoint, if any. It prints, flushed, ``start from step S``, ``step N`` after
each step and ``saving step N`` just before each save, for ``tests/test_faults.py`` to
kill it at; at the end it writes the final params and state (gathered) to ``OUT_FILE``
(``.npz``) and prints ``done``.

With ``ID PROCESSES PORT`` (the process id, the number of processes, the coordinator's port)
it is one process of a ``jax.distributed`` run on ``127.0.0.1:PORT``, the params and the
state sharded over every process' devices; with ``--reference`` after them it also trains
from scratch, uninterrupted, in the same process and writes that run to ``OUT_FILE`` with a
``reference/`` prefix.
"""

from __future__ import annotations

import pathlib
import sys
import time
from typing import Any

STEPS = 20
SAVE_EVERY = 3
SPIKES = (7, 14)  # steps whose targets are scaled up 1000x (their gradients are skipped)
STEP_SECONDS = 0.03  # a step lasts at least this long, so a kill lands between two prints


def batch(step: int) -> tuple[Any, Any]:
  """The micro-batch of a step: the same in every process and after every restart."""
  import numpy as np

  rng = np.random.default_rng(1000 + step)
  x = rng.normal(size=(16, 8)).astype(np.float32)
  y = np.sin(x[:, :4] + x[:, 4:]).astype(np.float32)
  return x, y * (1000.0 if step in SPIKES else 1.0)


def make_tx():
  import optax

  import optaxderived as od

  return od.skip_spikes(
    od.accumulate(od.lookahead(optax.adam(1e-2), sync_period=4), every_k=2),
    window=4,
    min_history=2,
  )


def initial_params() -> dict:
  import numpy as np

  rng = np.random.default_rng(0)
  return {
    "hidden": {
      "kernel": (rng.normal(size=(8, 16)) / 3).astype(np.float32),
      "bias": np.zeros(16, np.float32),
    },
    "out": {
      "kernel": (rng.normal(size=(16, 4)) / 4).astype(np.float32),
      "bias": np.zeros(4, np.float32),  # 4 rows: replicated on an 8-device mesh
    },
  }


def loss(params, x, y):
  import jax.numpy as jnp

  h = jnp.tanh(x @ params["hidden"]["kernel"] + params["hidden"]["bias"])
  return jnp.mean((h @ params["out"]["kernel"] + params["out"]["bias"] - y) ** 2)


def train(ckpt_dir: pathlib.Path | None, log=print) -> dict:
  """Trains to ``STEPS`` (from the latest checkpoint in ``ckpt_dir``, if any; no
  checkpoints when it is None) and returns the final params and state, gathered."""
  import jax
  import numpy as np
  import optax
  import orbax.checkpoint as ocp
  from jax.experimental import multihost_utils
  from jax.sharding import Mesh
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  import optaxderived as od
  from optaxderived._core.state import find_state

  mesh = Mesh(np.array(jax.devices()), ("fsdp",))
  replicated = NamedSharding(mesh, P())
  host = initial_params()
  shardings = jax.tree.map(
    lambda p: NamedSharding(mesh, P("fsdp") if p.shape[0] % mesh.size == 0 else P()), host
  )
  tx = make_tx()
  # The state's shardings: a param-shaped leaf gets its param's, the rest is replicated.
  state_shardings = optax.tree_map_params(
    tx,
    lambda leaf, p, s: s if leaf.shape == p.shape else replicated,
    jax.eval_shape(tx.init, host),
    host,
    shardings,
    transform_non_params=lambda _: replicated,
  )
  init = jax.jit(tx.init, out_shardings=state_shardings)

  def step_fn(params, state, x, y):
    grads = jax.grad(loss)(params, x, y)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  step_fn = jax.jit(step_fn, out_shardings=(shardings, state_shardings), donate_argnums=(0, 1))
  data = NamedSharding(mesh, P("fsdp"))

  params = jax.device_put(host, shardings)
  state = init(params)
  start = 0
  manager = None
  if ckpt_dir is not None:
    manager = ocp.CheckpointManager(
      ckpt_dir,
      options=ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=True),
    )
    latest = manager.latest_step()
    if latest is not None:
      target = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        jax.eval_shape(lambda: {"params": params, "opt_state": state}),
        {"params": shardings, "opt_state": state_shardings},
      )
      restored = manager.restore(latest, args=ocp.args.StandardRestore(target))
      params, state, start = restored["params"], restored["opt_state"], latest
      accumulate = find_state(state, od.AccumulateState, accessor="accumulate")
      lookahead = find_state(state, od.LookaheadState, accessor="lookahead")
      spikes = find_state(state, od.SkipSpikesState, accessor="skip_spikes")
      log(
        f"restored step {latest}: micro_step {int(accumulate.micro_step)} of 2, "
        f"lookahead step {int(lookahead.step)} (sync every 4), spike values recorded "
        f"{int(spikes.count)} (window 4), skipped {int(spikes.num_skipped)}"
      )
  log(f"start from step {start}")
  for step in range(start, STEPS):
    t0 = time.perf_counter()
    x, y = (jax.device_put(a, data) for a in batch(step))
    params, state = step_fn(params, state, x, y)
    jax.block_until_ready(params)
    time.sleep(max(0.0, STEP_SECONDS - (time.perf_counter() - t0)))
    n = step + 1
    log(f"step {n}")
    if manager is not None and n % SAVE_EVERY == 0:
      log(f"saving step {n}")
      manager.save(n, args=ocp.args.StandardSave({"params": params, "opt_state": state}))
  if manager is not None:
    manager.wait_until_finished()
    manager.close()
  spikes = find_state(state, od.SkipSpikesState, accessor="skip_spikes")
  assert int(spikes.num_skipped) == len(SPIKES), int(spikes.num_skipped)
  out = {}
  gathered = multihost_utils.process_allgather(
    {"params": params, "opt_state": state}, tiled=True
  )
  for path, leaf in jax.tree_util.tree_leaves_with_path(gathered):
    out[jax.tree_util.keystr(path)] = np.asarray(leaf)
  return out


def main() -> None:
  ckpt_dir = pathlib.Path(sys.argv[1]).resolve()
  out_file = pathlib.Path(sys.argv[2]).resolve()
  rest = sys.argv[3:]
  reference = "--reference" in rest
  rest = [a for a in rest if a != "--reference"]
  import jax

  if rest:
    process_id, num_processes, port = (int(a) for a in rest)
    jax.distributed.initialize(
      coordinator_address=f"127.0.0.1:{port}",
      num_processes=num_processes,
      process_id=process_id,
      initialization_timeout=120,
      heartbeat_timeout_seconds=30,
    )
  import numpy as np

  log = lambda message: print(message, flush=True)  # noqa: E731
  results = train(ckpt_dir, log)
  if reference:
    results.update({"reference/" + k: v for k, v in train(None, lambda _: None).items()})
  if jax.process_index() == 0:
    np.savez(out_file, **results)
  log("done")
  if rest:
    jax.distributed.shutdown()


if __name__ == "__main__":
  main()
