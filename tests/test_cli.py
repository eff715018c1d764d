"""The CLI: --help everywhere, and bad input of every kind -> one clear line on stderr, exit 2, nothing damaged."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ftplm.cli import COMMANDS, main


def _tree_digest(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        h.update(str(p.relative_to(path)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    try:
        code = main(list(args))
    except SystemExit as e:  # argparse exits for usage errors and --help
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_help(capsys, name):
    code, out, _ = run_cli(capsys, *name.split(), "--help")
    assert code == 0 and "usage: ftplm" in out


@pytest.fixture()
def files(tmp_path, tiny_ftp_run):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1") * 50)
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\nnot json\n')
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    corrupt = tmp_path / "corrupt"
    shutil.copytree(tiny_ftp_run / "latest", corrupt)
    blob = (corrupt / "model.safetensors").read_bytes()
    (corrupt / "model.safetensors").write_bytes(blob[:100])
    return tmp_path


def bad_cases(t: Path, data: Path, run: Path) -> list[tuple[list[str], str]]:
    d, r = str(data), str(run)
    return [
        (["prepare", "--corpus", str(t / "missing.txt"), "--out", str(t / "o1")], "no such file"),
        (["prepare", "--corpus", str(t / "empty.txt"), "--out", str(t / "o2")], "no text"),
        (["prepare", "--corpus", str(t / "latin1.txt"), "--out", str(t / "o3")], "not valid UTF-8"),
        (["prepare", "--corpus", str(t / "bad.jsonl"), "--out", str(t / "o4")], "not valid JSON"),
        (["prepare", "--corpus", str(t / "latin1.txt"), "--out", str(t / "foreign")], "not valid UTF-8|refusing"),
        (["prepare", "--corpus", "wiki-vital", "--out", str(t / "o5"), "--vocab-size", "10"], "vocab size"),
        (
            ["train", "--data", str(t / "nodata"), "--out", str(t / "r1"), "--max-steps", "1"],
            "not a prepared data directory",
        ),
        (["train", "--data", d, "--out", str(t / "r2"), "--preset", "huge"], "invalid choice"),
        (
            [
                "train",
                "--data",
                d,
                "--out",
                str(t / "r3"),
                "--preset",
                "tiny",
                "--max-steps",
                "1",
                "--set",
                "n_embd=65",
            ],
            "divisible",
        ),
        (["train", "--data", d, "--out", str(t / "r4"), "--preset", "tiny"], "when to stop"),
        (["train", "--data", d, "--out", r, "--preset", "tiny", "--max-steps", "1"], "already holds a run"),
        (["train", "--data", d, "--out", str(t / "r5"), "--resume"], "no checkpoint"),
        (
            ["train", "--data", d, "--out", str(t / "r6"), "--max-steps", "1", "--set", "colour=blue"],
            "unknown config field",
        ),
        (["train", "--data", d, "--out", str(t / "r7"), "--time-budget", "soon"], "invalid duration"),
        (["train", "--data", d, "--out", str(t / "r8"), "--max-steps", "-5"], "max_steps must be positive"),
        (["train", "--data", d, "--out", str(t / "r9"), "--max-steps", "1", "--set", "gamma=0"], "gamma"),
        (["train", "--data", d, "--out", str(t / "r10"), "--max-steps", "x"], "invalid int value"),
        (["generate", str(t / "norun"), "--prompt", "hi"], "no such run"),
        (["generate", str(t / "corrupt"), "--prompt", "hi"], "corrupt checkpoint"),
        (["generate", r, "--prompt", "word " * 300], "context"),
        (["generate", r, "--prompt", "hi", "--temperature", "-0.5"], "temperature"),
        (["generate", r, "--prompt", "hi", "--top-p", "2"], "top_p"),
        (["generate", r, "--prompt", "hi", "--top-k", "0"], "top_k"),
        (["generate", r, "--prompt", ""], "empty"),
        (["generate", str(t / "empty.txt"), "--prompt", "hi"], "not a directory"),
    ]


def test_bad_input_gives_one_line_and_exit_2(capsys, files, tiny_data, tiny_ftp_run):
    before = _tree_digest(tiny_ftp_run)
    cases = bad_cases(files, tiny_data, tiny_ftp_run)
    assert len(cases) >= 15
    import re

    for args, pattern in cases:
        code, _, err = run_cli(capsys, *args)
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2, (args, code, err)
        assert len(lines) == 1, (args, err)
        assert re.search(pattern, lines[0]), (args, lines[0])
        assert "Traceback" not in err
    assert _tree_digest(tiny_ftp_run) == before  # nothing on disk damaged
    assert (files / "foreign" / "keep.txt").read_text() == "mine"
    for name in ("o1", "o2", "o3", "o4", "o5", "r1", "r4", "r7"):
        assert not (files / name / "latest").exists()


def test_real_process_exit_status(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "ftplm", "generate", str(tmp_path / "none"), "--prompt", "x"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "no such run" in result.stderr


@pytest.mark.parametrize(
    ("argv0", "expected"),
    [
        ("/venv/bin/ftplm", "ftplm experiment paper --out 'runs/a b'"),
        ("/src/ftplm/__main__.py", "ftplm experiment paper --out 'runs/a b'"),  # python -m ftplm
        ("/usr/lib/python3/pytest/__main__.py", None),
    ],
)
def test_published_command_line(monkeypatch, argv0, expected):
    """Every published JSON records the command that made it, however the CLI was started."""
    from ftplm.machine import command_line

    monkeypatch.setattr(sys, "argv", [argv0, "experiment", "paper", "--out", "runs/a b"])
    assert command_line() == expected
