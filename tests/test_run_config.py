"""Config files (`--config`), experiment loggers (`--logger`) and starting from another run (`--init-from`)."""

from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from ftplm.cli import main
from ftplm.loggers import flatten
from ftplm.train import read_log

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def cli(capsys, *args: str) -> tuple[int, str, str]:
    try:
        code = main([str(a) for a in args])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(capsys, pattern: str, *args: str) -> None:
    code, _, err = cli(capsys, *args)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, (args, code, err)
    assert re.search(pattern, lines[0]), (args, lines[0])


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model.safetensors"))


# ------------------------------------------------------------------------------------------------------
# --config
# ------------------------------------------------------------------------------------------------------
def test_train_config_file_flags_win_and_the_resolved_config_trains_the_same_model(capsys, tmp_path, tiny_data):
    config = tmp_path / "train.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": "gpt",
                "preset": "tiny",
                "data": str(tiny_data),
                "max_steps": 50,
                "n_layer": 3,
                "n_embd": 32,
                "eval_interval": 3,
                "log_interval": 1,
                "dtype": "fp32",
                "seed": 7,
            }
        )
    )
    run = tmp_path / "run"
    code, _, err = cli(
        capsys, "train", "--config", config, "--out", run, "--max-steps", "4", "--set", "n_layer=1", "--no-progress"
    )
    assert code == 0, err
    resolved = yaml.safe_load((run / "run_config.yaml").read_text())
    # the file's values, except where a flag or --set said otherwise
    assert resolved["model"] == "gpt" and resolved["n_embd"] == 32 and resolved["seed"] == 7
    assert resolved["max_steps"] == 4 and resolved["n_layer"] == 1
    assert json.loads((run / "config.json").read_text())["n_layer"] == 1
    assert len([r for r in read_log(run) if "loss" in r]) == 4

    again = tmp_path / "again"
    code, _, err = cli(capsys, "train", "--config", run / "run_config.yaml", "--out", again, "--no-progress")
    assert code == 0, err
    a, b = weights(run), weights(again)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in read_log(run) if "loss" in r] == [r["loss"] for r in read_log(again) if "loss" in r]


def test_json_config_and_resume_without_data(capsys, tmp_path, tiny_data):
    config = tmp_path / "train.json"
    config.write_text(json.dumps({"preset": "tiny", "data": str(tiny_data), "max_steps": 2, "logger": ["csv"]}))
    run = tmp_path / "run"
    assert cli(capsys, "train", "--config", config, "--out", run, "--no-progress")[0] == 0
    code, _, err = cli(
        capsys, "train", "--out", run, "--resume", "--max-steps", "3", "--no-progress"
    )  # data from the run
    assert code == 0, err
    assert json.loads((run / "trainer_state.json").read_text())["step"] == 3
    assert yaml.safe_load((run / "run_config.yaml").read_text())["max_steps"] == 3


@pytest.mark.parametrize(
    ("content", "suffix", "pattern"),
    [
        ("colour: blue\n", ".yaml", r"unknown key 'colour'"),
        ("max_steps: ten\n", ".yaml", r"max_steps must be an integer"),
        ("preset: huge\n", ".yaml", r"preset must be one of"),
        ("n_layer: 2.5\n", ".yaml", r"n_layer must be an integer"),
        ("bias: maybe\n", ".yaml", r"bias must be true or false"),
        ("max_steps: [1\n", ".yaml", r"corrupt config file"),
        ("[1, 2]\n", ".yaml", r"must hold a mapping"),
        ('{"max_steps": }', ".json", r"corrupt config file"),
        ("max_steps: 1\n", ".toml", r"must end in .yaml"),
    ],
)
def test_bad_config_files_are_one_line_errors(capsys, tmp_path, tiny_data, content, suffix, pattern):
    config = tmp_path / f"bad{suffix}"
    config.write_text(content)
    one_line_error(
        capsys,
        pattern,
        "train",
        "--config",
        config,
        "--data",
        tiny_data,
        "--out",
        tmp_path / "run",
        "--preset",
        "tiny",
        "--max-steps",
        "1",
    )
    assert not (tmp_path / "run").exists()


def test_missing_config_file_and_missing_data(capsys, tmp_path):
    one_line_error(capsys, "no such config file", "train", "--config", tmp_path / "none.yaml", "--out", tmp_path / "r")
    one_line_error(capsys, r"--data", "train", "--out", tmp_path / "r", "--max-steps", "1")


def test_eval_config_file(capsys, tmp_path, tiny_gpt_run):
    config = tmp_path / "eval.yaml"
    config.write_text(yaml.safe_dump({"suite": "ppl", "quick": True, "ppl_batches": 1, "seed": 3}))
    out = tmp_path / "eval.json"
    code, _, err = cli(capsys, "eval", tiny_gpt_run, "--config", config, "--json", out, "--set", "ppl_batches=2")
    assert code == 0, err
    result = json.loads(out.read_text())
    assert result["config"] == {
        "suite": "ppl",
        "against": None,
        "quick": True,
        "seed": 3,
        "data": None,
        "ppl_batches": 2,
    }
    (label,) = result["runs"]
    assert result["runs"][label]["suites"]["ppl"]["n"] == 2 * 8 * 64  # 2 batches of 8 windows of the context
    config.write_text("ppl_batchez: 1\n")
    one_line_error(capsys, "unknown key 'ppl_batchez'", "eval", tiny_gpt_run, "--config", config)
    one_line_error(capsys, "unknown eval option 'ppl_batchez'", "eval", tiny_gpt_run, "--set", "ppl_batchez=1")


def test_experiment_config_file_routes_eval_and_training_fields(capsys, tmp_path, monkeypatch):
    import ftplm.cli

    seen = {}
    monkeypatch.setattr(ftplm.cli, "paper_experiment", lambda *args, **kwargs: seen.update(args=args, **kwargs))
    config = tmp_path / "exp.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "preset": "tiny",
                "seeds": 2,
                "coherence_prompts": 5,
                "save_interval": 10,
                "ppl_batches": 3,
                "decoder_inputs": "masked",
                "corpus": "shakespeare",
            }
        )
    )
    out = tmp_path / "exp"
    code, _, err = cli(
        capsys,
        "experiment",
        "paper",
        "--config",
        config,
        "--out",
        out,
        "--seeds",
        "1",
        "--train-set",
        "save_interval=20",
    )
    assert code == 0, err
    spec = seen["args"][1]
    assert (spec.preset, spec.seeds) == ("tiny", 1)  # preset from the file, --seeds from the command line
    assert spec.options == {"coherence_prompts": 5} and spec.train_overrides == {"save_interval": 20}
    assert spec.ppl_batches == 3 and spec.model_overrides == {"decoder_inputs": "masked"}  # an FTP variant
    assert (spec.corpus, spec.tokenizer) == ("shakespeare", "bpe")  # any corpus `prepare` takes
    saved = yaml.safe_load((out / "experiment_config.yaml").read_text())
    assert saved["seeds"] == 1 and saved["save_interval"] == 20 and saved["coherence_prompts"] == 5
    config.write_text("n_layers: 3\n")  # not a setting of the experiment
    one_line_error(capsys, "unknown key 'n_layers'", "experiment", "paper", "--config", config, "--out", out)
    one_line_error(
        capsys, "--coding-seeds must be at least 1", "experiment", "paper", "--coding-seeds", "0", "--out", out
    )


# ------------------------------------------------------------------------------------------------------
# --logger
# ------------------------------------------------------------------------------------------------------
def _tensorboard_scalars(run: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def test_every_logger_gets_the_same_records_and_resume_drops_what_came_after_the_checkpoint(
    capsys, tmp_path, tiny_data, monkeypatch
):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    common = [
        "--data",
        tiny_data,
        "--out",
        run,
        "--model",
        "ftp",
        "--preset",
        "tiny",
        "--no-progress",
        "--logger",
        "csv",
        "--logger",
        "tensorboard",
        "--logger",
        "wandb",
    ]
    code, _, err = cli(
        capsys,
        "train",
        *common,
        "--max-steps",
        "6",
        "--set",
        "log_interval=1",
        "--set",
        "eval_interval=2",
        "--set",
        "save_interval=4",
        "--set",
        "keep_checkpoints=-1",
    )
    assert code == 0, err
    # as if killed after step 6 was logged but before it was saved: continue from step 4
    os.unlink(run / "latest")
    os.symlink("checkpoints/step_0000004", run / "latest")
    code, _, err = cli(capsys, "train", "--out", run, "--resume", "--max-steps", "8", "--no-progress")
    assert code == 0, err

    records = read_log(run)
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 9))  # each step once
    assert [r["step"] for r in records if "val" in r] == [2, 4, 6, 8]
    expected = [{"step": r["step"], **flatten(r)} for r in records]
    assert "train/loss" in expected[0] and any("val/offset_acc/4" in e for e in expected)

    with open(run / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(expected)
    for row, want in zip(rows, expected):
        assert {k: float(v) for k, v in row.items() if v != ""} == pytest.approx({k: float(v) for k, v in want.items()})

    scalars = _tensorboard_scalars(run)
    for want in expected:
        for name, value in want.items():
            if name != "step":
                assert scalars[name][want["step"]] == pytest.approx(value, rel=1e-6), name
    assert sorted(scalars["train/loss"]) == list(range(1, 9))

    offline = sorted((run / "wandb").glob("offline-run-*"))
    run_id = (run / "wandb_id").read_text()
    assert len(offline) == 2 and all(p.name.endswith(run_id) for p in offline)  # the resumed run continues the id
    history = b"".join(p.read_bytes() for p in (run / "wandb").glob("offline-run-*/run-*.wandb"))
    for name in ("train/loss", "val/ppl", "val/offset_acc/4"):
        assert name.encode() in history


def test_unknown_logger(capsys, tmp_path, tiny_data):
    one_line_error(
        capsys,
        "unknown logger 'mlflow'",
        "train",
        "--data",
        tiny_data,
        "--out",
        tmp_path / "r",
        "--preset",
        "tiny",
        "--max-steps",
        "1",
        "--logger",
        "mlflow",
    )
    assert not (tmp_path / "r").exists()


def test_flatten_names_metrics_by_where_they_come_from():
    record = {"step": 3, "loss": 2.5, "tokens": 96, "val": {"ppl": 12.0, "offset_acc": [0.1, 0.2]}, "grad_norm": None}
    assert flatten(record) == {
        "train/loss": 2.5,
        "tokens": 96,
        "val/ppl": 12.0,
        "val/offset_acc/1": 0.1,
        "val/offset_acc/2": 0.2,
    }


# ------------------------------------------------------------------------------------------------------
# --init-from and prepare --tokenizer RUN
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("source", ["tiny_gpt_run", "tiny_ftp_run"])
def test_init_from_starts_from_the_weights_with_a_fresh_optimizer(
    capsys, tmp_path, tiny_data, tiny_corpus, source, request
):
    from ftplm.checkpoint import load_pretrained
    from ftplm.data import TokenData

    src = request.getfixturevalue(source)
    data = tmp_path / "data"  # another split of the corpus, with the source run's tokenizer
    assert cli(capsys, "prepare", "--corpus", tiny_corpus, "--out", data, "--tokenizer", src, "--seed", "5")[0] == 0
    assert json.loads((data / "tokenizer.json").read_text()) == json.loads((src / "tokenizer.json").read_text())
    run = tmp_path / "run"
    code, out, err = cli(
        capsys,
        "train",
        "--init-from",
        src,
        "--data",
        data,
        "--out",
        run,
        "--preset",
        "tiny",
        "--max-steps",
        "3",
        "--dtype",
        "fp32",
        "--seed",
        "11",
        "--no-progress",
    )
    assert code == 0, err
    model, _ = load_pretrained(src)
    assert f"trained {model.cfg.model_type}" in out  # the type comes from the source run
    x, y = TokenData(data).batch("train", 8, model.cfg.block_size, key=(11, 0, 0))
    with torch.no_grad():
        first_loss = model.train()(x, y).loss.item()  # the source's loss on the new run's first batch
    assert read_log(run)[0]["step"] == 1 and read_log(run)[0]["loss"] == pytest.approx(first_loss, rel=1e-5)
    state = json.loads((run / "trainer_state.json").read_text())
    assert state["step"] == 3 and state["init_from"]["path"] == str(src.resolve())
    assert state["optimizer_param_groups"][0]["lr"] < 3e-3  # a fresh warmup: step 3 of 10
    assert yaml.safe_load((run / "run_config.yaml").read_text())["init_from"] == str(src.resolve())


def test_init_from_refuses_what_cannot_fit(capsys, tmp_path, tiny_data, tiny_gpt_run, tiny_corpus):
    r = tmp_path / "r"
    common = ["train", "--init-from", tiny_gpt_run, "--out", r, "--preset", "tiny", "--max-steps", "1"]
    one_line_error(capsys, "not fit this model config", *common, "--data", tiny_data, "--set", "n_embd=32")
    one_line_error(capsys, "is a gpt model, not ftp", *common, "--data", tiny_data, "--model", "ftp")
    one_line_error(capsys, "use one of them", *common, "--data", tiny_data, "--resume")
    other = tmp_path / "other"
    assert cli(capsys, "prepare", "--corpus", tiny_corpus, "--out", other, "--vocab-size", "300")[0] == 0
    one_line_error(capsys, "another tokenizer", *common, "--data", other)
    one_line_error(
        capsys,
        "no such run",
        "train",
        "--init-from",
        tmp_path / "none",
        "--out",
        r,
        "--data",
        tiny_data,
        "--max-steps",
        "1",
    )
    assert not r.exists()
    one_line_error(
        capsys,
        "unknown tokenizer",
        "prepare",
        "--corpus",
        tiny_corpus,
        "--out",
        tmp_path / "d",
        "--tokenizer",
        tmp_path / "none",
    )
