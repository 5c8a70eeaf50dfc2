"""fp32 ONNX export of a Hugging Face decoder through Optimum (decoder with KV cache)."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

from ..errors import ModelError


def optimum_export(model_dir: Path, out_dir: Path, opset: int) -> Path:
    """``text-generation-with-past`` export; returns the path of ``model.onnx``."""
    from optimum.exporters.onnx import main_export

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("optimum").setLevel(logging.ERROR)
        try:
            main_export(
                str(model_dir),
                output=str(out_dir),
                task="text-generation-with-past",
                opset=opset,
                device="cpu",
                do_validation=False,
                trust_remote_code=False,
                no_post_process=False,
            )
        except (ValueError, KeyError, OSError) as e:
            raise ModelError(f"{model_dir}: Optimum could not export this model ({e})") from None
    path = out_dir / "model.onnx"
    if not path.is_file():
        raise ModelError(f"{model_dir}: Optimum export produced no model.onnx")
    return path
