"""A small crash-tolerant process pool for running untrusted queries.

Why not ``concurrent.futures.ProcessPoolExecutor``: when one of its workers dies, the
whole pool breaks and every pending task fails with it, and it cannot kill a worker that
is stuck. Here the parent knows which task each worker is running, so

* a worker that dies (segfault, out-of-memory kill, ``os._exit``) costs exactly its own
  task, which is reported as a :class:`WorkerFailure`, and the worker is replaced;
* a task that runs past its hard limit gets its worker killed and replaced (a backstop
  behind the SQLite progress handler, for time spent outside the SQLite VM).

Workers are fresh interpreters (``python -m kid.evaluation.pool``), so the pool is safe to
use from a process that already runs threads (PyTorch, tokenizers) and from scripts
without a main guard. POSIX only (file descriptors are passed to the worker).
"""

from __future__ import annotations

import importlib
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any, Callable, Sequence


@dataclass(frozen=True)
class WorkerFailure:
    """A task whose worker crashed or had to be killed, or whose function raised."""

    message: str


class WorkerStartupError(RuntimeError):
    """Worker processes die before they can take a task (e.g. the task function cannot be imported)."""


def default_num_workers() -> int:
    """Worker processes to use by default: the usable CPUs, at most 8."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(8, cpus))


def _function_reference(fn: Callable) -> str:
    module, qualname = fn.__module__, fn.__qualname__
    if module == "__main__" or "<" in qualname:
        raise ValueError(f"task function {qualname} must be defined at module level of an importable module")
    return f"{module}:{qualname}"


def _resolve(reference: str) -> Callable:
    module, qualname = reference.split(":")
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _worker_main(fd: int, reference: str) -> None:
    """Entry point of a worker process: receive (index, payload), send (index, ok, result)."""
    # Ctrl-C goes to the whole process group; the parent decides what to do.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    conn = Connection(fd)
    task_fn = _resolve(reference)
    conn.send("ready")
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        index, payload = message
        try:
            result = (index, True, task_fn(payload))
        except Exception as exc:
            result = (index, False, f"{type(exc).__name__}: {exc}")
        try:
            conn.send(result)
        except (pickle.PicklingError, TypeError) as exc:
            conn.send((index, False, f"result cannot be sent back: {exc}"))


class _Worker:
    """One worker: a fresh interpreter (``python -m kid.evaluation.pool``) on a socket pair.

    A plain subprocess, rather than ``multiprocessing``, so that no main module is
    re-imported (scripts without an ``if __name__ == "__main__"`` guard work) and no
    threads are forked.
    """

    def __init__(self, reference: str) -> None:
        parent_sock, child_sock = socket.socketpair()
        env = dict(os.environ)
        # The worker must import what the parent imports (e.g. a package on sys.path only).
        env["PYTHONPATH"] = os.pathsep.join(p for p in [os.getcwd(), *sys.path] if p)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "kid.evaluation.pool", str(child_sock.fileno()), reference],
            pass_fds=[child_sock.fileno()],
            env=env,
            stdin=subprocess.DEVNULL,
        )
        child_sock.close()
        self.conn = Connection(parent_sock.detach())
        self.ready = False
        self.index: int | None = None
        self.started = 0.0

    def submit(self, index: int, payload: Any) -> None:
        self.index = index
        self.started = time.monotonic()
        self.conn.send((index, payload))

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, kill: bool = False) -> None:
        if not kill:
            try:
                self.conn.send(None)
                self.process.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                kill = True
        if kill and self.alive():
            self.process.kill()
        self.process.wait()
        self.conn.close()


def run_tasks(
    task_fn: Callable[[Any], Any],
    payloads: Sequence[Any],
    *,
    num_workers: int | None = None,
    hard_limit_s: float | Callable[[Any], float] = 600.0,
    on_done: Callable[[int, Any], None] | None = None,
) -> list[Any]:
    """Run ``task_fn(payload)`` for every payload in worker processes; results in input order.

    ``task_fn`` must be a module-level (picklable) function. A task whose worker
    crashed or exceeded ``hard_limit_s`` (a number, or a function of the payload) gets a
    :class:`WorkerFailure`; an exception raised by ``task_fn`` also becomes a
    ``WorkerFailure`` carrying its text. ``num_workers=0`` runs everything in this
    process (no isolation; for debugging). ``on_done(index, result)`` is called as
    results arrive (progress bars).
    """
    n = len(payloads)
    results: list[Any] = [None] * n
    if n == 0:
        return results
    if num_workers is None:
        num_workers = default_num_workers()
    if num_workers <= 0:
        for i, payload in enumerate(payloads):
            try:
                results[i] = task_fn(payload)
            except Exception as exc:
                results[i] = WorkerFailure(f"{type(exc).__name__}: {exc}")
            if on_done:
                on_done(i, results[i])
        return results

    limit_of = hard_limit_s if callable(hard_limit_s) else (lambda _payload: float(hard_limit_s))
    reference = _function_reference(task_fn)
    pending = deque(range(n))
    workers = [_Worker(reference) for _ in range(min(num_workers, n))]
    done = 0
    startup_failures = 0

    def finish(i: int, value: Any) -> None:
        nonlocal done
        results[i] = value
        done += 1
        if on_done:
            on_done(i, value)

    try:
        while done < n:
            for w in workers:
                if w.index is None and pending and w.alive():
                    i = pending.popleft()
                    try:
                        w.submit(i, payloads[i])
                    except OSError:  # died meanwhile; the checks below replace it
                        w.index = None
                        pending.appendleft(i)
            # A worker's exit closes its end of the socket, which also wakes this wait.
            wait([w.conn for w in workers], timeout=0.5)
            now = time.monotonic()
            for k, w in enumerate(workers):
                failure: str | None = None
                try:
                    while w.conn.poll():
                        message = w.conn.recv()
                        if message == "ready":
                            w.ready = True
                            continue
                        index, ok, value = message
                        w.index = None
                        finish(index, value if ok else WorkerFailure(value))
                except (EOFError, OSError):
                    failure = "worker process crashed"
                if failure is None and not w.alive():
                    failure = f"worker process crashed (exit code {w.process.returncode})"
                if failure is None and w.index is not None and now - w.started > limit_of(payloads[w.index]):
                    failure = f"worker killed after the hard limit of {limit_of(payloads[w.index]):g} s"
                if failure is None:
                    continue
                index, was_ready = w.index, w.ready
                w.stop(kill=True)
                if not was_ready:
                    startup_failures += 1
                    if index is not None:
                        pending.appendleft(index)
                    if startup_failures >= 3:
                        raise WorkerStartupError(
                            f"worker processes for {reference} exit before becoming ready "
                            f"(exit code {w.process.returncode}); see the worker's error output above"
                        )
                elif index is not None:
                    finish(index, WorkerFailure(failure))
                workers[k] = _Worker(reference)
    finally:
        for w in workers:
            w.stop(kill=w.index is not None or not w.alive())
    return results


if __name__ == "__main__":
    _worker_main(int(sys.argv[1]), sys.argv[2])
