from ..config import ARCHS, ModelConfig  # the model's options live with the others (no torch there)
from .charlm import CharLM

__all__ = ["ARCHS", "CharLM", "ModelConfig"]
