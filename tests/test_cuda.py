"""The CUDA path: training in bf16 with fused AdamW, the chunked loss, lossless speculative decoding, checkpoints.

Skipped where there is no GPU (this machine's CI); `make gpu-check` runs them on a lent one. The CPU test suite
covers the same code paths on the CPU.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_model, save_model

from ftplm.config import TrainConfig, preset
from ftplm.generate import Sampling, generate
from ftplm.kernels import linear_cross_entropy
from ftplm.model import build_model
from ftplm.train import CUDA_VOCAB_MULTIPLE, Trainer, autocast, make_optimizer

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here")]
CUDA = torch.device("cuda")


def tiny(model_type: str, vocab: int = 64, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = dataclasses.replace(preset("tiny", model_type).model, vocab_size=vocab)
    return build_model(cfg).to(CUDA)


@pytest.mark.parametrize("model_type", ["ftp", "gpt"])
def test_bf16_training_with_fused_adamw_learns(model_type):
    model = tiny(model_type)
    optimizer = make_optimizer(model, TrainConfig(learning_rate=3e-3), CUDA)
    assert optimizer.defaults.get("fused")
    x = torch.randint(0, 64, (8, 32), device=CUDA)
    losses = []
    for _ in range(20):
        with autocast(CUDA, "bf16"):
            loss = model(x, x.roll(-1, 1)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0] * 0.8


def test_chunked_linear_cross_entropy_matches_reference_on_cuda():
    torch.manual_seed(0)
    rows, width, vocab = 20_000, 64, 1000  # more rows than one CUDA chunk
    hidden = torch.randn(rows, width, device=CUDA, requires_grad=True)
    weight = torch.randn(vocab, width, device=CUDA, requires_grad=True)
    targets = torch.randint(0, vocab, (rows,), device=CUDA)
    targets[::7] = -1
    coef = (targets >= 0).float() / (targets >= 0).sum()
    loss, _ = linear_cross_entropy(hidden, weight, targets, coef)
    loss.backward()
    h2, w2 = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    ref = F.cross_entropy(h2 @ w2.T, targets, ignore_index=-1)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(hidden.grad, h2.grad, rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(weight.grad, w2.grad, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("drafter", ["ftp", "lookup"])
def test_speculative_greedy_equals_plain_on_cuda(drafter):
    model = tiny("ftp").double().eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(8.0)  # peaked distributions: drafts get accepted
    prompt = torch.randint(0, 64, (3, 8), device=CUDA)
    plain = generate(model, prompt, 40, Sampling(0), seed=0)
    fast = generate(model, prompt, 40, Sampling(0), seed=0, speculative=drafter)
    assert torch.equal(plain, fast)


def test_checkpoint_weights_round_trip_from_cuda(tmp_path):
    model, copy = tiny("ftp", seed=0), tiny("ftp", seed=1)
    save_model(model, str(tmp_path / "model.safetensors"))  # tied embedding and head saved once, as checkpoints do
    load_model(copy, str(tmp_path / "model.safetensors"), device=str(CUDA))
    assert all(torch.equal(v, copy.state_dict()[k]) for k, v in model.state_dict().items())


def test_a_new_cuda_run_pads_its_vocabulary(tiny_data, tmp_path):
    trainer = Trainer(tiny_data, tmp_path / "run", preset_name="tiny", train_overrides={"max_steps": 1}, device="cuda")
    assert trainer.model_cfg.vocab_multiple == CUDA_VOCAB_MULTIPLE
    assert trainer.model_cfg.padded_vocab_size % 64 == 0
