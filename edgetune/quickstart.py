"""``edgetune quickstart``: the whole path on the shipped tiny model, in one command.

data (bundled smart-home task) -> train (QLoRA, the default) -> merge -> export
(fp32 ONNX and int4 bundles) -> load with edgetune.runtime -> one table:
held-out exact match, size on disk and decode tokens/s for every stage.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, replace
from pathlib import Path

from .bundle import dir_bytes
from .data import load_examples, smart_home
from .errors import OutputExistsError
from .evaluate import EvalResult, evaluate_bundle, evaluate_torch
from .files import write_json


@dataclass(frozen=True)
class QuickstartConfig:
    """Every field is a ``quickstart`` flag. How to train and export comes from the recipes,
    shipped in examples/configs like every other recipe."""

    out: str = "edgetune-quickstart"
    """Everything goes here: data/, run/, merged/, bundle-fp32/, bundle/, quickstart.json."""
    recipe: str = "tiny-phi3_qlora_cpu"
    """Training recipe: the name of a shipped config (examples/configs) or a YAML file."""
    export_recipe: str = "tiny-phi3_int4_cpu"
    """Export recipe of the quantized bundle: a shipped config's name or a YAML file."""
    max_steps: int | None = None
    """Optimizer steps of fine-tuning (default: the recipe's)."""
    n_train: int = 2000
    """Generated training examples."""
    n_heldout: int = 100
    """Generated held-out examples (unseen device/action/room combinations)."""
    seed: int = 0
    """Seed of the generated data (the recipe seeds adapter init and data order)."""
    force: bool = False
    """Replace an existing output folder."""


@dataclass(frozen=True)
class Row:
    stage: str
    result: EvalResult
    size_bytes: int
    size_note: str

    def as_dict(self) -> dict:
        return {
            "stage": self.stage,
            **self.result.as_dict(),
            "size_bytes": self.size_bytes,
            "size_note": self.size_note,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Row":
        fields = ("exact_match", "perplexity", "decode_tokens_per_s", "examples")
        return cls(
            d["stage"], EvalResult(**{k: d[k] for k in fields}), d["size_bytes"], d["size_note"]
        )


TABLE = "quickstart.json"  # the table in OUT, for scripts: one object per row


def format_table(rows: list[Row]) -> str:
    head = f"{'stage':<24}{'exact match':>12}{'perplexity':>12}{'size on disk':>16}{'decode tok/s':>14}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r.stage:<24}{100 * r.result.exact_match:>11.1f}%{r.result.perplexity:>12.3f}"
            f"{r.size_bytes / 1e6:>10.2f} MB{r.size_note:>2}"
            f"{r.result.decode_tokens_per_s:>14.0f}"
        )
    return "\n".join(lines)


def quickstart(cfg: QuickstartConfig | None = None, log=print) -> list[Row]:
    from .config import load_config, shipped_config
    from .export import ExportConfig, export
    from .merge import load_adapted, merge
    from .models import load_model, load_tokenizer, tiny_model_path
    from .runtime import Model
    from .train import TrainConfig, train

    cfg = cfg or QuickstartConfig()
    out = Path(cfg.out)
    recipe, export_recipe = shipped_config(cfg.recipe), shipped_config(cfg.export_recipe)
    ecfg = load_config(ExportConfig, export_recipe)  # a bad recipe fails before any work
    if out.exists():
        if not cfg.force:
            raise OutputExistsError(f"{out}: output exists (use --force to replace it)")
        shutil.rmtree(out)
    base = tiny_model_path()
    log(f"[1/5] data: bundled smart-home task -> {out / 'data'}")
    train_path, heldout_path = smart_home.generate(
        out / "data", cfg.n_train, cfg.n_heldout, cfg.seed
    )
    heldout = load_examples(heldout_path)

    tcfg = load_config(
        TrainConfig,
        recipe,
        dict(
            model=str(base),
            data=str(train_path),
            eval_data=str(heldout_path),
            out=str(out / "run"),
            max_steps=cfg.max_steps,
        ),
    )
    length = f"{tcfg.max_steps} steps" if tcfg.max_steps else f"{tcfg.epochs:g} epochs"
    log(f"[2/5] train: {tcfg.method}, {length} ({recipe.name}) -> {out / 'run'}")
    run = train(tcfg)

    log(f"[3/5] merge -> {out / 'merged'}")
    merged = merge(base, run / "adapter", out / "merged")

    log(
        f"[4/5] export: fp32 ONNX -> {out / 'bundle-fp32'}, {ecfg.quant} ({export_recipe.name}) "
        f"-> {out / 'bundle'}"
    )
    bundle_fp32 = export(
        merged, out / "bundle-fp32", ExportConfig(quant="none"), log=lambda s: None
    )
    bundle = export(merged, out / "bundle", replace(ecfg, eval_data=str(heldout_path)), log=log)

    log("[5/5] evaluate every stage on the held-out split")
    tok = load_tokenizer(base)
    rows = [
        Row(
            "base (PyTorch)",
            evaluate_torch(load_model(base), tok, heldout),
            dir_bytes(base / "model.safetensors"),
            "",
        ),
        Row(
            f"fine-tuned ({tcfg.method})",
            evaluate_torch(load_adapted(base, run / "adapter"), tok, heldout),
            dir_bytes(run / "adapter" / "adapter_model.safetensors"),
            "*",
        ),
        Row(
            "merged (PyTorch fp32)",
            evaluate_torch(load_model(merged), tok, heldout),
            dir_bytes(merged / "model.safetensors"),
            "",
        ),
        Row(
            "ONNX fp32 bundle",
            evaluate_bundle(Model.load(bundle_fp32), heldout),
            dir_bytes(bundle_fp32),
            "",
        ),
        Row(
            f"{ecfg.quant} bundle",
            evaluate_bundle(Model.load(bundle), heldout),
            dir_bytes(bundle),
            "",
        ),
    ]
    write_json(out / TABLE, [r.as_dict() for r in rows])
    log("")
    log(format_table(rows))
    log(
        f"* adapter only; it runs on the NF4 base. {len(heldout)} held-out examples; "
        f"decode tok/s at batch 1. Bundle: {bundle}"
    )
    log(f'Try it: edgetune run {bundle} --prompt "turn off the porch lights at 10pm"')
    return rows
