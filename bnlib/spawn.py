"""Run a function in N fresh processes joined in a ``torch.distributed`` group, and
collect what each returned or raised: the launcher chapter 10 and the tests use.

    from bnlib.spawn import launch
    values = launch(body, 2, x, dy, backend="gloo", timeout_s=60)

``body(rank, world_size, *args)`` runs in ``world_size`` new Python processes (started
with ``sys.executable``, as ``python -m bnlib.spawn``), each a member of one process
group on 127.0.0.1; ``launch`` returns the values in rank order. Where it comes from:

- a function of an importable module is imported by name in each process (the
  parent's ``sys.path`` is passed on, so a test module works too);
- a function defined in ``__main__`` (a notebook, a script) cannot be imported by
  another process, so its source is sent instead, with the sources of ``helpers`` and
  the lines of ``preamble`` (its imports) before it.

Errors are collected, never lost and never a hang. A process that raises writes the
exception and its traceback; one that dies without a Python error (a crash in C++, a
kill) is reported with its exit code and the end of its output; one still running at
``timeout_s`` is killed and reported as such. If any rank failed, :class:`LaunchError`
is raised, naming each failed rank and why, with every rank's :class:`RankResult` in
its ``results``. ``timeout_s`` bounds the whole run, and half of it is the process
group's timeout for each collective (torch's defaults would be 30 min for gloo, 10 min
for NCCL): a rank waiting for a peer that died fails within it, with the collective's
error.
"""

from __future__ import annotations

import importlib
import inspect
import os
import subprocess
import sys
import tempfile
import time
import traceback
import types
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["LaunchError", "RankResult", "launch"]


@dataclass
class RankResult:
    """What one process did: ``value`` (what body returned) or ``error`` (why it did
    not: the exception and traceback, a crash's exit code and output, or a timeout)."""

    rank: int
    value: Any = None
    error: str | None = None


class LaunchError(RuntimeError):
    """Some ranks failed; ``results`` holds every rank's :class:`RankResult`."""

    def __init__(self, results: list[RankResult]) -> None:
        self.results = results
        failed = [r for r in results if r.error is not None]
        lines = [f"{len(failed)} of {len(results)} processes failed:"]
        lines += [f"--- rank {r.rank}: {r.error.rstrip()}" for r in failed]
        super().__init__("\n".join(lines))


def launch(body: Callable[..., Any], world_size: int, *args: Any,
           backend: str = "gloo", timeout_s: float = 60.0,
           collective_timeout_s: float | None = None,
           helpers: Iterable[Callable[..., Any]] = (), preamble: str = "",
           env: dict[str, str] | None = None) -> list[Any]:
    """Run ``body(rank, world_size, *args)`` in ``world_size`` processes joined in a
    ``backend`` process group; return the values in rank order.

    ``args`` travel by ``torch.save`` (tensors, NumPy arrays, plain Python values).
    ``helpers`` and ``preamble`` are used only for a body defined in ``__main__``
    (see the module's docstring). ``env`` is added to each process's environment
    (``OMP_NUM_THREADS=1`` unless given). ``timeout_s`` bounds the whole run;
    ``collective_timeout_s`` (default half of it) is the process group's timeout, so
    that a rank waiting on a peer that failed reports the failed collective before the
    parent's deadline kills it. Raises :class:`LaunchError` if any rank raised,
    crashed or was still running after ``timeout_s`` seconds, and ValueError for a
    world_size under 1 or a timeout that is not positive.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) \
            or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be positive (seconds), got {timeout_s!r}")
    if collective_timeout_s is None:
        collective_timeout_s = timeout_s / 2
    if not 0 < collective_timeout_s <= timeout_s:
        raise ValueError("collective_timeout_s must be positive and at most timeout_s "
                         f"({timeout_s}), got {collective_timeout_s!r}")
    if body.__module__ == "__main__" or "<locals>" in body.__qualname__:
        code = "\n\n".join(inspect.getsource(f) for f in (*helpers, body))
        job = {"source": preamble + "\n\n" + code, "name": body.__name__}
    else:
        job = {"module": body.__module__, "name": body.__qualname__}
    job.update(args=args, backend=backend, timeout_s=collective_timeout_s,
               sys_path=sys.path)
    with tempfile.TemporaryDirectory(prefix="bnlib-spawn-") as folder:
        folder = Path(folder)
        torch.save(job, folder / "job.pt")
        store = dist.TCPStore("127.0.0.1", 0, world_size, is_master=True,
                              wait_for_workers=False,
                              timeout=timedelta(seconds=timeout_s))
        here = str(Path(__file__).resolve().parent.parent)  # where bnlib is
        path = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)
        child_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path)
        child_env.update(env or {})
        procs = []
        for rank in range(world_size):
            with open(folder / f"{rank}.log", "w") as log:
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "bnlib.spawn", str(folder), str(rank),
                     str(world_size), str(store.port)],
                    stdout=log, stderr=subprocess.STDOUT, env=child_env))
        deadline = time.monotonic() + timeout_s
        for p in procs:
            try:
                p.wait(max(deadline - time.monotonic(), 0.01))
            except subprocess.TimeoutExpired:
                pass
        timed_out = {rank for rank, p in enumerate(procs) if p.poll() is None}
        for rank in timed_out:  # past the deadline: kill, never hang
            procs[rank].kill()
            procs[rank].wait()
        results = [_collect(folder, rank, p.returncode, rank in timed_out, timeout_s)
                   for rank, p in enumerate(procs)]
    if any(r.error is not None for r in results):
        raise LaunchError(results)
    return [r.value for r in results]


def _collect(folder: Path, rank: int, returncode: int, timed_out: bool,
             timeout_s: float) -> RankResult:
    out, err = folder / f"{rank}.pt", folder / f"{rank}.err"
    if out.exists() and not timed_out:
        return RankResult(rank, value=torch.load(out, weights_only=False))
    if err.exists():
        return RankResult(rank, error=err.read_text())
    log = (folder / f"{rank}.log").read_text()[-3000:]
    if timed_out:
        why = f"still running after {timeout_s} s: killed"
    else:
        why = f"exited with code {returncode} without a Python error"
    return RankResult(rank, error=f"{why}; its output:\n{log}")


def _body(job: dict) -> Callable[..., Any]:
    """The function to run, imported by name or built from the sent source."""
    if "module" in job:
        obj: Any = importlib.import_module(job["module"])
        for part in job["name"].split("."):
            obj = getattr(obj, part)
        return obj
    module = types.ModuleType("bnlib_spawned")
    sys.modules[module.__name__] = module
    exec(compile(job["source"], "<bnlib.spawn body>", "exec"), module.__dict__)
    return module.__dict__[job["name"]]


def _worker(folder: Path, rank: int, world_size: int, port: int) -> int:
    """One process: join the group, run the body, save its value or its error."""
    job = torch.load(folder / "job.pt", weights_only=False)
    sys.path[:0] = [p for p in job["sys_path"] if p not in sys.path]
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # the loopback interface
    torch.set_num_threads(1)
    limit = timedelta(seconds=job["timeout_s"])
    try:
        store = dist.TCPStore("127.0.0.1", port, world_size, is_master=False,
                              timeout=limit)
        dist.init_process_group(job["backend"], store=store, rank=rank,
                                world_size=world_size, timeout=limit)
        value = _body(job)(rank, world_size, *job["args"])
        torch.save(value, folder / f"{rank}.pt")
        return 0
    except BaseException as err:  # noqa: BLE001 - reported to the parent
        (folder / f"{rank}.err").write_text(
            f"{type(err).__name__}: {err}\n{traceback.format_exc()}")
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":  # python -m bnlib.spawn FOLDER RANK WORLD_SIZE PORT
    _folder, _rank, _world, _port = sys.argv[1:]
    _code = _worker(Path(_folder), int(_rank), int(_world), int(_port))
    sys.stdout.flush()
    os._exit(_code)  # skip the interpreter's slow teardown of torch
