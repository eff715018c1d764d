import json

from ftplm.bench.train import bench_train
from ftplm.cli import main


def test_bench_train_measures_both_models_side_by_side(tmp_path, capsys):
    figures = bench_train("tiny", steps=2, warmup=1, batch_size=2)
    gpt, ftp = figures["models"]["gpt"], figures["models"]["ftp"]
    assert len(gpt["step_s_all"]) == len(ftp["step_s_all"]) == 2
    assert ftp["params"] > gpt["params"]  # same trunk plus projection and decoder
    assert figures["ftp_over_gpt"] == ftp["tokens_per_s"] / gpt["tokens_per_s"] > 0
    assert "FTP / GPT throughput" in capsys.readouterr().out


def test_bench_train_cli_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    assert main(["bench", "train", "--preset", "tiny", "--steps", "1", "--warmup", "0", "--batch-size", "2", "--json", str(out)]) in (0, None)
    assert set(json.loads(out.read_text())["models"]) == {"gpt", "ftp"}
