"""bnlib.repro: one arithmetic path on every x86-64 CPU, seeds, and the verdict of
scripts/check_arithmetic.py (can this machine reproduce the stored outputs?).

The pinning acts when a library first loads, so each case runs in a fresh interpreter.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bnlib import repro

ROOT = Path(__file__).resolve().parent.parent
STORED = json.loads((ROOT / "book" / "data" / "arithmetic.json").read_text())
AVX2 = repro.cpu_has_avx2()

PROBE = """
import json, os, warnings
warnings.simplefilter("error")  # a late pinning must not go unnoticed
import bnlib, numpy, torch
from threadpoolctl import threadpool_info
torch.ones(2).exp()
print(json.dumps({
    "env": {k: os.environ.get(k) for k in bnlib.repro.PINNED_ENV},
    "aten": torch.backends.cpu.get_cpu_capability(),
    "openblas": [i.get("architecture") for i in threadpool_info()
                 if i["internal_api"] == "openblas"],
    "fingerprint": bnlib.repro.fingerprint(),
}))
"""


def _fresh(code: str, **env: str | None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items()
             if k not in repro.PINNED_ENV and k != repro.MODE_VARIABLE}
    clean.update({k: v for k, v in env.items() if v is not None})
    return subprocess.run([sys.executable, "-c", code], env=clean, capture_output=True,
                          text=True, timeout=120)


def _probe(**env: str | None) -> dict:
    done = _fresh(PROBE, **env)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pinned_import_sets_every_library_on_the_book_path():
    got = _probe(BNLIB_ARITHMETIC="pinned", MKL_CBWR="AVX512")  # a stray setting
    for key, value in repro.PINNED_ENV.items():
        if key == "OPENBLAS_CORETYPE" and not AVX2:
            assert got["env"][key] is None, "Haswell kernels need AVX2"
        else:
            assert got["env"][key] == value, key
    if AVX2:
        assert got["aten"] == "AVX2"
        assert got["openblas"] == ["Haswell"]


def test_importing_bnlib_without_the_variable_changes_nothing():
    """A practitioner's training script keeps its own (faster) code paths."""
    got = _probe(BNLIB_ARITHMETIC=None)
    assert all(got["env"][k] is None for k in repro.PINNED_ENV)
    native = _probe(BNLIB_ARITHMETIC="native")
    assert native["env"] == got["env"] and native["aten"] == got["aten"]


@pytest.mark.skipif(not AVX2, reason="the pinned path is x86-64 with AVX2")
def test_pinned_bits_are_those_the_stored_outputs_were_made_with():
    """The fingerprint (torch and NumPy products, convolutions, exp, tanh, ...) on
    the pinned path equals the stored one; on this CPU's native path the products
    give other bits, which is why the pinning exists."""
    stored = STORED["fingerprint"]
    if (stored["torch"], stored["numpy"]) != (torch.__version__.split("+")[0],
                                              np.__version__):
        pytest.skip("other torch/NumPy versions: other bits are expected")
    assert _probe(BNLIB_ARITHMETIC="pinned")["fingerprint"] == stored


def test_pinning_after_numpy_loaded_warns():
    done = _fresh("import numpy, os; os.environ['BNLIB_ARITHMETIC'] = 'pinned'; "
                  "import bnlib")
    assert done.returncode == 0
    assert "after numpy loaded" in done.stderr and "Restart the kernel" in done.stderr


@pytest.mark.skipif(not AVX2, reason="the pinned path is x86-64 with AVX2")
def test_setup_warns_when_torch_already_runs_another_path():
    code = ("import torch; torch.ones(1).exp(); import os; "
            "os.environ['BNLIB_ARITHMETIC'] = 'pinned'; import warnings; "
            "warnings.simplefilter('ignore');\n"
            "import bnlib.repro as r\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always'); r.setup()\n"
            "print([str(x.message) for x in w])")
    done = _fresh(code, ATEN_CPU_CAPABILITY="default")
    assert done.returncode == 0, done.stderr
    assert "not pinned in this kernel" in done.stdout
    assert "ATen capability DEFAULT" in done.stdout


def test_a_wrong_mode_is_named():
    done = _fresh("import bnlib", BNLIB_ARITHMETIC="fast")
    assert done.returncode != 0
    assert "BNLIB_ARITHMETIC must be 'pinned' or 'native', got 'fast'" in done.stderr


def test_setup_makes_runs_repeatable():
    rng = repro.setup(seed=5)
    a = (rng.standard_normal(3), torch.randn(3))
    rng = repro.setup(seed=5)
    b = (rng.standard_normal(3), torch.randn(3))
    np.testing.assert_array_equal(a[0], b[0])
    assert torch.equal(a[1], b[1])
    assert torch.get_num_threads() == 1
    torch.use_deterministic_algorithms(False)


# ----------------------------------------------- scripts/check_arithmetic.py's verdict

check = _load_script("check_arithmetic")


def _mine(**changes: str) -> dict:
    return {**STORED["fingerprint"], **changes}


def test_a_matching_machine_compares_outputs():
    mode, line = check.decide(STORED, _mine())
    assert mode == "compare" and "every stored output is compared" in line


def test_a_machine_that_cannot_match_checks_claims_and_says_why(monkeypatch):
    monkeypatch.setattr(check.platform, "machine", lambda: "arm64")
    mode, line = check.decide(STORED, _mine(gemm="0000000000"))
    assert mode == "claims"
    assert "this is arm64, not x86-64" in line and "every assert must hold" in line
    mode, line = check.decide(STORED, _mine(torch="2.99.0", gemm="0"))
    assert mode == "claims" and "torch 2.99.0" in line


def test_a_machine_that_should_match_names_the_operations_that_differ(monkeypatch):
    monkeypatch.setattr(check.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(repro, "cpu_has_avx2", lambda: True)
    mode, line = check.decide(STORED, _mine(conv_bwd="0", np_exp="1"))
    assert mode == "error"
    assert "other bits for: conv_bwd, np_exp" in line


def test_the_mode_can_be_forced():
    assert check.decide(STORED, _mine(gemm="0"), "compare")[0] == "compare"
    assert check.decide(STORED, _mine(), "claims")[0] == "claims"
    mode, line = check.decide(STORED, _mine(), "both")
    assert mode == "error" and "not 'both'" in line
