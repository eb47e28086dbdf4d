"""The same training bytes with and without AVX-512: the XLA CPU pin.

Importing budgetalloc adds its XLA_FLAGS (AVX2 at most, XLA's own product kernels,
no YNNPACK fusions) unless the user set them. The train stage runs in subprocesses:
with XLA's AVX-512 code allowed it must write the weights of the pinned run, byte
for byte, on all cores and on one.
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


def run_python(code: str, *args: str, xla_flags: str | None, cwd: Path | None = None, one_core: bool = False) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    env.pop("XLA_FLAGS", None)
    if xla_flags is not None:
        env["XLA_FLAGS"] = xla_flags
    first_cpu = min(os.sched_getaffinity(0))
    res = subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, env=env, capture_output=True, text=True,
                         check=False, preexec_fn=(lambda: os.sched_setaffinity(0, {first_cpu})) if one_core else None)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def test_import_pins_the_xla_cpu_flags_unless_the_user_chose_them():
    from budgetalloc import XLA_CPU_FLAGS

    show = "import budgetalloc, os; print(os.environ['XLA_FLAGS'])"
    assert run_python(show, xla_flags=None).strip() == " ".join(XLA_CPU_FLAGS)
    kept = "--xla_cpu_max_isa=AVX512 --xla_cpu_enable_fast_math=false"
    assert run_python(show, xla_flags=kept).strip() == " ".join([kept, *XLA_CPU_FLAGS[1:]])
    assert run_python(show, xla_flags="--xla_cpu_enable_fast_math=false").strip() == (
        " ".join(["--xla_cpu_enable_fast_math=false", *XLA_CPU_FLAGS]))


def _train_hash(d: Path, xla_flags: str | None, label: str, **how) -> str:
    code = ("import sys; from budgetalloc.stages import train; from budgetalloc.stages import run; "
            "sys.argv = ['train'] + sys.argv[1:]; run(train.main)")
    model = d / f"model-{label}"
    run_python(code, "--data", str(d / "fit.parquet"), "--preprocess", str(d / "pre.json"), "--model", str(model),
               "--report", str(d / "train.json"), "--params", str(d / "params.yaml"), xla_flags=xla_flags, cwd=d,
               **how)
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
    one_core = _train_hash(tmp_path, None, "one-core", one_core=True)
    assert _train_hash(tmp_path, "--xla_cpu_max_isa=AVX512", "avx512-one-core", one_core=True) == one_core
