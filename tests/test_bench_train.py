import json

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

from ftplm.bench.train import bench_train, largest_batch, matmul_peak, step_memory
from ftplm.cli import main
from ftplm.config import preset, with_overrides
from ftplm.model import build_model, flops_per_token


def test_bench_train_measures_both_models_side_by_side(tmp_path, capsys):
    figures = bench_train("tiny", steps=2, warmup=1, batch_size=2)
    gpt, ftp = figures["models"]["gpt"], figures["models"]["ftp"]
    assert len(gpt["step_s_all"]) == len(ftp["step_s_all"]) == 2
    assert ftp["params"] > gpt["params"]  # same trunk plus projection and decoder
    assert figures["ftp_over_gpt"] == ftp["tokens_per_s"] / gpt["tokens_per_s"] > 0
    assert "FTP / GPT throughput" in capsys.readouterr().out


def test_bench_train_cli_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    assert main(
        ["bench", "train", "--preset", "tiny", "--steps", "1", "--warmup", "0", "--batch-size", "2", "--json", str(out)]
    ) in (0, None)
    assert set(json.loads(out.read_text())["models"]) == {"gpt", "ftp"}


# --- MFU, FLOPs, memory, max batch (issue 5) ------------------------------------------------------------


@pytest.mark.parametrize("model_type, fields", [("gpt", {}), ("ftp", {}), ("ftp", {"future_bow": 0.5})])
def test_flops_per_token_matches_counted_matmuls(model_type, fields):
    """PyTorch's FLOP counter over a real forward+backward agrees with the formula (attention aside: the counter
    may or may not see SDPA's CPU kernel, so it must land between 'without attention' and 'with attention')."""
    cfg = with_overrides(preset("tiny", model_type).model, {"vocab_size": 512, **fields})
    model = build_model(cfg)
    B, T = 2, cfg.block_size
    x = torch.randint(0, cfg.vocab_size, (B, T))
    with FlopCounterMode(display=False) as counter:
        model(x, x).loss.backward()
    counted = counter.get_total_flops() / (B * T)
    attention = 12 * cfg.n_layer * cfg.n_embd * T
    if model_type == "ftp":
        attention += 12 * cfg.dec_n_layer * cfg.dec_n_embd * (cfg.n_future + cfg.n_pseudo) * cfg.n_future
    formula = flops_per_token(model)
    assert formula - attention - 1 <= counted <= formula + 1


def test_bench_reports_mfu_and_memory():
    f = bench_train("tiny", steps=1, warmup=0, batch_size=2)
    assert set(f["peak_flops"]) == {"bf16", "fp32"} and all(v["flops"] > 0 for v in f["peak_flops"].values())
    for m in f["models"].values():
        assert m["mfu"] == pytest.approx(
            m["flops_per_token"] * m["tokens_per_s"] / f["peak_flops"][f["dtype"]]["flops"]
        )
        assert m["memory"]["peak_mb"] > 0 and m["memory"]["step_mb"] >= 0
        assert "max_batch_size" not in m  # CPU: no out-of-memory errors to search with
    assert f["models"]["ftp"]["flops_per_token"] > f["models"]["gpt"]["flops_per_token"]


def test_step_memory_sees_a_step_allocation():
    mem = step_memory(lambda: torch.ones(64 * 2**20 // 4).sum(), torch.device("cpu"))
    assert mem["step_mb"] >= 48, mem


def test_matmul_peak_stays_within_size():
    peak = matmul_peak(torch.device("cpu"), torch.float32, max_n=512, budget_s=0.05)
    assert peak["n"] in (256, 512) and peak["flops"] > 0


@given(threshold=st.integers(0, 3000), cap=st.integers(1, 2048))
def test_largest_batch_finds_the_limit(threshold, cap):
    calls = []
    found = largest_batch(lambda b: calls.append(b) or b <= threshold, cap)
    assert found == min(threshold, cap)
    assert len(calls) <= 2 * cap.bit_length() + 2 and max(calls) <= cap + 1


def test_bench_train_cli_model_overrides(tmp_path):
    out = tmp_path / "bench.json"
    argv = [
        "bench",
        "train",
        "--preset",
        "tiny",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--batch-size",
        "2",
        "--set",
        "n_future=2",
        "--dtype",
        "fp32",
        "--json",
        str(out),
    ]
    assert main(argv) in (0, None)
    figures = json.loads(out.read_text())
    assert figures["n_future"] == 2 and figures["dtype"] == "fp32"


def test_bench_train_rejects_training_fields(capsys):
    assert main(["bench", "train", "--preset", "tiny", "--set", "learning_rate=1"]) == 2
    assert "model fields only" in capsys.readouterr().err
