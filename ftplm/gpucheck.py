"""`ftplm gpu-check` (`make gpu-check`): everything a lent GPU should confirm, in one prepared run of a few minutes.

GPU time is scarce and comes in short leases, so the checks run in one process, in order of value, and the summary
JSON is rewritten after every step: a run cut off by its time limit still returns what it measured. On a machine
without CUDA the same steps run on the `tiny` preset (that is how the test suite covers this file).

Steps: the CUDA-marked tests; `bench train` (tokens/s, MFU against the measured peak, memory, largest batch); a
short FTP and GPT training, stopped and resumed, compared with an uninterrupted run; `bench decode` on the trained
FTP model; DDP over NCCL with torchrun when there is more than one GPU.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from ftplm.bench.decode import bench_decode
from ftplm.bench.train import bench_train
from ftplm.checkpoint import write_json
from ftplm.data import prepare
from ftplm.errors import FtplmError
from ftplm.experiment import run_state
from ftplm.machine import provenance
from ftplm.train import read_log

CUDA_TESTS = "tests/test_cuda.py"


def _tests(out: Path) -> dict[str, Any]:
    """The CUDA-marked tests, in a pytest of their own (skipped where there is no GPU: they say so)."""
    if not Path(CUDA_TESTS).is_file():
        return {"skipped": f"{CUDA_TESTS} not found (run from the repository root)"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", CUDA_TESTS, "-o", "addopts=", "-q", "-rs", "-p", "no:cacheprovider"],
        capture_output=True,
        text=True,
        check=False,
    )
    (out / "cuda-tests.log").write_text(proc.stdout + proc.stderr, encoding="utf-8")
    counts = [line for line in proc.stdout.splitlines() if re.match(r"\d+ (passed|failed|skipped|error)", line)]
    return {"returncode": proc.returncode, "summary": counts[-1] if counts else proc.stderr.strip()[-500:]}


def _ftplm(*args: object) -> list[str]:
    """The command line `python -m ftplm ARGS`."""
    return [sys.executable, "-m", "ftplm", *map(str, args)]


def _train_cmd(data: Path, run: Path, model_type: str, preset: str, steps: int) -> list[str]:
    # eager: torch.compile would cost each of the four short runs a minute or more of a scarce lease
    settings = f"save_interval={max(1, steps // 4)} eval_interval={steps} eval_iters=4 warmup_steps=2 compile=false"
    options = f"--model {model_type} --preset {preset} --max-steps {steps} --no-progress".split()
    return _ftplm("train", "--data", data, "--out", run, *options, *(a for s in settings.split() for a in ("--set", s)))


def _killed_halfway(cmd: list[str], run: Path, steps: int, timeout: float = 600.0) -> int | None:
    """Run `cmd` and SIGKILL it once its latest checkpoint is at half its steps or more, as a lost machine would;
    the step it can resume from, or None if it finished first."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if _latest_step(run) >= steps // 2:
            proc.kill()
            proc.wait()
            return _latest_step(run)
        time.sleep(0.01)
    if proc.poll() is None:
        proc.kill()
        raise FtplmError(f"training did not reach step {steps // 2} in {timeout:.0f}s")
    return None


def _latest_step(run: Path) -> int:
    """The step of the run's latest checkpoint (0 before the first): `latest` moves only to a complete one."""
    state = run_state(run)
    return state["step"] if state else 0


def _train_and_resume(data: Path, out: Path, model_type: str, preset: str, steps: int) -> dict[str, Any]:
    """Train `steps` steps; train again, killed halfway and resumed; the two final weights must agree (bit for bit
    on CPU; on CUDA reductions need not be deterministic, so the largest difference is what is reported)."""
    whole, killed = out / f"{model_type}-whole", out / model_type
    for run in (whole, killed):
        shutil.rmtree(run, ignore_errors=True)
    subprocess.run(_train_cmd(data, whole, model_type, preset, steps), check=True, capture_output=True)
    resumed_from = _killed_halfway(_train_cmd(data, killed, model_type, preset, steps), killed, steps)
    resume = _ftplm("train", "--data", data, "--out", killed, "--resume", "--no-progress")
    subprocess.run(resume, check=True, capture_output=True)
    a, b = (load_file(str(run / "latest" / "model.safetensors")) for run in (whole, killed))
    max_diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    state = json.loads((whole / "trainer_state.json").read_text())
    val = [r["val"] for r in read_log(whole) if "val" in r]
    return {
        "steps": steps,
        "tokens": state["tokens"],
        "seconds": state["elapsed"],
        "tokens_per_s": state["tokens"] / state["elapsed"],
        "val_ppl": val[-1]["ppl"] if val else None,
        "resumed_from_step": resumed_from,
        "resume_max_abs_diff": max_diff,
        "resume_exact": max_diff == 0.0,
        "run": str(killed),
    }


def _ddp(data: Path, out: Path, preset: str, steps: int) -> dict[str, Any]:
    """FTP trained with torchrun on every GPU (NCCL); more than one is needed."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus < 2:
        return {"skipped": f"{gpus} GPU(s): DDP needs at least 2"}
    run = out / "ddp"
    shutil.rmtree(run, ignore_errors=True)
    ftp = _ftplm("train", "--model", "ftp", "--preset", preset, "--data", data, "--out", run, "--max-steps", steps)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}", *ftp[1:]]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    (out / "ddp.log").write_text(proc.stdout + proc.stderr, encoding="utf-8")
    return {
        "gpus": gpus,
        "returncode": proc.returncode,
        "seconds": time.perf_counter() - t0,
        "checkpoint": (run / "latest" / "model.safetensors").is_file(),
    }


def _prepare_any(data_dir: Path) -> dict[str, Any]:
    """wiki-vital where its package is installed, else this interpreter's standard library (always there, also on
    a GPU machine that can fetch nothing)."""
    try:
        return prepare("wiki-vital", data_dir)
    except FtplmError:
        return prepare("python-code", data_dir)


def gpu_check(
    out: str | Path = "gpu-check", preset: str | None = None, steps: int = 40, data: str | Path | None = None
) -> dict[str, Any]:
    """Run every step; a step that fails is recorded with its error and the next one still runs.

    preset: default `base` on CUDA, `tiny` elsewhere; data: a prepared data directory (default: prepared into
    OUT/data once, see _prepare_any).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    preset = preset or ("base" if cuda else "tiny")
    if steps < 2:
        raise FtplmError("--steps must be at least 2 (training stops halfway and resumes)")
    summary: dict[str, Any] = {
        **provenance(),
        "preset": preset,
        "cuda": cuda,
        "torch": torch.__version__,
        "gpus": torch.cuda.device_count() if cuda else 0,
        "steps": {},
    }
    path = out / "gpu-check.json"

    def step(name: str, run: Callable[[], dict[str, Any]]) -> dict[str, Any] | None:
        print(f"== gpu-check: {name}", flush=True)
        t0 = time.perf_counter()
        try:
            result: dict[str, Any] | None = {**run(), "ok": True}
        except Exception as e:  # noqa: BLE001 - one failing step must not cost the others' figures
            result = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        summary["steps"][name] = {**(result or {}), "wall_s": round(time.perf_counter() - t0, 1)}
        write_json(path, summary)  # after every step: a run cut off still reports what it measured
        return result if result and result["ok"] else None

    step("tests", partial(_tests, out))
    step("bench_train", partial(bench_train, preset=preset, steps=8, warmup=2))
    data_dir = Path(data) if data is not None else out / "data"
    if data is None and not (data_dir / "meta.json").is_file():
        step("prepare", partial(_prepare_any, data_dir))
    trained = {
        t: step(f"train_{t}", partial(_train_and_resume, data_dir, out, t, preset, steps)) for t in ("ftp", "gpt")
    }
    if trained["ftp"]:
        step(
            "bench_decode",
            partial(bench_decode, trained["ftp"]["run"], prompts=4, methods=["plain", "ftp", "ftp-lookup"]),
        )
    step("ddp", partial(_ddp, data_dir, out, preset, steps))
    summary["ok"] = all(s["ok"] for s in summary["steps"].values())
    write_json(path, summary)
    print(f"gpu-check: {'all steps passed' if summary['ok'] else 'some steps failed'}; figures in {path}")
    return summary
