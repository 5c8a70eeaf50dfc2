"""Export settings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from ..errors import ConfigError
from ..kernels import Q4_BLOCK_SIZES

Quant = Literal["int4", "int8", "int8-dynamic", "none"]
HeadQuant = Literal["int8", "int4", "fp32"]
Algo = Literal["rtn", "hqq", "gptq"]
Embedding = Literal["fp32", "int8", "int4"]
QUANTS, HEAD_QUANTS, ALGOS, EMBEDDINGS = map(get_args, (Quant, HeadQuant, Algo, Embedding))
# ``export --format gguf --quant``: llama.cpp's file types (``gguf_types.FILE_TYPES``)
GGUF_QUANTS = ("f32", "f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0")
GGUF_ALIASES = {"int4": "q4_0", "int8": "q8_0", "none": "f16"}  # the ONNX names, for GGUF


def gguf_quant(name: str) -> str:
    """A GGUF ``--quant`` (or an ONNX name for one) as llama.cpp's file type, checked."""
    quant = GGUF_ALIASES.get(name, name)
    if quant not in GGUF_QUANTS:
        raise ConfigError(f"GGUF quant must be one of {', '.join(GGUF_QUANTS)}, got {quant!r}")
    return quant


@dataclass(frozen=True)
class ExportConfig:
    """Every field is an ``export`` flag and a YAML key; its docstring is the flag's help."""

    quant: Quant = "int4"
    """int4 (MatMulNBits 4-bit blocks), int8 (MatMulNBits 8-bit blocks; with accuracy_level
    4 the activations are quantized to int8 per block at run time), int8-dynamic (ONNX
    Runtime's quantize_dynamic: per-channel int8 weights, one uint8 scale per activation
    tensor, DynamicQuantizeLinear + MatMulInteger; ORT backend only) or none (fp32)."""
    algo: Algo = "rtn"
    """How int4 blocks are chosen: rtn (round to nearest), hqq (half-quadratic, no data) or
    gptq (Hessian-compensated rounding over calibration text). Same layout for all three."""
    embedding: Embedding = "fp32"
    """Embedding table: fp32, or int8/int4 blocks along the hidden size read through
    com.microsoft GatherBlockQuantized (same block size and symmetry as the projections)."""
    block_size: int = 32
    """Weights per quantization block along K (16…256)."""
    symmetric: bool | None = None
    """Symmetric blocks (zero point 8) or asymmetric (stored 4-bit zero points); None: the
    algorithm's natural choice, symmetric for rtn and gptq, asymmetric for hqq."""
    accuracy_level: int = 4
    """MatMulNBits accuracy_level: 4 = int8 activations (fastest on CPU), 0 = fp32 math."""
    lm_head: HeadQuant = "int8"
    """LM head precision for int4 exports; an int4 head is a known source of wrong tokens."""
    eval_data: str | None = None
    """JSONL (or .txt) held-out text for the parity report; default: the bundled task."""
    eval_tokens: int = 2048
    """At most this many held-out tokens go through the parity report (texts in order, the
    last one cut short): its cost is two forward passes over them, about 5 s per
    Phi-3-mini layer on 2 cores at 2048; top-1 agreement is then known to about ±1 %."""
    report_tokens: int = 32
    """Greedy steps compared between PyTorch and ONNX fp32."""
    report_ort_bytes: int = 1_000_000_000
    """The report runs ONNX Runtime on the bundle (graph parity) only when its weight data
    is at most this many bytes: a session holds all of it, which at Phi-3-mini size would
    break the export's memory bound; ``edgetune eval`` runs it separately."""
    opset: int = 18
    """ONNX opset of the exported decoder."""
    calib_data: str | None = None
    """GPTQ calibration text (JSONL or .txt); default: ``eval_data`` when given (the user's
    domain; the report then notes it scored text GPTQ saw), else the bundled task's
    training split, never the held-out text the parity report scores."""
    calib_tokens: int = 4096
    """About how many calibration tokens GPTQ's Hessians are summed over."""
    gptq_damp: float = 0.01
    """GPTQ damping: this fraction of the mean Hessian diagonal is added to the diagonal."""
    act_order: bool = False
    """GPTQ: quantize columns in order of decreasing Hessian diagonal (static block scales)."""

    def __post_init__(self) -> None:
        if self.quant not in QUANTS:
            hint = " (a GGUF type: add --format gguf)" if self.quant in GGUF_QUANTS else ""
            raise ConfigError(f"quant must be one of {', '.join(QUANTS)}, got {self.quant!r}{hint}")
        if self.block_size not in Q4_BLOCK_SIZES:
            raise ConfigError(f"block size must be one of {Q4_BLOCK_SIZES}, got {self.block_size}")
        if self.lm_head not in HEAD_QUANTS:
            raise ConfigError(f"lm_head must be one of {', '.join(HEAD_QUANTS)}")
        if not 0 <= self.accuracy_level <= 4:
            raise ConfigError(f"accuracy level must be 0…4, got {self.accuracy_level}")
        if self.algo not in ALGOS:
            raise ConfigError(f"algo must be one of {', '.join(ALGOS)}, got {self.algo!r}")
        if self.symmetric is None:
            object.__setattr__(self, "symmetric", self.algo != "hqq")
        if self.algo != "rtn" and self.quant != "int4":
            raise ConfigError(
                f"algo {self.algo} chooses 4-bit blocks: it needs quant int4, not {self.quant}"
            )
        if self.embedding not in EMBEDDINGS:
            raise ConfigError(
                f"embedding must be one of {', '.join(EMBEDDINGS)}, got {self.embedding!r}"
            )
        if self.eval_tokens < 2:
            raise ConfigError(f"eval tokens must be at least 2, got {self.eval_tokens}")
        if self.calib_tokens < 1:
            raise ConfigError(f"calib tokens must be positive, got {self.calib_tokens}")
        if not 0 < self.gptq_damp < 1:
            raise ConfigError(f"GPTQ damping must be in (0, 1), got {self.gptq_damp}")
        if self.algo != "gptq" and (self.act_order or self.calib_data):
            raise ConfigError("act order and calibration data apply to algo gptq only")
