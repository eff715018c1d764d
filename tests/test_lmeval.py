"""ftplm as an lm-evaluation-harness model: its scores agree with the training path, batching changes nothing,
generation is ftplm's own, the local tasks run end to end (Python and `ftplm lm-eval`), bad input is one clear line."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # the local tasks read JSON files; nothing may be downloaded
os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("lm_eval")

from lm_eval import simple_evaluate
from lm_eval.api.instance import Instance
from lm_eval.tasks import TaskManager
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from ftplm.api import rolling_windows
from ftplm.cli import main
from ftplm.data import TokenData
from ftplm.errors import FtplmError
from ftplm.lmeval import FtplmLM, write_tasks

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def requests(kind: str, *args: tuple) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def lm(tiny_ftp_run) -> FtplmLM:
    return FtplmLM(pretrained=str(tiny_ftp_run), batch_size=8)


@pytest.fixture(scope="module")
def texts(tiny_data, lm) -> tuple[str, str]:
    """A held-out text shorter than the context and one several contexts long."""
    docs = [d.text for d in TokenData(tiny_data).heldout("test")]
    block = lm.model.config.block_size
    short = next(t[:100] for t in docs if 8 < len(lm.tok_encode(t[:100])) < block)
    long = next(t for t in docs if len(lm.tok_encode(t)) > 3 * block)
    return short, long


@pytest.fixture(scope="module")
def task_dir(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("lmeval_tasks")
    names = write_tasks(tiny_data, out, docs=12)
    assert names == [
        "ftplm_heldout_ppl",
        "ftplm_heldout_continuation",
        "ftplm_heldout_topic",
        "ftplm_heldout_next_word",
    ]
    return out


@pytest.fixture(scope="module")
def task_manager(task_dir) -> TaskManager:
    return TaskManager(include_path=str(task_dir))  # indexes every lm-eval task: seconds, so once


def reference_logprob(model, windows: list[tuple[list[int], list[int]]]) -> float:
    """Total log-likelihood through the training/eval forward path: model(idx, targets).next_token_ce, with the
    unscored targets masked (-1), over lm-eval's own (context, prediction) windows."""
    total = 0.0
    with torch.no_grad():
        for context, pred in windows:
            tokens = context + pred
            idx = torch.tensor([tokens[:-1]])
            targets = torch.tensor([[-1] * (len(tokens) - 1 - len(pred)) + pred])
            total -= model(idx, targets).next_token_ce.item() * len(pred)
    return total


def test_rolling_windows_are_lm_evals():
    for n in (1, 5, 63, 64, 65, 128, 200):
        ids = list(range(100, 100 + n))
        expected = [(c + p, len(p)) for c, p in map(make_disjoint_window, get_rolling_token_windows(ids, 7, 64, 1))]
        assert rolling_windows([7, *ids], 1, 64) == expected


@pytest.mark.parametrize("run", ["tiny_ftp_run", "tiny_gpt_run"])
def test_loglikelihood_rolling_is_ftplm_perplexity(run, request, texts):
    lm = FtplmLM(pretrained=str(request.getfixturevalue(run)), batch_size=8)
    scores = lm.loglikelihood_rolling(requests("loglikelihood_rolling", *[(t,) for t in texts]))
    block = lm.model.config.block_size
    for text, score in zip(texts, scores):
        ids = lm.tok_encode(text)
        windows = list(map(make_disjoint_window, get_rolling_token_windows(ids, lm.eot_token_id, block, 1)))
        reference = reference_logprob(lm.model.model, windows)
        assert score == pytest.approx(reference, rel=1e-4)
        assert lm.model.perplexity(text) == pytest.approx(math.exp(-reference / len(ids)), rel=1e-4)
    assert len(lm.tok_encode(texts[1])) > 3 * block  # the long one really took several windows


def test_loglikelihood_is_the_summed_log_softmax(lm):
    model = lm.model.model
    (score, _), (empty, _) = lm.loglikelihood(
        requests("loglikelihood", ("The river flows", " into the sea"), ("", "The river"))
    )
    for context, continuation, got in (
        (lm.tok_encode("The river flows"), lm.tok_encode(" into the sea"), score),
        ([lm.eot_token_id], lm.tok_encode("The river"), empty),
    ):
        tokens = context + continuation
        with torch.no_grad():
            logp = model(torch.tensor([tokens[:-1]])).logits[0].log_softmax(-1)
        expected = sum(logp[len(context) - 1 + k, t].item() for k, t in enumerate(continuation))
        assert got == pytest.approx(expected, rel=1e-5)


def test_is_greedy(lm):
    context = lm.tok_encode("The history of the city")
    greedy = lm.model.generate_ids(context, 6, temperature=0, stop_at_eos=False)
    assert lm.model.loglikelihood(context, greedy)[1] is True
    other = greedy[:-1] + [(greedy[-1] + 1) % lm.model.config.vocab_size]
    assert lm.model.loglikelihood(context, other)[1] is False
    continuation = lm.tok_decode(greedy)
    if lm.tok_encode(lm.tok_decode(context) + continuation)[len(context) :] == greedy:  # the text round-trips
        assert lm.loglikelihood(requests("loglikelihood", (lm.tok_decode(context), continuation)))[0][1] is True


def test_batching_does_not_change_results(tiny_ftp_run, lm, texts):
    one = FtplmLM(pretrained=str(tiny_ftp_run), batch_size=1)
    pairs = [("The", " war"), ("", "A city"), (texts[1], " and the"), (texts[0], texts[0][:40]), ("It is", " a")]
    for kind, reqs in (("loglikelihood", pairs), ("loglikelihood_rolling", [(t,) for t in texts] + [("Hello world",)])):
        batched, single = (getattr(m, kind)(requests(kind, *reqs)) for m in (lm, one))
        for a, b in zip(batched, single):
            a, b = (a, b) if kind == "loglikelihood_rolling" else (a[0], b[0])
            assert a == pytest.approx(b, rel=1e-5, abs=1e-5)


def test_generate_until_is_ftplm_greedy_generation(lm, texts):
    block, n = lm.model.config.block_size, 12
    prompts = ["The", "In 1900 the", texts[1]]  # the last one is left-truncated to leave room for the generation
    full = [lm.model.generate(lm.tok_encode(p)[-(block - n) :], n, temperature=0) for p in prompts]
    until = [".", full[0][-3:]]  # a stop string that occurs (tiny models repeat themselves)
    out = lm.generate_until(
        requests("generate_until", *[(p, {"until": until, "max_gen_toks": n, "do_sample": False}) for p in prompts])
    )
    for text, got in zip(full, out):
        assert got == text[: min((text.find(s) for s in until if s in text), default=len(text))]
    assert len(out[0]) < len(full[0])
    sampled = {"until": [], "max_gen_toks": n, "do_sample": True, "temperature": 1.0, "seed": 3}
    twice = [lm.generate_until(requests("generate_until", ("The", dict(sampled))))[0] for _ in range(2)]
    assert twice[0] == twice[1]


@pytest.mark.parametrize("run", ["tiny_ftp_run", "tiny_gpt_run"])
def test_simple_evaluate_on_the_local_tasks(run, request, task_manager):
    results = simple_evaluate(
        model="ftplm",
        model_args=f"pretrained={request.getfixturevalue(run)},batch_size=8",
        tasks=["ftplm_heldout"],
        task_manager=task_manager,
        limit=4,
    )["results"]
    expected = {
        "ftplm_heldout_ppl": "bits_per_byte,none",
        "ftplm_heldout_continuation": "acc,none",
        "ftplm_heldout_topic": "acc,none",
        "ftplm_heldout_next_word": "exact_match,first-word",
    }
    for task, metric in expected.items():
        assert math.isfinite(results[task][metric]), (task, results[task])
    assert results["ftplm_heldout_ppl"]["bits_per_byte,none"] > 0


def test_ftplm_lm_eval_command(tiny_ftp_run, task_dir):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ftplm",
            "lm-eval",
            "--model",
            "ftplm",
            "--model_args",
            f"pretrained={tiny_ftp_run}",
            "--tasks",
            "ftplm_heldout_ppl",
            "--include_path",
            str(task_dir),
            "--limit",
            "3",
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},  # see one_torch_thread
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = [line for line in proc.stdout.splitlines() if line.startswith("|ftplm_heldout_ppl")]
    assert table and "bits_per_byte" in table[0], proc.stdout


def test_bad_input_is_one_clear_line(tmp_path, tiny_data, task_dir, task_manager, capsys):
    with pytest.raises(FtplmError, match="no such run"):
        simple_evaluate(
            model="ftplm",
            model_args=f"pretrained={tmp_path / 'missing'}",
            tasks=["ftplm_heldout_ppl"],
            task_manager=task_manager,
            limit=1,
        )
    with pytest.raises(FtplmError, match="pretrained=RUN"):
        FtplmLM()
    capsys.readouterr()
    assert (
        main(
            [
                "lm-eval",
                "--model",
                "ftplm",
                "--model_args",
                f"pretrained={tiny_data}",
                "--tasks",
                "ftplm_nope",
                "--include_path",
                str(task_dir),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("ftplm lm-eval: error: lm-eval: Tasks not found: ftplm_nope")
    assert main(["lm-eval-tasks", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "t")]) == 2
    assert "not a prepared data directory" in capsys.readouterr().err


def test_lm_eval_stays_optional():
    """Without lm-eval the rest of ftplm imports and `ftplm lm-eval` says how to install it, in one line."""
    code = (
        "import sys; sys.modules['lm_eval'] = None\n"
        "import ftplm.api, ftplm.cli, ftplm.eval\n"
        "sys.exit(ftplm.cli.main(['lm-eval', '--model', 'ftplm']))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "pip install 'ftplm[lmeval]'" in proc.stderr


def test_help(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "lm-eval" in capsys.readouterr().out
    assert main(["lm-eval", "--help"]) == 0
    out = capsys.readouterr().out
    assert "ftplm lm-eval" in out and "--model_args" in out and "--include_path" in out
