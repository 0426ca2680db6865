"""bnlib.bench runs end to end (tiny shapes) and writes the JSON the book reads."""

from __future__ import annotations

import json

import pytest
import torch

from bnlib import bench
from bnlib.nn import batch_norm


def test_quick_benchmark_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench.main(["--quick", "--rounds", "3", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| measure |" in table and "1 thread" in table
    result = json.loads(out.read_text())
    meta = result["meta"]
    assert meta["threads"] == 1
    assert meta["cpu"] and meta["machine"] and meta["date"]  # processor model, arch
    names = {r["name"] for r in result["results"]}
    assert names == {"numpy_fast fwd+bwd vs torch native",
                     "bnlib.nn fwd+bwd vs torch.nn", "bnlib.nn eval fwd vs torch.nn",
                     "bnlib.nn fwd+bwd vs torch.nn (small)",
                     "bnlib.nn eval fwd vs torch.nn (resnet18 sizes)",
                     "torch.compile(bnlib.nn) fwd+bwd vs torch.nn"}
    for r in result["results"]:
        assert r["ours_ms"] > 0 and r["torch_ms"] > 0 and r["ratio"] > 0
        assert r["best_ratio"] == pytest.approx(r["ours_min_ms"] / r["torch_min_ms"])
        assert r["ours_min_ms"] <= r["ours_ms"] <= r["ours_max_ms"]
        assert r["copy_gbps"] > 0 and r["clone_gbps"] > 0
        assert set(r["first_call_ms"]) == {"ours", "torch", *r["others"]}
        for o in r["others"].values():
            assert o["min_ms"] <= o["ms"] <= o["max_ms"] and o["gbps"] > 0
            assert o["ratio"] > 0 and o["ratio_to_ours"] > 0
    # the variants timed in the same rounds: autograd through tensor ops next to
    # each bnlib.nn training case; torch.compile(torch.nn): the compiled case's control
    for r in result["results"]:
        others = set(r["others"])
        if r["name"].startswith("bnlib.nn fwd+bwd"):
            assert others == {"autograd through tensor ops"}
        elif r["name"].startswith("torch.compile"):
            assert others == {"torch.compile(torch.nn)"}
        else:
            assert not others


@pytest.mark.parametrize("shape", [(6, 3), (4, 3, 5, 5)])
def test_tensor_ops_batch_norm_matches_bnlib(shape):
    """The autograd-through-tensor-ops variant computes batch norm: the output and
    gradients of bnlib.nn.batch_norm in training mode."""
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    w = torch.rand(shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.randn(shape[1], dtype=torch.float64, requires_grad=True)
    dy = torch.randn(shape, dtype=torch.float64)
    y = bench.bn_tensor_ops(x, w, b)
    y_ref = batch_norm(x, None, None, w, b, training=True)
    assert torch.allclose(y, y_ref, atol=1e-12)
    grads = torch.autograd.grad(y, (x, w, b), dy)
    grads_ref = torch.autograd.grad(y_ref, (x, w, b), dy)
    assert all(torch.allclose(a, c, atol=1e-10)
               for a, c in zip(grads, grads_ref, strict=True))
