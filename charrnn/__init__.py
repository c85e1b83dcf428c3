"""charrnn: character-level recurrent language models on PyTorch.

Train on any UTF-8 text or a named corpus, generate with temperature / top-k / top-p
in batches, evaluate in bits per character.  See :func:`train`, :func:`load`.

:func:`train`, :func:`load` and :class:`LanguageModel` are imported on first use
(PEP 562), so that ``import charrnn.runtime`` (exported models, onnxruntime + NumPy)
never imports torch.
"""

__version__ = "0.1.0"

from .errors import CharRNNError  # noqa: E402

__all__ = ["train", "load", "LanguageModel", "CharRNNError", "__version__"]

_LAZY = ("train", "load", "LanguageModel")


def __getattr__(name: str):
    if name in _LAZY:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'charrnn' has no attribute '{name}'")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
