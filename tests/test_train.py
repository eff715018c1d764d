"""Training I/O: save/load round trip, atomic checkpoints, exact resume after SIGKILL."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import ftplm
from ftplm import checkpoint
from ftplm.checkpoint import checkpoints, load_pretrained
from ftplm.config import TrainConfig
from ftplm.errors import FtplmError
from ftplm.train import lr_at, read_log, snapshot_steps, train


def _logits(run: Path) -> torch.Tensor:
    model, _ = load_pretrained(run)
    x = torch.arange(1, 40).unsqueeze(0) % model.cfg.vocab_size
    with torch.no_grad():
        return model(x).logits


def test_save_pretrained_round_trip_gives_identical_logits(tiny_ftp_run, tiny_gpt_run, tmp_path):
    for run in (tiny_ftp_run, tiny_gpt_run):
        loaded = ftplm.load(run)
        saved = loaded.save_pretrained(tmp_path / run.name)
        assert {p.name for p in saved.iterdir()} == {"config.json", "model.safetensors", "tokenizer.json"}
        assert torch.equal(_logits(run), _logits(saved))
        cfg = json.loads((saved / "config.json").read_text())
        assert cfg["model_type"] == loaded.config.model_type


def test_run_layout(tiny_ftp_run):
    assert (tiny_ftp_run / "latest").is_symlink()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "trainer_state.json"):
        assert (tiny_ftp_run / name).exists(), name
    state = json.loads((tiny_ftp_run / "trainer_state.json").read_text())
    assert state["step"] == 40 and state["tokens"] > 0
    log = read_log(tiny_ftp_run)
    assert any("val" in r for r in log) and all("step" in r for r in log)


def test_interrupted_save_leaves_previous_checkpoint_loadable(tiny_data, tmp_path, monkeypatch):
    run = tmp_path / "run"
    train(
        tiny_data,
        run,
        model_type="ftp",
        preset_name="tiny",
        progress=False,
        train_overrides={"max_steps": 4, "save_interval": 2, "eval_interval": 100},
    )
    before = _logits(run)
    assert [p.name for p in checkpoints(run)] == ["step_0000004"]

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(checkpoint, "save_file", crash)  # dies after the model file, before the optimizer file
    with pytest.raises(KeyboardInterrupt):
        train(
            tiny_data,
            run,
            model_type="ftp",
            preset_name="tiny",
            progress=False,
            resume=True,
            train_overrides={"max_steps": 6},
        )
    assert os.readlink(run / "latest") == "checkpoints/step_0000004"
    assert torch.equal(_logits(run), before)
    assert [p.name for p in checkpoints(run)] == ["step_0000004"]


def test_corrupt_checkpoint_is_a_clear_error(tiny_gpt_run, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_gpt_run / "latest", broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 3])
    with pytest.raises(FtplmError, match="corrupt checkpoint"):
        ftplm.load(broken)
    (broken / "config.json").write_text("{not json")
    with pytest.raises(FtplmError, match="corrupt"):
        ftplm.load(broken)


def test_refuses_to_overwrite_a_run(tiny_data, tiny_ftp_run):
    before = (tiny_ftp_run / "model.safetensors").read_bytes()
    with pytest.raises(FtplmError, match="already holds a run"):
        train(
            tiny_data,
            tiny_ftp_run,
            model_type="ftp",
            preset_name="tiny",
            progress=False,
            train_overrides={"max_steps": 1},
        )
    assert (tiny_ftp_run / "model.safetensors").read_bytes() == before


def test_lr_schedule_warmup_then_cosine():
    cfg = TrainConfig(learning_rate=1.0, min_lr_ratio=0.1, warmup_steps=10)
    lrs = [lr_at(s, cfg, 110) for s in range(111)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(lrs[10:]))
    assert lrs[110] == pytest.approx(0.1)


@given(planned=st.integers(1, 10**6), n=st.integers(0, 200))
def test_snapshot_schedule_is_bounded_and_dense_late(planned, n):
    steps = snapshot_steps(planned, n)
    assert len(steps) <= n and all(1 <= s <= planned for s in steps)
    if n > 0:
        assert planned in steps  # the end of the run, where the closest match usually is
        late = [s for s in steps if s > planned / 2]
        assert len(late) >= min(n // 2, planned // 2)  # at least half of them in the second half


def test_snapshots_are_weights_only_and_loadable(tiny_data, tmp_path):
    run = train(
        tiny_data,
        tmp_path / "run",
        model_type="gpt",
        preset_name="tiny",
        progress=False,
        train_overrides={"max_steps": 12, "save_interval": 100, "eval_interval": 100, "snapshots": 4},
    )
    snaps = sorted((tmp_path / "run" / "snapshots").glob("step_*"))
    assert [int(p.name[5:]) for p in snaps] == sorted(snapshot_steps(12, 4)) and run.step == 12
    assert not any((p / "optimizer.safetensors").exists() for p in snaps)
    assert json.loads((snaps[0] / "trainer_state.json").read_text())["step"] == int(snaps[0].name[5:])
    assert ftplm.load(snaps[-1]).generate("The", 4, temperature=0) == ftplm.load(tmp_path / "run").generate(
        "The", 4, temperature=0
    )
    assert checkpoints(tmp_path / "run", snapshots=True)[-1] == snaps[-1]  # the snapshot stands for its step


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "ftplm", *args]


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_log(run) if "loss" in r}


def test_resume_after_sigkill_is_bit_exact(tiny_data, tmp_path):
    common = [
        "--data",
        str(tiny_data),
        "--preset",
        "tiny",
        "--model",
        "ftp",
        "--max-steps",
        "60",
        "--no-progress",
        "--set",
        "log_interval=1",
        "--set",
        "save_interval=5",
        "--set",
        "eval_interval=1000",
    ]
    reference = tmp_path / "reference"
    subprocess.run(_cli("train", "--out", str(reference), *common), check=True, capture_output=True)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        _cli("train", "--out", str(killed), *common), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )

    def latest_step() -> int:  # what a resume would start from: RUN/latest (set just after the step's directory)
        try:
            return json.loads((killed / "trainer_state.json").read_text())["step"]
        except (OSError, ValueError, KeyError):
            return 0

    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and latest_step() < 25:
        time.sleep(0.02)
    assert proc.poll() is None, "training finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed_from = json.loads((killed / "trainer_state.json").read_text())["step"]
    assert 25 <= resumed_from < 60

    result = subprocess.run(
        _cli("train", "--out", str(killed), "--data", str(tiny_data), "--resume", "--no-progress"),
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    ref, got = _losses(reference), _losses(killed)
    assert sorted(got) == list(range(1, 61))
    assert got == ref  # every step, before and after the kill, bit for bit
    assert torch.equal(_logits(reference), _logits(killed))


def test_auto_dtype_follows_the_hardware(monkeypatch):
    import ftplm.train as tr

    cpu = torch.device("cpu")
    assert tr.resolve_dtype("fp32", cpu) == "fp32" and tr.resolve_dtype("bf16", cpu) == "bf16"
    monkeypatch.setattr(tr, "has_fast_bf16", lambda device_type: False)
    assert tr.resolve_dtype("auto", cpu) == "fp32"
    monkeypatch.setattr(tr, "has_fast_bf16", lambda device_type: True)
    assert tr.resolve_dtype("auto", cpu) == "bf16"
