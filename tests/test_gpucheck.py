"""`ftplm gpu-check` on the CPU: the same steps as on a lent GPU, on the `tiny` preset."""

from __future__ import annotations

import json

from ftplm.gpucheck import gpu_check


def test_gpu_check_runs_every_step_on_tiny_and_writes_one_summary(tiny_data, tmp_path):
    summary = gpu_check(tmp_path / "check", preset="tiny", steps=40, data=tiny_data)
    steps = summary["steps"]
    assert summary["ok"], {k: v.get("error") for k, v in steps.items()}
    assert list(steps) == ["tests", "bench_train", "train_ftp", "train_gpt", "bench_decode", "ddp"]
    assert steps["tests"]["returncode"] == 0 and "skipped" in steps["tests"]["summary"]  # no GPU here
    assert steps["bench_train"]["ftp_over_gpt"] > 0 and steps["bench_train"]["preset"] == "tiny"
    for model_type in ("ftp", "gpt"):
        run = steps[f"train_{model_type}"]
        assert 20 <= run["resumed_from_step"] < 40  # killed halfway, resumed from its last checkpoint
        assert run["resume_exact"] and run["resume_max_abs_diff"] == 0.0  # bit for bit on the CPU
        assert run["tokens_per_s"] > 0 and run["val_ppl"] > 1
    assert steps["bench_decode"]["results"]["greedy"]["ftp"]["lossless"] == 1.0
    assert "skipped" in steps["ddp"]
    written = json.loads((tmp_path / "check" / "gpu-check.json").read_text())
    assert written["ok"] and written["machine"] and written["steps"].keys() == steps.keys()
