"""ftplm: Future Token Prediction language models (and their GPT baselines) in PyTorch."""

__version__ = "0.1.0"

from ftplm.api import TextModel, load

__all__ = ["TextModel", "__version__", "load"]
