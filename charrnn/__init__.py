"""charrnn: character-level recurrent language models on PyTorch.

Train on any UTF-8 text or a named corpus, generate with temperature / top-k / top-p
in batches, evaluate in bits per character.  See :func:`train`, :func:`load`.
"""

__version__ = "0.1.0"

from .api import LanguageModel, load, train  # noqa: E402
from .errors import CharRNNError  # noqa: E402

__all__ = ["train", "load", "LanguageModel", "CharRNNError", "__version__"]
