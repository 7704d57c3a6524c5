"""The GPU check kit on CPU: `benchmarks/gpu_check.sh --dry-run` runs every step's dry run (its
command exists, its imports resolve, its configs build: the Qwen2.5-VL-3B config on the meta
device, the weight transfer through a spawned process on CPU tensors), so the kit that a session
lent a GPU runs in one call cannot rot. Also: the wheel list is pinned, the header holds the run
call, and a step's JSON line says failed / timed out / skipped with the reason.

Run: .venv/bin/python -m pytest -q tests/test_gpu_check.py
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
STEPS_PY = ROOT / "benchmarks" / "gpu_steps.py"
STEPS = ("build", "kernel_tests", "kernel_bench", "liger", "policy_update", "weight_transfer", "engine")


def _env(tmp: Path) -> dict[str, str]:
    return {**os.environ, "OUT": str(tmp / "out"), "GPU_CHECK_WORK": str(tmp / "work"), "PYTHON": sys.executable,
            "GPU_CHECK_SITE": str(tmp / "site")}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, Path]:
    tmp = tmp_path_factory.mktemp("gpu_check")
    p = subprocess.run(["bash", str(SCRIPT), "--dry-run"], env=_env(tmp), capture_output=True, text=True,
                       timeout=300, cwd=tmp)
    return p, tmp / "out"


def test_dry_run_reports_every_step(dry_run: tuple[subprocess.CompletedProcess, Path]) -> None:
    p, out = dry_run
    lines = [json.loads(x) for x in (out / "gpu_check.jsonl").read_text().splitlines() if x.strip()]
    by_step = {x["step"]: x for x in lines}
    assert list(by_step) == list(STEPS), p.stdout[-2000:]
    for step in STEPS:
        assert by_step[step]["status"] == "dry-run", (step, by_step[step]["reason"], p.stdout[-3000:], p.stderr[-2000:])
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    summary = (out / "summary.md").read_text()
    assert summary.count("| dry-run |") == len(STEPS)
    assert (out / "gpu_check.log").stat().st_size > 0


def test_dry_run_builds_the_real_configs(dry_run: tuple[subprocess.CompletedProcess, Path]) -> None:
    _, out = dry_run
    by_step = {x["step"]: x for x in map(json.loads, (out / "gpu_check.jsonl").read_text().splitlines())}
    pu = by_step["policy_update"]["figures"]
    assert 3.5 < pu["params_b"] < 4.1  # Qwen2.5-VL-3B: 3.75B parameters, built on the meta device
    assert pu["arms"][:2] == ["padded", "packed_sdpa"]
    assert by_step["kernel_tests"]["figures"]["collected"] > 0
    wt = by_step["weight_transfer"]["figures"]["methods"]
    group = wt.pop("group_1rank")  # the sync's weight-update group on one rank (gloo here, NCCL on the GPU)
    assert group["backend"] == "gloo" and group["s"] > 0 and "error" not in group, group
    assert set(wt) == {"ipc_per_tensor", "ipc_bucket", "ipc_spyglass", "disk"} and all("s_per_gb" in r for r in wt.values())
    carried = {**by_step["liger"]["figures"]["carried"], **by_step["engine"]["figures"]["carried"]}
    assert {"liger_kernel", "bm25s", "rapidocr", "imagehash", "html2text"} <= set(carried)


def test_wheel_list_is_pinned() -> None:
    names = []
    for line in (ROOT / "benchmarks" / "gpu_wheels.txt").read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*==[0-9][0-9A-Za-z.+!-]*", line.strip()), line
        names.append(line.split("==")[0].lower().replace("_", "-"))
    assert len(names) == len(set(names)), "two versions of one wheel stop the whole install"
    assert {"liger-kernel", "bm25s", "rapidocr", "imagehash", "html2text"} <= set(names)


def test_header_holds_the_run_call_and_the_download_line() -> None:
    head = SCRIPT.read_text().split("set -uo pipefail", 1)[0]
    for needed in ('carry:     [".whl"]', "timeout_s: 540", "bash benchmarks/gpu_check.sh",
                   "pip download --no-deps --only-binary=:all: --python-version 3.12", "manylinux_2_17_x86_64",
                   "-d .whl", "/.whl/", "benchmarks/README.md", "README.md"):
        assert needed in head, needed


def _record(tmp: Path, *args: str, result: dict | None = None, log: str = "") -> dict:
    res, lg = tmp / "r.json", tmp / "l.log"
    res.write_text(json.dumps(result or {}))
    lg.write_text(log)
    out = subprocess.run([sys.executable, str(STEPS_PY), "record", "policy_update", "--result", str(res),
                          "--log", str(lg), *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_record_says_why_a_step_did_not_pass(tmp_path: Path) -> None:
    partial = {"status": "ok", "reason": "", "figures": {"arms": {"padded": {"tokens_per_s": 1}}}}
    timed_out = _record(tmp_path, "--rc", "124", "--timeout", "170", result=partial)
    assert timed_out["status"] == "failed" and "timed out after 170 s" in timed_out["reason"]
    assert timed_out["figures"]["arms"]["padded"]["tokens_per_s"] == 1  # partial figures are kept
    crashed = _record(tmp_path, "--rc", "1", log="Traceback\nRuntimeError: boom\n")
    assert crashed["status"] == "failed" and crashed["reason"] == "RuntimeError: boom"
    skipped = _record(tmp_path, "--rc", "0", result={"status": "skipped", "reason": "no CUDA device"})
    assert (skipped["status"], skipped["reason"]) == ("skipped", "no CUDA device")
    spent = _record(tmp_path, "--skip", "the budget is spent")
    assert spent["status"] == "skipped" and "budget" in spent["reason"]
    imports = _record(tmp_path, "--mode", "dry-run", "--imports-rc", "1", "--imports-error", "import bm25s: X",
                      result={"status": "dry-run"})
    assert imports["status"] == "failed" and "bm25s" in imports["reason"]


def test_a_step_without_time_left_is_skipped_not_run(tmp_path: Path) -> None:
    p = subprocess.run(["bash", str(SCRIPT), "--steps", "weight_transfer", "--budget", "1"], env=_env(tmp_path),
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    line = json.loads((tmp_path / "out" / "gpu_check.jsonl").read_text().splitlines()[0])
    assert line["step"] == "weight_transfer" and line["status"] == "skipped" and "budget" in line["reason"]
    assert "| 5 weight transfer, IPC and disk | skipped |" in (tmp_path / "out" / "summary.md").read_text()
