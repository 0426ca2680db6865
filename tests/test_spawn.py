"""bnlib.spawn.launch: N processes in a gloo group return their values in rank order;
a rank that raises, crashes or hangs is reported by rank, with why, and never hangs the
caller."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist

from bnlib.spawn import LaunchError, RankResult, launch


def _all_reduce(rank, world_size, x):
    t = x * (rank + 1)
    dist.all_reduce(t)
    return {"rank": rank, "world_size": world_size, "sum": t,
            "backend": dist.get_backend()}


def test_values_come_back_in_rank_order():
    x = torch.arange(3, dtype=torch.float64)
    out = launch(_all_reduce, 3, x, timeout_s=180)  # generous: a loaded CI machine
    assert [o["rank"] for o in out] == [0, 1, 2]
    assert all(o["world_size"] == 3 and o["backend"] == "gloo" for o in out)
    for o in out:  # every rank holds (1 + 2 + 3) * x
        torch.testing.assert_close(o["sum"], 6 * x)


def _raise_on_rank_1(rank, world_size):
    if rank == 1:
        raise ValueError("rank 1 refuses")
    t = torch.ones(1)
    dist.all_reduce(t)  # waits for rank 1, which never comes: fails at the timeout
    return t


def test_an_error_names_the_rank_and_the_peer_fails_within_the_timeout():
    t0 = time.monotonic()
    with pytest.raises(LaunchError) as info:
        launch(_raise_on_rank_1, 2, timeout_s=180, collective_timeout_s=10)
    assert time.monotonic() - t0 < 180  # rank 0 failed in its collective, not killed
    results = info.value.results
    assert [r.rank for r in results] == [0, 1]
    assert "ValueError: rank 1 refuses" in results[1].error
    assert results[0].error is not None and results[0].value is None
    assert "killed" not in results[0].error  # its collective failed within 10 s
    assert "rank 1: ValueError: rank 1 refuses" in str(info.value)


def _crash_or_hang(rank, world_size):
    if rank == 0:
        os._exit(3)  # dies without a Python error, as a C++ abort does
    time.sleep(600)


def test_a_crash_and_a_hang_are_reported_not_waited_for():
    t0 = time.monotonic()
    with pytest.raises(LaunchError) as info:
        launch(_crash_or_hang, 2, timeout_s=40)
    assert time.monotonic() - t0 < 60
    crash, hang = info.value.results
    assert "exited with code 3 without a Python error" in crash.error
    assert "still running after 40 s: killed" in hang.error


def test_bad_arguments_raise_before_any_process_starts():
    with pytest.raises(ValueError, match="world_size must be an int >= 1"):
        launch(_all_reduce, 0)
    with pytest.raises(ValueError, match="timeout_s must be positive"):
        launch(_all_reduce, 2, timeout_s=0)
    assert RankResult(0, value=1).error is None


def test_a_body_defined_in_main_travels_as_source(tmp_path):
    """A notebook's function cannot be imported by another process: its source,
    its helpers' and the preamble's imports are sent instead."""
    script = tmp_path / "nb.py"
    script.write_text(
        "import torch\n"
        "import torch.distributed as dist\n"
        "from bnlib.spawn import launch\n"
        "def double(t):\n"
        "    return 2 * t\n"
        "def body(rank, world_size):\n"
        "    t = double(torch.tensor([rank + 1.0]))\n"
        "    dist.all_reduce(t)\n"
        "    return t.item()\n"
        "if __name__ == '__main__':\n"
        "    imports = 'import torch\\nimport torch.distributed as dist'\n"
        "    print(launch(body, 2, helpers=[double], timeout_s=180,\n"
        "                 preamble=imports))\n"
    )
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=240)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[6.0, 6.0]"
