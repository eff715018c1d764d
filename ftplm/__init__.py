"""ftplm: Future Token Prediction language models (and their GPT baselines) in PyTorch."""

__version__ = "0.1.0"


def load(path, device="cpu"):
    """Load a run directory, checkpoint or saved model: returns a TextModel (.generate, .embed, .save_pretrained)."""
    from ftplm.api import load as _load

    return _load(path, device)


__all__ = ["__version__", "load"]
