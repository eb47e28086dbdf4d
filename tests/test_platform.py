"""The same training bytes with and without AVX-512: the XLA instruction-set pin.

Importing budgetalloc caps the instruction set XLA compiles for at AVX2 (unless the
user's XLA_FLAGS names one). The train stage runs in subprocesses with AVX-512
allowed and capped, and must write byte-identical weights; capping further (SSE4.2)
changes them, which shows the weights do depend on the instruction set.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from budgetalloc.studies.simulate import SimulateParams, simulate_trial

ROOT = Path(__file__).resolve().parents[1]
PARAMS = {"seed": 5, "train": {"hidden": 32, "head_hidden": 8, "epochs": 4, "batch_size": 256, "patience": 2}}


def run_python(code: str, *args: str, xla_flags: str | None, cwd: Path | None = None) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    env.pop("XLA_FLAGS", None)
    if xla_flags is not None:
        env["XLA_FLAGS"] = xla_flags
    res = subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, env=env, capture_output=True, text=True,
                         check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def test_import_pins_the_isa_unless_the_user_chose_one():
    show = "import budgetalloc, os; print(os.environ['XLA_FLAGS'])"
    assert run_python(show, xla_flags=None).strip() == "--xla_cpu_max_isa=AVX2"
    kept = "--xla_cpu_max_isa=AVX512 --xla_cpu_enable_fast_math=false"
    assert run_python(show, xla_flags=kept).strip() == kept
    assert run_python(show, xla_flags="--xla_cpu_enable_fast_math=false").strip() == (
        "--xla_cpu_enable_fast_math=false --xla_cpu_max_isa=AVX2")


def _train_hash(d: Path, xla_flags: str | None, label: str) -> str:
    code = ("import sys; from budgetalloc.stages import train; from budgetalloc.stages import run; "
            "sys.argv = ['train'] + sys.argv[1:]; run(train.main)")
    model = d / f"model-{label}"
    run_python(code, "--data", str(d / "fit.parquet"), "--preprocess", str(d / "pre.json"), "--model", str(model),
               "--report", str(d / "train.json"), "--params", str(d / "params.yaml"), xla_flags=xla_flags, cwd=d)
    digest = hashlib.sha256()
    for f in sorted(p for p in model.rglob("*") if p.is_file()):
        digest.update(f.relative_to(model).as_posix().encode() + f.read_bytes())
    return digest.hexdigest()


@pytest.mark.slow
@pytest.mark.skipif("avx512f" not in Path("/proc/cpuinfo").read_text(errors="ignore"),
                    reason="needs a CPU with AVX-512 to compare against")
def test_train_stage_gives_the_same_weights_with_and_without_avx512(tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    simulate_trial(SimulateParams(n_users=6000), seed=2).frame.to_parquet(tmp_path / "fit.parquet")
    pinned = _train_hash(tmp_path, None, "pinned")  # the package's pin: AVX2 on this AVX-512 machine
    assert _train_hash(tmp_path, "--xla_cpu_max_isa=AVX512", "avx512") == pinned
    assert _train_hash(tmp_path, "--xla_cpu_max_isa=SSE4_2", "sse42") != pinned
