"""The decoding engine: GenerationConfig validates every option once; a DecodeSession whose rows join and leave
between steps stays lossless (greedy: each row's tokens are its own generation; sampling: its exact distribution)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.stats import chisquare
from test_speculative import BLOCK, DRAFTERS_FOR, MODELS, VOCAB, exact_sequence_probs, random_model

from ftplm.errors import FtplmError
from ftplm.generate import DecodeSession, GenerationConfig, Sampling, generate

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ANY = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 300),
    st.floats(allow_nan=True),
    st.text(max_size=4),
    st.lists(st.integers(-1, 3), max_size=3),
)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(fields=st.fixed_dictionaries({}, optional={f.name: ANY for f in dataclasses.fields(GenerationConfig)}))
def test_config_accepts_good_options_and_rejects_bad_ones_with_one_line(fields):
    """Any values for any fields: a valid config whose sampling is usable, or an FtplmError of one line."""
    try:
        config = GenerationConfig(**fields)
    except FtplmError as e:
        assert str(e) and "\n" not in str(e)
        return
    assert config.max_new_tokens >= 0 and isinstance(config.stop, tuple)
    assert config.sampling.probs(torch.randn(2, 5)).shape == (2, 5)
    assert not config.adaptive or config.speculative is not None
    assert config.replace() == config  # normalised values validate again


def test_config_messages_are_the_same_everywhere(tiny_gpt_run):
    """The Python API, generate() and the CLI say the same line for the same bad option."""
    from ftplm.api import load
    from ftplm.cli import main

    tm = load(tiny_gpt_run)
    with pytest.raises(FtplmError) as direct:
        GenerationConfig(top_p=2)
    with pytest.raises(FtplmError) as api:
        tm.generate("x", 4, top_p=2)
    with pytest.raises(FtplmError) as low:
        generate(tm.model, torch.tensor([[1]]), 4, top_p=2)
    assert str(direct.value) == str(api.value) == str(low.value)
    assert main(["generate", str(tiny_gpt_run), "--prompt", "x", "--top-p", "2"]) == 2
    with pytest.raises(FtplmError, match="unexpected keyword"):
        tm.generate("x", 4, temprature=0)


@pytest.mark.parametrize("model_type", ["ftp", "gpt"])
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(data=st.data())
def test_rows_joining_and_leaving_mid_generation_stay_lossless(model_type, data):
    """Rows join a running session at random steps (some with drafters, some plain), some are cancelled: every
    row that finishes has exactly the tokens of its own greedy generation."""
    model = MODELS[model_type]
    n_rows = data.draw(st.integers(2, 5), label="rows")
    plans = []
    for _ in range(n_rows):
        length = data.draw(st.integers(1, BLOCK - 4), label="prompt length")
        prompt = data.draw(st.lists(st.integers(0, 4), min_size=length, max_size=length), label="prompt")
        drafter = data.draw(st.sampled_from((None, *DRAFTERS_FOR[model_type])), label="drafter")
        config = GenerationConfig(
            data.draw(st.integers(1, 12), label="max_new_tokens"),
            temperature=0,
            speculative=drafter,
            tree=data.draw(st.booleans(), label="tree") or None,
        )
        plans.append(
            (
                data.draw(st.integers(0, 6), label="joins at step"),
                prompt,
                config,
                data.draw(st.booleans(), label="cancelled"),
            )
        )
    session = DecodeSession(model, eos_id=None)
    rows, step = [], 0
    while len(rows) < n_rows or session.active:
        for at, prompt, config, cancel in plans:
            if at == step:
                rows.append((session.add(prompt, config), prompt, config, cancel))
        for row, _, _, cancel in rows:
            if cancel and len(row.out) >= 1:
                session.cancel(row)
        session.step()
        step += 1
    for row, prompt, config, _ in rows:
        if row.finish_reason == "cancelled":
            continue
        expected = generate(model, torch.tensor([prompt]), config.replace(speculative=None, tree=None))
        assert row.out == expected[0, len(prompt) :].tolist(), (prompt, config)
        assert row.finish_reason == "length"


@pytest.mark.parametrize("drafter", [None, "ftp", "lookup"])
def test_a_row_joining_a_running_batch_samples_its_exact_distribution(drafter):
    """A row that joins after two steps of others (different lengths, holes in the shared cache) follows its own
    exact distribution."""
    model = random_model("ftp", vocab=6, scale=5.0, seed=3)
    prompt, runs, n = [1, 2, 1], 500, 2
    sampling = Sampling(1.0)
    counts: dict[tuple[int, ...], int] = {}
    for run in range(runs):
        session = DecodeSession(model)
        for other in ([3], [4, 5, 0, 1, 2]):
            session.add(other, GenerationConfig(6, seed=2 * run + 7, speculative=drafter))
        session.step()
        session.step()
        row = session.add(prompt, GenerationConfig(n, seed=run, speculative=drafter))
        for _ in session.run():
            pass
        counts[tuple(row.out)] = counts.get(tuple(row.out), 0) + 1
    exact = exact_sequence_probs(model, prompt, n, sampling)
    big = sorted(seq for seq, p in exact.items() if p * runs >= 5)
    observed = [counts.get(s, 0) for s in big] + [runs - sum(counts.get(s, 0) for s in big)]
    expected = [exact[s] * runs for s in big] + [runs * (1 - sum(exact[s] for s in big))]
    assert len(big) >= 4 and chisquare(observed, expected).pvalue > 1e-3


def test_seeded_rows_do_not_depend_on_their_neighbours():
    """A seeded sampled row gives the same tokens alone and in a batch with others (its own generator)."""
    model = MODELS["gpt"]
    config = GenerationConfig(8, temperature=1.0, seed=11, speculative="lookup")
    alone = DecodeSession(model)
    row = alone.add([1, 2, 3], config)
    list(alone.run())
    crowd = DecodeSession(model)
    crowd.add([5, 5, 5, 5, 5, 5], GenerationConfig(8, seed=3))
    crowded = crowd.add([1, 2, 3], config)
    crowd.add([0], GenerationConfig(3, temperature=0))
    list(crowd.run())
    assert crowded.out == row.out


def test_logprobs_and_echo():
    """Each new token's log-probability under the model (before temperature), its top alternatives, and with echo
    the prompt's own (the first token has none)."""
    model = MODELS["gpt"]
    session = DecodeSession(model)
    row = session.add([1, 2, 3], GenerationConfig(4, temperature=0, logprobs=2, echo=True))
    list(session.run())
    x = torch.tensor([[1, 2, 3, *row.out]])
    with torch.no_grad():
        logp = model(x).logits[0].double().log_softmax(-1)
    assert [e.token for e in row.prompt_logprobs] == [1, 2, 3] and row.prompt_logprobs[0].logprob is None
    assert [e.logprob for e in row.prompt_logprobs[1:]] == pytest.approx([float(logp[0, 2]), float(logp[1, 3])])
    assert [e.token for e in row.logprobs] == row.out
    for i, e in enumerate(row.logprobs):
        assert e.logprob == pytest.approx(float(logp[2 + i, e.token]))
        assert len(e.top) == 2 and e.top[0][0] == e.token  # greedy: the chosen token is the most likely
    with pytest.raises(FtplmError, match=r"logprobs must be an integer in 0\.\.20"):
        GenerationConfig(logprobs=21)


def test_rows_of_a_vocabulary_the_model_lacks_are_refused():
    session = DecodeSession(MODELS["gpt"])
    for bad, says in (([VOCAB], "token ids must be"), ([], "the prompt is empty"), ([1] * BLOCK, "no room")):
        with pytest.raises(FtplmError, match=says):
            session.add(bad, GenerationConfig(2))
    assert not session.active
