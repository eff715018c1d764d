"""`ftplm export --format hf`: the exported transformers model computes what the run computes (logits, greedy
generation, state vectors, loss), its tokenizer gives the same ids, GPT needs no remote code and FTP does, and the
command fails cleanly (one line, exit 2, nothing touched) on bad input."""

from __future__ import annotations

import dataclasses
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("transformers")
from test_cli import _tree_digest as tree_digest
from test_cli import run_cli
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2LMHeadModel
from transformers.modeling_outputs import CausalLMOutputWithPast

import ftplm
from ftplm.api import TextModel
from ftplm.checkpoint import load_pretrained, save_pretrained
from ftplm.data import TokenData
from ftplm.errors import FtplmError
from ftplm.hf.export import export_hf
from ftplm.model import build_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

KINDS = ("gpt", "ftp")
ATOL = 1e-4  # fp32


@pytest.fixture(scope="module")
def runs(tiny_gpt_run, tiny_ftp_run) -> dict[str, Path]:
    return {"gpt": tiny_gpt_run, "ftp": tiny_ftp_run}


@pytest.fixture(scope="module")
def exported(runs, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("export")
    return {kind: export_hf(run, root / kind).path for kind, run in runs.items()}


def load_hf(path: Path, kind: str):
    """The exported model and tokenizer, as a user loads them (remote code only where FTP needs it)."""
    remote = kind == "ftp"
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=remote).eval()
    return model, AutoTokenizer.from_pretrained(path, trust_remote_code=remote)


@pytest.fixture(scope="module")
def pairs(runs, exported) -> dict[str, tuple[TextModel, torch.nn.Module, object]]:
    """kind -> (the run as ftplm loads it, the exported model, the exported tokenizer)."""
    return {kind: (ftplm.load(runs[kind]), *load_hf(exported[kind], kind)) for kind in KINDS}


@pytest.fixture(scope="module")
def prompts(tiny_data, pairs) -> list[list[int]]:
    """Beginnings of held-out documents, of different lengths, as token ids."""
    docs = TokenData(tiny_data).heldout("test")[:4]
    model = pairs["gpt"][0]
    return [model.encode(doc.text)[: 8 + 9 * i] for i, doc in enumerate(docs)]


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# ------------------------------------------------------------------------------------------------------
# the exported model computes what the run computes
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@torch.no_grad()
def test_logits_match_on_random_tokens(pairs, kind):
    ours, theirs, _ = pairs[kind]
    block, vocab = ours.config.block_size, ours.config.vocab_size
    g = torch.Generator().manual_seed(0)
    for shape in ((2, block), (3, 7), (1, 1)):  # the full context, short, one token
        idx = torch.randint(vocab, shape, generator=g)
        diff = max_diff(theirs(idx).logits, ours.model(idx).logits)
        assert diff < ATOL, (kind, shape, diff)


@pytest.mark.parametrize("kind", KINDS)
@torch.no_grad()
def test_logits_match_on_real_prompts_alone_and_left_padded(pairs, prompts, kind):
    ours, theirs, _ = pairs[kind]
    width = max(len(p) for p in prompts)
    batch = torch.full((len(prompts), width), ours.eos_id)
    mask = torch.zeros_like(batch)
    for i, p in enumerate(prompts):
        batch[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # as generate() passes them (GPT-2 needs them)
    padded = theirs(batch, attention_mask=mask, position_ids=positions).logits
    assert torch.isfinite(padded).all()  # padding rows too: nothing NaN to leak into the real ones
    for i, p in enumerate(prompts):
        idx = torch.tensor([p])
        expected = ours.model(idx).logits[0]
        assert max_diff(theirs(idx).logits[0], expected) < ATOL, kind
        assert max_diff(padded[i, width - len(p) :], expected) < ATOL, kind


@pytest.mark.parametrize("kind", KINDS)
@torch.no_grad()
def test_greedy_generate_matches_ftplm(pairs, prompts, kind):
    ours, theirs, _ = pairs[kind]
    for p in prompts[:3]:
        expected = ours.generate_ids(p, 20, temperature=0, stop_at_eos=False)
        for use_cache in (True, False):
            out = theirs.generate(
                torch.tensor([p]),
                attention_mask=torch.ones(1, len(p), dtype=torch.long),
                max_new_tokens=20,
                do_sample=False,
                eos_token_id=None,
                use_cache=use_cache,
            )
            assert out[0, len(p) :].tolist() == expected, (kind, use_cache)


@pytest.mark.parametrize("kind", KINDS)
@torch.no_grad()
def test_sampled_generate_step_logits_match_a_full_forward(pairs, prompts, kind):
    """Sampling through the KV cache: each step's logits are those of ftplm on the whole sequence so far."""
    ours, theirs, _ = pairs[kind]
    p = prompts[1]
    torch.manual_seed(0)
    out = theirs.generate(
        torch.tensor([p]),
        max_new_tokens=20,
        do_sample=True,
        top_k=0,
        eos_token_id=None,
        return_dict_in_generate=True,
        output_logits=True,
    )
    assert out.sequences.shape == (1, len(p) + 20)
    full = ours.model(out.sequences).logits[0, len(p) - 1 : -1]
    assert max_diff(torch.cat(out.logits), full) < ATOL, kind


@pytest.mark.parametrize("kind", KINDS)
@torch.no_grad()
def test_forward_with_a_cache_continues_the_sequence(pairs, prompts, kind):
    """A hand-written decoding loop: prefill, then one token, then several at once, each after the cached ones."""
    ours, theirs, _ = pairs[kind]
    idx = torch.tensor([prompts[3]])
    name = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"  # 5.x / 4.x
    expected = ours.model(idx).logits
    out = theirs(idx[:, :10], use_cache=True)
    logits = [out.logits]
    for piece in (idx[:, 10:11], idx[:, 11:15], idx[:, 15:]):
        out = theirs(piece, use_cache=True, **{name: getattr(out, name)})
        logits.append(out.logits)
    assert max_diff(torch.cat(logits, dim=1), expected) < ATOL, kind


@pytest.mark.parametrize("kind", KINDS)
@torch.no_grad()
def test_hidden_states_end_in_the_state_vectors_and_loss_matches(pairs, prompts, kind):
    ours, theirs, _ = pairs[kind]
    idx = torch.tensor([prompts[2]])
    out = theirs(idx, labels=idx, output_hidden_states=True)
    assert len(out.hidden_states) == ours.config.n_layer + 1
    assert max_diff(out.hidden_states[-1], ours.model.state_vectors(idx)) < ATOL
    expected = ours.model(idx[:, :-1], targets=idx[:, 1:]).next_token_ce  # shifted by one, as HF does inside
    assert abs(out.loss.item() - expected.item()) < ATOL


@pytest.mark.parametrize("kind", KINDS)
def test_biases_and_pseudo_norm_export_too(tiny_ftp_run, tmp_path, kind):
    """The tiny runs have bias=False; a model with (non-zero) biases, pseudo_norm and a padded vocabulary exports
    exactly as well (without the padding rows)."""
    base, tokenizer = load_pretrained(tiny_ftp_run)
    variant = {"model_type": kind, "bias": True, "pseudo_norm": True, "dropout": 0.1, "vocab_multiple": 64}
    model = build_model(dataclasses.replace(base.cfg, **variant))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or name == "pseudo_pos":
                p.normal_(0.0, 0.5)
    save_pretrained(model, tokenizer, tmp_path / "run")
    theirs, _ = load_hf(export_hf(tmp_path / "run", tmp_path / "out").path, kind)
    idx = torch.randint(model.cfg.vocab_size, (2, model.cfg.block_size), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert max_diff(theirs(idx).logits, model.eval()(idx).logits) < ATOL
    assert theirs.get_output_embeddings().weight.shape[0] == model.cfg.vocab_size


# ------------------------------------------------------------------------------------------------------
# tokenizer and loading
# ------------------------------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(text=st.text(max_size=80))
def test_tokenizer_round_trips_with_the_runs_ids(pairs, text):
    ours, _, theirs = pairs["ftp"]
    ids = theirs(text)["input_ids"]
    assert ids == ours.encode(text)  # no BOS added, same merges
    assert theirs.decode(ids) == text


@pytest.mark.parametrize("kind", KINDS)
def test_tokenizer_specials(pairs, prompts, kind):
    ours, model, theirs = pairs[kind]
    assert theirs.eos_token_id == theirs.bos_token_id == model.config.eos_token_id == ours.eos_id
    assert theirs.model_max_length == ours.config.block_size
    text = ours.decode(prompts[3]) + "<|endoftext|>"
    assert theirs.encode(text) == ours.encode(text) and ours.encode(text)[-1] == ours.eos_id


def test_gpt_is_plain_gpt2(exported):
    files = {p.name for p in exported["gpt"].iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= files
    assert not any(name.endswith(".py") for name in files)
    model = AutoModelForCausalLM.from_pretrained(exported["gpt"], trust_remote_code=False)
    assert type(model) is GPT2LMHeadModel and model.config.model_type == "gpt2"
    assert model.config.activation_function == "gelu_new" and model.config.n_inner == 4 * model.config.n_embd


def test_ftp_needs_remote_code_that_does_not_need_ftplm(exported):
    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoModelForCausalLM.from_pretrained(exported["ftp"], trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(exported["ftp"], trust_remote_code=True)
    assert type(model).__name__ == "FTPForCausalLM" and model.lm_head.weight is model.dec_wte.weight
    for name in ("configuration_ftp.py", "modeling_ftp.py"):
        source = (exported["ftp"] / name).read_text()
        assert not re.search(r"^\s*(import|from)\s+ftplm", source, re.M), name


def test_missing_transformers_is_one_clear_error(runs, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    with pytest.raises(FtplmError, match=r"pip install 'ftplm\[hf\]'"):
        export_hf(runs["gpt"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------------
# the command
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_cli_export(capsys, runs, tmp_path, kind):
    (tmp_path / "out").mkdir()  # an empty directory may be the target
    code, out, err = run_cli(capsys, "export", str(runs[kind]), str(tmp_path / "out"), "--format", "hf")
    assert code == 0, err
    assert out.strip() == (
        f"exported {runs[kind]} ({kind}) to {tmp_path / 'out'}: AutoModelForCausalLM.from_pretrained"
        f'("{tmp_path / "out"}"{", trust_remote_code=True" if kind == "ftp" else ""})'
    )
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary directory left behind


def test_cli_bad_input_gives_one_line_and_exit_2(capsys, runs, tmp_path):
    run = runs["ftp"]
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    corrupt = tmp_path / "corrupt"
    shutil.copytree(run / "latest", corrupt)
    (corrupt / "model.safetensors").write_bytes((corrupt / "model.safetensors").read_bytes()[:100])
    (tmp_path / "file").write_text("x")
    before = {p: tree_digest(p) for p in (run, taken, corrupt)}
    cases = [
        ([str(run), str(taken)], "already exists and is not an empty directory"),
        ([str(run), str(tmp_path / "file")], "already exists"),
        ([str(tmp_path / "norun"), str(tmp_path / "o1")], "no such run"),
        ([str(corrupt), str(tmp_path / "o2")], "corrupt checkpoint"),
        ([str(run), str(tmp_path / "o3"), "--format", "onnx"], "invalid choice"),
    ]
    for args, pattern in cases:
        code, _, err = run_cli(capsys, "export", *args)
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and re.search(pattern, lines[0]), (args, code, err)
    assert {p: tree_digest(p) for p in before} == before
    assert (tmp_path / "file").read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corrupt", "file", "taken"]
