"""edgetune.runtime: the torch-free edge runtime (numpy, onnxruntime, tokenizers).

``Model.load(bundle)`` verifies the bundle, then ``generate`` / ``stream`` / ``chat``.
"""

from .model import BACKENDS, Model, PromptError
from .sampling import SamplingConfig

__all__ = ["BACKENDS", "Model", "PromptError", "SamplingConfig"]
