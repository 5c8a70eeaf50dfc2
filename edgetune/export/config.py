"""Export settings."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from ..kernels import Q4_BLOCK_SIZES

QUANTS = ("int4", "int8", "none")
HEAD_QUANTS = ("int8", "int4", "fp32")


@dataclass(frozen=True)
class ExportConfig:
    quant: str = "int4"
    """int4 (MatMulNBits block weights), int8 (8-bit block weights) or none (fp32)."""
    block_size: int = 32
    """Weights per quantization block along K (16…256)."""
    symmetric: bool = True
    """Symmetric blocks (zero point 8) or asymmetric (stored 4-bit zero points)."""
    accuracy_level: int = 4
    """MatMulNBits accuracy_level: 4 = int8 activations (fastest on CPU), 0 = fp32 math."""
    lm_head: str = "int8"
    """LM head precision for int4 exports; an int4 head is a known source of wrong tokens."""
    eval_data: str | None = None
    """JSONL (or .txt) held-out text for the parity report; default: the bundled task."""
    report_tokens: int = 32
    """Greedy steps compared between PyTorch and ONNX fp32."""
    opset: int = 18
    """ONNX opset of the exported decoder."""

    def __post_init__(self) -> None:
        if self.quant not in QUANTS:
            raise ConfigError(f"quant must be one of {', '.join(QUANTS)}, got {self.quant!r}")
        if self.block_size not in Q4_BLOCK_SIZES:
            raise ConfigError(f"block size must be one of {Q4_BLOCK_SIZES}, got {self.block_size}")
        if self.lm_head not in HEAD_QUANTS:
            raise ConfigError(f"lm_head must be one of {', '.join(HEAD_QUANTS)}")
        if not 0 <= self.accuracy_level <= 4:
            raise ConfigError(f"accuracy level must be 0…4, got {self.accuracy_level}")
