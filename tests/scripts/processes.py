"""Child processes for the tests that start Python processes: bounded in time, always reaped.

``Children`` starts the processes of one run, reads their output lines on threads (so a
silent child never blocks the test), waits for a line or for the end with a deadline, and
kills (SIGKILL) whatever still runs when it exits, also on a failure or a timeout.
"""

from __future__ import annotations

import os
import pathlib
import queue
import socket
import subprocess
import sys
import threading
import time

SCRIPTS = pathlib.Path(__file__).resolve().parent


def free_port() -> int:
  """A TCP port of 127.0.0.1 that was free a moment ago (for a jax.distributed coordinator)."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def child_env(devices: int | None = None, **extra: str) -> dict:
  """The environment of a child: CPU only, ``devices`` host devices (the test process'
  ``XLA_FLAGS`` replaced), one thread pool per child."""
  env = dict(os.environ)
  env["JAX_PLATFORMS"] = "cpu"
  env.pop("XLA_FLAGS", None)
  if devices is not None:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env.update(extra)
  return env


class Children:
  """The processes of one run: ``with Children(...) as run: run.wait_for_line(...)``."""

  def __init__(self, commands: list[list[str]], env: dict, log_dir: pathlib.Path, name: str):
    self.lines: list[list[tuple[float, str]]] = [[] for _ in commands]
    self._queue: queue.Queue = queue.Queue()
    self.procs: list[subprocess.Popen] = []
    self._readers: list[threading.Thread] = []
    self.logs = [log_dir / f"{name}.{i}.stderr" for i in range(len(commands))]
    self.t0 = time.perf_counter()
    try:
      for i, command in enumerate(commands):
        with open(self.logs[i], "w") as stderr:
          proc = subprocess.Popen(
            [sys.executable, *command],
            stdout=subprocess.PIPE,
            stderr=stderr,
            env=env,
            text=True,
            bufsize=1,
          )
        self.procs.append(proc)
        reader = threading.Thread(target=self._read, args=(i, proc), daemon=True)
        reader.start()
        self._readers.append(reader)
    except BaseException:
      self.kill()
      raise

  def _read(self, i: int, proc: subprocess.Popen) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
      stamped = (time.perf_counter() - self.t0, line.rstrip("\n"))
      self.lines[i].append(stamped)
      self._queue.put((i, stamped[1]))
    self._queue.put((i, None))  # end of output

  def wait_for_line(self, line: str, timeout: float, child: int = 0) -> bool:
    """Waits until ``child`` prints ``line`` (True) or every child has ended (False)."""
    deadline = time.perf_counter() + timeout
    ended: set[int] = set()
    while len(ended) < len(self.procs):
      remaining = deadline - time.perf_counter()
      if remaining <= 0:
        raise TimeoutError(f"no {line!r} within {timeout}s:\n{self.report()}")
      try:
        i, text = self._queue.get(timeout=remaining)
      except queue.Empty:
        continue
      if text is None:
        ended.add(i)
      elif i == child and text == line:
        return True
    return False

  def wait(self, timeout: float) -> list[int]:
    """Waits for every child to end; their return codes."""
    deadline = time.perf_counter() + timeout
    for proc in self.procs:
      try:
        proc.wait(timeout=max(0.0, deadline - time.perf_counter()))
      except subprocess.TimeoutExpired:
        raise TimeoutError(f"still running after {timeout}s:\n{self.report()}") from None
    return [proc.returncode for proc in self.procs]

  def kill(self) -> None:
    """SIGKILL to every child still running, then reap them and close their pipes."""
    for proc in self.procs:
      if proc.poll() is None:
        proc.kill()
    for proc in self.procs:
      try:
        proc.wait(timeout=30)
      except subprocess.TimeoutExpired:  # pragma: no cover
        pass
    for reader in self._readers:
      reader.join(timeout=10)
    for proc in self.procs:
      if proc.stdout is not None:
        proc.stdout.close()

  def seconds(self) -> float:
    return time.perf_counter() - self.t0

  def report(self) -> str:
    parts = []
    for i, proc in enumerate(self.procs):
      stderr = self.logs[i].read_text()[-3000:] if self.logs[i].exists() else ""
      stdout = "\n".join(text for _, text in self.lines[i][-20:])
      parts.append(f"--- child {i} (rc={proc.poll()}) stdout:\n{stdout}\n--- stderr:\n{stderr}")
    return "\n".join(parts)

  def __enter__(self) -> Children:
    return self

  def __exit__(self, *exc) -> None:
    self.kill()
