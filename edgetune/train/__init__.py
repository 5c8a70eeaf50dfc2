"""The trainer: QLoRA / QDoRA / LoRA / DoRA fine-tuning through PEFT.

``train`` is imported lazily so that reading the config (e.g. for ``--help``)
does not load torch.
"""

from .config import METHODS, STRATEGIES, TrainConfig

__all__ = ["METHODS", "STRATEGIES", "TrainConfig", "train"]


def __getattr__(name: str):
    if name == "train":
        from .loop import train

        return train
    raise AttributeError(name)
