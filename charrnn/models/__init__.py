from .charlm import ARCHS, CharLM, ModelConfig

__all__ = ["ARCHS", "CharLM", "ModelConfig"]
