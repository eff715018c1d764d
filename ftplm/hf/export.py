"""`ftplm export --format hf`: a run as a transformers checkpoint directory, written atomically.

GPT runs become plain GPT-2 (`AutoModelForCausalLM.from_pretrained(OUT)`, no remote code): the trunk is GPT-2's
architecture once the weights are transposed into its Conv1D layout and the biases ftplm leaves out (bias=False) are
written as zeros. FTP runs keep ftplm's parameter names and ship their own modeling code (configuration_ftp.py,
modeling_ftp.py from this package), loaded with trust_remote_code=True. Either way the exported model is run against
the ftplm model on a probe sequence before anything is written: an export that would not reproduce the run fails.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tokenizers import Tokenizer

from ftplm.checkpoint import load_pretrained
from ftplm.errors import FtplmError
from ftplm.model import LanguageModel
from ftplm.tokenizer import EOS, eos_id

if TYPE_CHECKING:  # transformers is optional (the hf extra)
    from transformers import PreTrainedModel

FORMATS = ("hf",)
REMOTE_CODE = ("configuration_ftp.py", "modeling_ftp.py")  # copied from this package into FTP exports
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")  # GPT-2 stores (in, out)
PROBE_TOKENS = 32
TOLERANCE = 1e-3  # max |logit difference| allowed by the export check (fp32 measures ~1e-6)


@dataclass
class Exported:
    path: Path
    model_type: str  # "gpt" (plain GPT-2) or "ftp" (needs trust_remote_code=True)
    max_logit_diff: float  # exported model vs ftplm on the probe sequence


def export_hf(run: str | Path, out: str | Path) -> Exported:
    """Write the run's model and tokenizer to `out` (absent or empty) as a transformers checkpoint directory."""
    transformers = _require_transformers()
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FtplmError(f"{out} already exists and is not an empty directory: export to a new one")
    model, tokenizer = load_pretrained(run)
    model = model.float()
    eos = eos_id(tokenizer)
    verbosity, bars = transformers.logging.get_verbosity(), transformers.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()  # their notices and progress bars are not ours to print
    transformers.logging.disable_progress_bar()
    tmp = out.parent / f".{out.name}.tmp{os.getpid()}"
    try:
        hf_model = gpt2_model(model, eos) if model.cfg.model_type == "gpt" else ftp_model(model, eos)
        diff = _check_logits(model, hf_model, tokenizer.get_vocab_size())
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        hf_model.save_pretrained(tmp)
        if model.cfg.model_type == "ftp":
            for name in REMOTE_CODE:
                shutil.copyfile(Path(__file__).with_name(name), tmp / name)
        save_tokenizer(tokenizer, tmp, model.cfg.block_size)
        os.rename(tmp, out)  # replaces `out` only if it is (still) an empty directory
    except OSError as e:
        raise FtplmError(f"cannot write {out}: {e.strerror or e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        transformers.logging.set_verbosity(verbosity)
        if bars:
            transformers.logging.enable_progress_bar()
    return Exported(out, model.cfg.model_type, diff)


def _require_transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise FtplmError("export --format hf needs transformers: pip install 'ftplm[hf]'") from None
    return transformers


def gpt2_model(model: LanguageModel, eos: int) -> PreTrainedModel:
    """A transformers GPT2LMHeadModel computing exactly what the ftplm GPT computes."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = model.cfg
    config = GPT2Config(
        vocab_size=cfg.vocab_size,
        n_positions=cfg.block_size,
        n_embd=cfg.n_embd,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        n_inner=4 * cfg.n_embd,
        activation_function="gelu_new",
        layer_norm_epsilon=1e-5,
        resid_pdrop=cfg.dropout,
        embd_pdrop=cfg.dropout,
        attn_pdrop=cfg.dropout,
        tie_word_embeddings=True,
        bos_token_id=eos,
        eos_token_id=eos,
    )
    hf_model = GPT2LMHeadModel(config)
    hf_model.load_state_dict(gpt2_state_dict(vocabulary_state_dict(model), hf_model.state_dict()), strict=True)
    return _ready(hf_model, eos)


def gpt2_state_dict(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ftplm GPT weights under GPT-2's names and layout: `theirs` gives the names and shapes to fill."""
    mapped, used = {}, set()
    for name, target in theirs.items():
        source = "lm_head.weight" if name == "lm_head.weight" else "trunk." + name.removeprefix("transformer.")
        if source in ours:
            tensor = ours[source].t() if name.endswith(CONV1D) else ours[source]
            used.add(source)
        elif name.endswith(".bias"):  # ftplm with bias=False; GPT-2 always has biases
            tensor = torch.zeros_like(target)
        else:
            raise FtplmError(f"cannot export to GPT-2: no weight for {name}")
        if tensor.shape != target.shape:
            raise FtplmError(
                f"cannot export to GPT-2: {source} has shape {tuple(tensor.shape)}, GPT-2 expects {tuple(target.shape)}"
            )
        mapped[name] = tensor.contiguous()
    if unused := sorted(set(ours) - used):
        raise FtplmError(f"cannot export to GPT-2: no place for {unused[:3]}")
    return mapped


def vocabulary_state_dict(model: LanguageModel) -> dict[str, torch.Tensor]:
    """The model's weights with the embedding and LM-head matrices cut to the vocabulary: the exported model has no
    padding rows (vocab_multiple), which transformers' generate would otherwise be free to sample."""
    cfg = model.cfg
    vocab_matrices = ("wte.weight", "lm_head.weight")
    return {
        name: tensor[: cfg.vocab_size] if name.endswith(vocab_matrices) else tensor
        for name, tensor in model.state_dict().items()
    }


def ftp_model(model: LanguageModel, eos: int) -> PreTrainedModel:
    """The remote-code FTPForCausalLM (this package's copy of modeling_ftp.py) with the run's weights."""
    from ftplm.hf.configuration_ftp import FTPConfig
    from ftplm.hf.modeling_ftp import FTPForCausalLM

    cfg = model.cfg
    if model.masked_inputs:
        raise FtplmError(
            "the exported FTP modeling code has no masked decoder inputs (decoder_inputs='masked'): "
            "serve or evaluate this run with ftplm"
        )
    fields = (
        "vocab_size",
        "block_size",
        "n_layer",
        "n_head",
        "n_embd",
        "dropout",
        "bias",
        "n_future",
        "n_pseudo",
        "dec_n_layer",
        "dec_n_head",
        "dec_n_embd",
        "pseudo_norm",
    )
    config = FTPConfig(**{f: getattr(cfg, f) for f in fields}, bos_token_id=eos, eos_token_id=eos)
    config.auto_map = {
        "AutoConfig": "configuration_ftp.FTPConfig",
        "AutoModelForCausalLM": "modeling_ftp.FTPForCausalLM",
    }
    hf_model = FTPForCausalLM(config)
    # dec_mask (input_dropout runs) is a training-time input only: inference never feeds it
    hf_model.load_state_dict({k: v for k, v in vocabulary_state_dict(model).items() if k != "dec_mask"}, strict=True)
    return _ready(hf_model, eos)


def _ready(hf_model: PreTrainedModel, eos: int) -> PreTrainedModel:
    hf_model.generation_config.bos_token_id = hf_model.generation_config.eos_token_id = eos
    hf_model.generation_config.pad_token_id = eos  # GPT-2's convention; spares generate() its warning
    return hf_model.eval()


@torch.no_grad()
def _check_logits(model: LanguageModel, hf_model: torch.nn.Module, n_tokens: int) -> float:
    """Max |logit difference| of the two models on a fixed random sequence; FtplmError beyond TOLERANCE."""
    generator = torch.Generator().manual_seed(0)
    idx = torch.randint(n_tokens, (1, min(PROBE_TOKENS, model.cfg.block_size)), generator=generator)
    diff = (hf_model(idx).logits - model(idx).logits).abs().max().item()
    if not diff <= TOLERANCE:
        raise FtplmError(f"export check failed: the exported model's logits differ from the run's by {diff:.2e}")
    return diff


def save_tokenizer(tokenizer: Tokenizer, directory: Path, block_size: int) -> None:
    """The run's tokenizer as a transformers fast tokenizer: same ids, no added BOS, exact decode."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(tokenizer.to_str()),
        eos_token=EOS,
        bos_token=EOS,
        unk_token=EOS,
        model_max_length=block_size,
        clean_up_tokenization_spaces=False,
    )
    fast.save_pretrained(directory)
    # name the class every transformers version knows (5.x writes its own "TokenizersBackend")
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2) + "\n")
