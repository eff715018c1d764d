"""Multi-process training on CPU (gloo): 2 processes x accum A == 1 process x accum 2A, resume on another world
size, FSDP2 in the single checkpoint layout, and bad input (one line, exit 2, no hang).

The CUDA path (NCCL, cuda:LOCAL_RANK, pinned memory) is the same code with other arguments; no GPU was available
when these tests were written, so only its CPU twin runs here.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from ftplm.checkpoint import load_pretrained
from ftplm.cli import main
from ftplm.distributed import DistContext, global_micro, split_accum, to_device
from ftplm.errors import FtplmError
from ftplm.train import read_log, train

STEPS = 6
OVERRIDES = {
    "max_steps": STEPS,
    "dtype": "fp32",
    "log_interval": 1,
    "eval_interval": 100,
    "eval_iters": 2,
    "save_interval": 3,
    "keep_checkpoints": -1,
}
TIMEOUT = 180  # seconds: a hung process group fails the test instead of the suite


def _torchrun(data: Path, out: Path, *extra: str, nproc: int = 2) -> subprocess.CompletedProcess:
    sets = [arg for k, v in OVERRIDES.items() if k not in ("max_steps", "dtype") for arg in ("--set", f"{k}={v}")]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "ftplm",
        "train",
        "--data",
        str(data),
        "--out",
        str(out),
        "--preset",
        "tiny",
        "--model",
        "ftp",
        "--dtype",
        "fp32",
        "--max-steps",
        str(STEPS),
        "--no-progress",
        "--dist-timeout",
        "60",
        *sets,
        *extra,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT)


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_log(run) if "loss" in r}


def _rewind(run: Path, dest: Path, step: int) -> Path:
    """A copy of `run` as a run stopped right after its checkpoint at `step` would have left it."""
    shutil.copytree(run, dest, symlinks=True)
    for ckpt in (dest / "checkpoints").glob("step_*"):
        if int(ckpt.name.split("_")[1]) > step:
            shutil.rmtree(ckpt)
    (dest / "latest").unlink()
    (dest / "latest").symlink_to(Path("checkpoints") / f"step_{step:07d}")
    return dest


def _assert_close_losses(got: dict[int, float], want: dict[int, float], steps: range) -> None:
    assert sorted(got) == list(steps)
    for s in steps:
        assert got[s] == pytest.approx(want[s], rel=1e-5, abs=1e-6), f"step {s}"


def _assert_same_weights(run_a: Path, run_b: Path) -> None:
    a, _ = load_pretrained(run_a)
    b, _ = load_pretrained(run_b)
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6, msg=name)


@pytest.fixture(scope="module")
def one_proc_run(tiny_data, tmp_path_factory) -> Path:
    """1 process, grad_accum 2: the reference for a 2-process run with grad_accum 1."""
    out = tmp_path_factory.mktemp("dist") / "one"
    train(
        tiny_data,
        out,
        model_type="ftp",
        preset_name="tiny",
        progress=False,
        train_overrides={**OVERRIDES, "grad_accum": 2},
    )
    return out


@pytest.fixture(scope="module")
def ddp_run(tiny_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist") / "ddp"
    result = _torchrun(tiny_data, out, "--grad-accum", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_two_processes_equal_one_process_with_double_accumulation(one_proc_run, ddp_run):
    _assert_close_losses(_losses(ddp_run), _losses(one_proc_run), range(1, STEPS + 1))
    _assert_same_weights(ddp_run, one_proc_run)
    state = json.loads((ddp_run / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["train_config"]["grad_accum"] == 1
    assert state["tokens"] == json.loads((one_proc_run / "trainer_state.json").read_text())["tokens"]
    assert sorted(p.name for p in ddp_run.iterdir()) == sorted(p.name for p in one_proc_run.iterdir())  # same layout


def test_two_process_run_resumes_with_one_process(tiny_data, one_proc_run, ddp_run, tmp_path):
    stopped = _rewind(ddp_run, tmp_path / "stopped", 3)
    info = train(tiny_data, stopped, resume=True, progress=False)
    assert info.step == STEPS
    state = json.loads((stopped / "trainer_state.json").read_text())
    assert state["world_size"] == 1 and state["train_config"]["grad_accum"] == 2  # same global batch
    losses = _losses(stopped)
    assert min(s for s in losses if s > 3) == 4  # continues at the next step and data position
    _assert_close_losses(losses, _losses(ddp_run), range(1, STEPS + 1))
    _assert_close_losses(losses, _losses(one_proc_run), range(1, STEPS + 1))
    _assert_same_weights(stopped, one_proc_run)


def test_fsdp_matches_and_writes_the_single_layout(tiny_data, one_proc_run, tmp_path):
    out = tmp_path / "fsdp"
    result = _torchrun(tiny_data, out, "--grad-accum", "1", "--strategy", "fsdp")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "trained ftp to step 6" in result.stdout and result.stdout.count("trained ftp") == 1  # rank 0 reports
    _assert_close_losses(_losses(out), _losses(one_proc_run), range(1, STEPS + 1))
    _assert_same_weights(out, one_proc_run)  # gathered full weights, loadable without torch.distributed
    stopped = _rewind(out, tmp_path / "stopped", 3)  # FSDP checkpoint -> plain 1-process resume
    train(tiny_data, stopped, resume=True, progress=False)
    _assert_close_losses(_losses(stopped), _losses(one_proc_run), range(1, STEPS + 1))


@given(world=st.integers(1, 8), accum=st.integers(1, 8))
def test_global_batch_is_split_exactly_once(world, accum):
    drawn = [global_micro(DistContext(rank=r, world_size=world), m, accum) for r in range(world) for m in range(accum)]
    assert sorted(drawn) == list(range(world * accum))
    assert split_accum(world * accum, world) == accum


def test_uneven_global_batch_is_an_error():
    with pytest.raises(FtplmError, match="cannot be split evenly over 2 processes"):
        split_accum(3, 2)


def test_to_device_on_cpu_keeps_values():
    x = torch.arange(6).view(2, 3)
    assert torch.equal(to_device(x, torch.device("cpu")), x)


# --------------------------------------------------------------------------------------------------------
# bad input: one line on stderr, exit 2, nothing left waiting
# --------------------------------------------------------------------------------------------------------
def _one_line_error(capsys, argv: list[str], match: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0], err


def _train_args(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train",
        "--data",
        str(data),
        "--out",
        str(out),
        "--preset",
        "tiny",
        "--max-steps",
        "1",
        "--no-progress",
        *extra,
    ]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_nccl_on_cpu(tiny_data, tmp_path, capsys):
    _one_line_error(capsys, _train_args(tiny_data, tmp_path / "r", "--backend", "nccl"), "NCCL backend needs CUDA")
    assert not (tmp_path / "r").exists()


def test_fsdp_needs_several_processes(tiny_data, tmp_path, capsys):
    _one_line_error(capsys, _train_args(tiny_data, tmp_path / "r", "--strategy", "fsdp"), "launch with torchrun")


def test_missing_rendezvous_endpoint(tiny_data, tmp_path, capsys, monkeypatch):
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    _one_line_error(
        capsys, _train_args(tiny_data, tmp_path / "r"), "no rendezvous endpoint (MASTER_ADDR and MASTER_PORT unset)"
    )


def test_resume_on_a_world_size_that_does_not_divide_the_global_batch(
    tiny_data, ddp_run, tmp_path, capsys, monkeypatch
):
    stopped = _rewind(ddp_run, tmp_path / "stopped", 3)  # global batch: 2 processes x 1 micro-batch
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    argv = ["train", "--data", str(tiny_data), "--out", str(stopped), "--resume", "--no-progress"]
    _one_line_error(capsys, argv, "global batch of 2 micro-batches cannot be split evenly over 3 processes")
    assert json.loads((stopped / "trainer_state.json").read_text())["step"] == 3  # untouched


def test_unreachable_peer_times_out_instead_of_hanging(tiny_data, tmp_path):
    """Rank 1 of 2 whose rank 0 never comes: the join times out after --dist-timeout, one line, exit 2."""
    env = {
        **os.environ,
        "WORLD_SIZE": "2",
        "RANK": "1",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "TORCH_CPP_LOG_LEVEL": "FATAL",
    }  # torch's own C++ retry logs off
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "ftplm", *_train_args(tiny_data, tmp_path / "r", "--dist-timeout", "3")],
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "could not join the process group at 127.0.0.1:" in lines[0], result.stderr[-2000:]
    assert time.monotonic() - start < 60
    assert not (tmp_path / "r" / "latest").exists()


def test_bad_input_under_torchrun_ends_every_process(tiny_data, tmp_path):
    result = _torchrun(tiny_data, tmp_path / "r", "--backend", "nccl")
    assert result.returncode != 0
    # one line per rank that got to write it: once a rank exits with an error, torchrun's agent stops the others,
    # sometimes before they write theirs (seen in CI: 1 of 2)
    assert result.stderr.count("ftplm train: error: the NCCL backend needs CUDA GPUs") in (1, 2)
