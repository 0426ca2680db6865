"""bnlib.bench runs end to end (tiny shapes) and writes the JSON the book reads."""

from __future__ import annotations

import json

import pytest

from bnlib import bench


def test_quick_benchmark_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench.main(["--quick", "--rounds", "3", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| measure |" in table and "1 thread" in table
    result = json.loads(out.read_text())
    assert result["meta"]["threads"] == 1
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
        assert r["copy_gbps"] > 0
