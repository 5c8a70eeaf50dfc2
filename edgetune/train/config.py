"""Trainer settings: one frozen dataclass; YAML recipes and CLI flags map onto it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from ..errors import ConfigError

Method = Literal["qlora", "qdora", "lora", "dora"]
METHODS = get_args(Method)
#: Scale-out strategies: data parallel (torch DDP), FSDP2 ``fully_shard``, DeepSpeed ZeRO 1/2/3.
Strategy = Literal["ddp", "fsdp", "zero1", "zero2", "zero3"]
STRATEGIES = get_args(Strategy)
Device = Literal["auto", "cpu", "cuda"]


@dataclass(frozen=True)
class TrainConfig:
    """Every field is a ``train`` flag and a YAML key; its docstring is the flag's help."""

    model: str
    """Hugging Face causal-LM dir or Hub id, org/name (Llama / Phi-3 / Mistral / Qwen2 family)."""
    data: str
    """Training JSONL (messages, prompt/completion or text per line)."""
    out: str
    """Run dir: adapter/, checkpoints/, metrics.jsonl, loss.png, config.yaml."""
    revision: str | None = None
    """Branch, tag or commit of a Hub id ``model`` (default main); the run records the commit."""
    eval_data: str | None = None
    """Optional held-out JSONL; eval loss is logged every ``eval_every`` steps."""
    method: Method = "qlora"
    """qlora / qdora (NF4 base) or lora / dora (full-precision base)."""
    rank: int = 16
    """LoRA rank r."""
    alpha: float = 32.0
    """LoRA alpha; the update is scaled by alpha / rank."""
    dropout: float = 0.0
    """Dropout on the adapter input (0 keeps DoRA from holding a dequantized weight)."""
    target_modules: str = "all-linear"
    """PEFT target: every linear projection of attention and MLP by default."""
    max_steps: int | None = None
    """Optimizer steps; overrides ``epochs`` when set."""
    epochs: float = 1.0
    """Passes over the training data when ``max_steps`` is not set."""
    lr: float = 2e-4
    """Peak learning rate (cosine decay after linear warm-up)."""
    warmup_steps: int = 10
    """Linear warm-up steps."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of ``lr``."""
    weight_decay: float = 0.0
    """AdamW weight decay on adapter weights."""
    batch_size: int = 8
    """Sequences per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    seq_len: int = 512
    """Longest sequence; longer examples are truncated with a warning (refused if strict)."""
    strict: bool = False
    """Refuse examples longer than ``seq_len`` instead of truncating."""
    packing: bool = False
    """Pack several examples into each ``seq_len`` row (attention kept per example)."""
    train_on_prompt: bool = False
    """Also take loss on prompt / user tokens."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory."""
    eval_every: int = 50
    """Steps between eval-loss measurements (needs ``eval_data``)."""
    save_every: int = 50
    """Steps between checkpoints."""
    keep_checkpoints: int = 2
    """Checkpoints kept on disk (oldest removed first)."""
    seed: int = 0
    """Seed for adapter init, dropout and data order."""
    device: Device = "auto"
    """auto (CUDA when present, else CPU), cpu or cuda."""
    nproc: int = 1
    """Processes per node (one per GPU; on CPU, at most one per core); > 1 launches workers."""
    strategy: Strategy = "ddp"
    """How workers split the work: ddp, fsdp (FSDP2), zero1 / zero2 / zero3 (DeepSpeed)."""
    nnodes: int = 1
    """Nodes in the job; each node runs the same command with its own ``node_rank``."""
    node_rank: int = 0
    """This node's index in [0, nnodes)."""
    master_addr: str = "127.0.0.1"
    """Address of node 0, where the workers meet (multi-node: an address all nodes reach)."""
    master_port: int = 0
    """Port on node 0 for the workers' rendezvous; 0: a free port (one node) or 29500 (several)."""

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        for name in (
            "rank",
            "batch_size",
            "grad_accum",
            "seq_len",
            "eval_every",
            "save_every",
            "keep_checkpoints",
        ):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.epochs <= 0 or self.lr <= 0:
            raise ConfigError("epochs and lr must be positive")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.strategy not in STRATEGIES:
            raise ConfigError(
                f"strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}"
            )
        if self.nproc < 1 or self.nnodes < 1:
            raise ConfigError(f"nproc and nnodes must be >= 1, got {self.nproc} and {self.nnodes}")
        if not 0 <= self.node_rank < self.nnodes:
            raise ConfigError(f"node_rank must be in [0, {self.nnodes}), got {self.node_rank}")

    @property
    def quantized(self) -> bool:
        return self.method in ("qlora", "qdora")

    @property
    def use_dora(self) -> bool:
        return self.method in ("dora", "qdora")

    @property
    def distributed(self) -> bool:
        """More than one worker process asked for."""
        return self.nproc * self.nnodes > 1
