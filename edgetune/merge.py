"""Merge a LoRA / DoRA adapter into its base: ``merge(model_dir, adapter_dir, out) -> out``.

    edgetune merge --model BASE --adapter RUN/adapter --out MERGED

One pass over the base checkpoint, tensor by tensor: each tensor is read (fp32), the adapter's
update for it is applied (``edgetune.merge_math``), and it is written in the base's own dtype
(bf16 stays bf16) to layer-sized safetensors shards with Hugging Face's index, so the merge
holds about one tensor, not the model. For an adapter trained on an NF4 base (qlora / qdora)
every weight training quantized is first quantized and dequantized exactly as training saw it;
merging into the original fp weights instead (or into a 4-bit model) gives a model that
differs measurably from the one that was trained.

Every adapter tensor is checked against the base's headers (module present, shapes fit)
before anything is written; the output is written to a temporary sibling and renamed into
place when complete. No torch, transformers or peft: ``load_adapted`` (the adapter-applied
model, through PEFT) is what a merge is compared against.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .bundle import commit_dir, read_json
from .errors import ConfigError, ModelError, OutputExistsError
from .merge_math import LoraUpdate, apply_bias, apply_update, lora_scale, nf4_roundtrip
from .models import check_model_dir, load_model
from .tensors import INDEX, SafetensorsSource, SafetensorsWriter

BASE_QUANTIZATIONS = ("auto", "nf4", "none")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
#: edgetune's note beside a PEFT adapter: training method and how the base was quantized
#: (defined here, in a torch-free module, for the merge, bench and train to share)
ADAPTER_META = "edgetune_adapter.json"
PEFT_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the HF model
#: files of a model dir besides its weights that a merged model dir carries over
COPIED_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
#: a model smaller than this is one ``model.safetensors``; larger ones get layer-sized shards
MIN_SHARD_BYTES = 256 << 20
_LAYER = re.compile(r"^model\.layers\.\d+\.")
_TORCH_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}
#: adapter tensors by name suffix -> their role in a LoraUpdate
_PARTS = {
    ".lora_A.weight": "a",
    ".lora_B.weight": "b",
    ".lora_B.bias": "b_bias",
    ".lora_magnitude_vector": "magnitude",
    ".lora_embedding_A": "emb_a",
    ".lora_embedding_B": "emb_b",
}
#: adapter_config.json fields of LoRA variants whose merge is not LoRA's or DoRA's
_UNSUPPORTED = (
    "use_bdlora",
    "alora_invocation_tokens",
    "arrow_config",
    "velora_config",
    "monteclora_config",
    "kasa_config",
    "mica",
    "use_qalora",
    "trainable_token_indices",
    "layer_replication",
    "target_parameters",
)


def adapter_base_quantization(adapter_dir: Path) -> str:
    """'nf4' or 'none', from edgetune's note beside the adapter (absent: a plain PEFT adapter)."""
    meta = Path(adapter_dir) / ADAPTER_META
    if meta.is_file():
        return json.loads(meta.read_text()).get("base_quantization", "none")
    return "none"


def check_adapter_dir(adapter_dir: Path) -> None:
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (Path(adapter_dir) / name).is_file():
            raise ModelError(f"{Path(adapter_dir) / name}: missing (not a PEFT adapter directory)")


def load_adapted(
    model_dir: str | os.PathLike,
    adapter_dir: str | os.PathLike,
    base_quantization: str = "auto",
    merged_base: bool = False,
):
    """The base with the adapter applied, through PEFT (the whole model in fp32: for tests
    and evaluation, not for merging). ``base_quantization`` nf4 puts the base in the same
    NF4 form as training: NF4 layers (``merged_base=False``) or their fp32 dequantization
    (``merged_base=True``, what merging adds the delta to)."""
    from peft import PeftModel

    from .train.nf4 import nf4_roundtrip_weights, quantize_model_nf4

    adapter_dir = Path(adapter_dir)
    check_adapter_dir(adapter_dir)
    if base_quantization == "auto":
        base_quantization = adapter_base_quantization(adapter_dir)
    model = load_model(model_dir)
    if base_quantization == "nf4":
        (nf4_roundtrip_weights if merged_base else quantize_model_nf4)(model)
    try:
        return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
    except (ValueError, KeyError, RuntimeError) as e:
        raise ModelError(
            f"{adapter_dir}: adapter does not fit the model in {model_dir} ({e})"
        ) from None


# -- the adapter, checked against the base's headers -----------------------------------------


@dataclass
class MergePlan:
    """What the adapter does to each base tensor it touches (adapter tensors by name, read
    when that base tensor is written)."""

    adapter: SafetensorsSource
    #: base weight -> its LoRA / DoRA update
    updates: dict[str, LoraUpdate] = field(default_factory=dict)
    #: base bias -> (lora_B.bias, scale), for lora_bias adapters
    biases: dict[str, tuple[str, float]] = field(default_factory=dict)
    #: base tensor -> the adapter tensor that replaces it (modules_to_save, saved base layers)
    replaced: dict[str, str] = field(default_factory=dict)

    def touches(self, name: str) -> bool:
        return name in self.updates or name in self.biases or name in self.replaced


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's ``rank_pattern`` / ``alpha_pattern`` lookup (``peft.utils.other.get_pattern_key``):
    the first key that matches the end of the module name."""
    for key in patterns or {}:
        if re.match(rf"(.*\.)?({key})$", module):
            return patterns[key]
    return default


def _saved_module(name: str, modules_to_save: list[str]) -> bool:
    """Whether tensor ``name`` belongs to a module listed in ``modules_to_save``."""
    module = name.rpartition(".")[0]
    return any(module == m or module.endswith(f".{m}") for m in modules_to_save)


def read_plan(adapter_dir: Path, src: SafetensorsSource) -> MergePlan:
    """The adapter's updates by base tensor, every adapter tensor checked against the base's
    headers: a module the base lacks or a shape that does not fit is a ModelError naming the
    adapter file and tensor."""
    cfg_path, file = adapter_dir / ADAPTER_CONFIG, adapter_dir / ADAPTER_WEIGHTS
    cfg = read_json(cfg_path, ModelError)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ModelError(
            f"{cfg_path}: peft_type {cfg.get('peft_type')!r}; edgetune merges LORA "
            "adapters (LoRA, DoRA, rsLoRA)"
        )
    for key in _UNSUPPORTED:
        if cfg.get(key):
            raise ModelError(
                f"{cfg_path}: {key} is set; edgetune merges plain LoRA and DoRA adapters only"
            )
    try:
        r0, alpha0 = int(cfg["r"]), float(cfg["lora_alpha"])
    except (KeyError, TypeError, ValueError) as e:
        raise ModelError(f"{cfg_path}: needs numeric 'r' and 'lora_alpha' ({e})") from None
    use_dora, rslora = bool(cfg.get("use_dora")), bool(cfg.get("use_rslora"))
    modules_to_save = list(cfg.get("modules_to_save") or [])
    if cfg.get("task_type") in ("SEQ_CLS", "TOKEN_CLS"):  # PEFT adds the heads itself
        modules_to_save += ["classifier", "score"]
    train_biases = cfg.get("bias", "none") != "none"  # bias "all" / "lora_only" saves biases

    adapter = SafetensorsSource(adapter_dir)
    adapter.tensors = {k: v for k, v in adapter.tensors.items() if v.file.name == ADAPTER_WEIGHTS}
    plan = MergePlan(adapter)
    modules: dict[str, dict[str, str]] = defaultdict(dict)
    for key in adapter.names():
        if not key.startswith(PEFT_PREFIX):
            raise ModelError(
                f"{file}: tensor {key!r} is not a PEFT tensor of a causal LM "
                f"(names start with {PEFT_PREFIX!r})"
            )
        name = key[len(PEFT_PREFIX) :]
        suffix = next((s for s in _PARTS if name.endswith(s)), None)
        if suffix is not None:
            modules[name[: -len(suffix)]][_PARTS[suffix]] = key
        elif ".base_layer." in name:  # PEFT saves a LoRA-adapted embedding's base weight too
            plan.replaced[name.replace(".base_layer.", ".")] = key
        elif _saved_module(name, modules_to_save) or (train_biases and name.endswith(".bias")):
            plan.replaced[name] = key
        else:
            raise ModelError(
                f"{file}: tensor {key!r} is neither a LoRA / DoRA tensor nor part "
                f"of modules_to_save {modules_to_save}"
            )

    for base_name, key in plan.replaced.items():
        if base_name not in src:
            raise ModelError(
                f"{file}: tensor {key!r} replaces {base_name}, which the base model "
                f"in {src.dir} does not have"
            )
        _expect(file, key, adapter.info(key).shape, src.info(base_name).shape, base_name)
    for module, parts in modules.items():
        r = int(_pattern_value(cfg.get("rank_pattern"), module, r0))
        alpha = float(_pattern_value(cfg.get("alpha_pattern"), module, alpha0))
        _add_module(plan, file, src, module, parts, r, alpha, use_dora, rslora)
    return plan


def _expect(file: Path, key: str, got: tuple, want: tuple, base_name: str, why: str = "") -> None:
    if tuple(got) != tuple(want):
        raise ModelError(
            f"{file}: tensor {key!r} has shape {list(got)}, expected {list(want)} "
            f"for the base tensor {base_name}{why}"
        )


def _add_module(
    plan: MergePlan,
    file: Path,
    src: SafetensorsSource,
    module: str,
    parts: dict[str, str],
    r: int,
    alpha: float,
    use_dora: bool,
    rslora: bool,
) -> None:
    """Check one adapted module's tensors against its base weight and record its update."""
    embedding = "emb_a" in parts or "emb_b" in parts
    a, b = (parts.get(p) for p in (("emb_a", "emb_b") if embedding else ("a", "b")))
    some = next(iter(parts.values()))
    if a is None or b is None:
        missing = "A" if a is None else "B"
        raise ModelError(
            f"{file}: {some!r} has no lora_{'embedding_' if embedding else ''}{missing} partner"
        )
    weight = f"{module}.weight"
    if weight not in src:
        raise ModelError(
            f"{file}: tensor {a!r} adapts module {module}, which the base model in "
            f"{src.dir} does not have (no tensor {weight})"
        )
    shape = src.info(weight).shape
    if len(shape) != 2:
        raise ModelError(
            f"{file}: tensor {a!r} adapts {weight} of shape {list(shape)}; edgetune "
            "merges LoRA into 2-D (linear or embedding) weights"
        )
    rank = f" at rank {r}"
    if embedding:  # lora_embedding_A (r, vocab), lora_embedding_B (dim, r)
        _expect(file, a, plan.adapter.info(a).shape, (r, shape[0]), weight, rank)
        _expect(file, b, plan.adapter.info(b).shape, (shape[1], r), weight, rank)
    else:  # lora_A (r, in), lora_B (out, r)
        _expect(file, a, plan.adapter.info(a).shape, (r, shape[1]), weight, rank)
        _expect(file, b, plan.adapter.info(b).shape, (shape[0], r), weight, rank)
    magnitude = parts.get("magnitude")
    if use_dora and magnitude is None:
        raise ModelError(f"{file}: use_dora is set but {module} has no lora_magnitude_vector")
    if magnitude is not None:
        if not use_dora:
            raise ModelError(
                f"{file}: tensor {magnitude!r} is DoRA's, but the adapter config "
                "does not set use_dora"
            )
        if embedding:
            raise ModelError(
                f"{file}: tensor {magnitude!r}: DoRA on an embedding is not "
                "supported by edgetune merge"
            )
        _expect(file, magnitude, plan.adapter.info(magnitude).shape, (shape[0],), weight)
    scale = lora_scale(r, alpha, rslora)
    plan.updates[weight] = LoraUpdate(module, a, b, scale, magnitude, embedding)
    if "b_bias" in parts:  # lora_bias: B's bias (times the scale) goes to the base bias
        bias = f"{module}.bias"
        if bias not in src:
            raise ModelError(
                f"{file}: tensor {parts['b_bias']!r} needs {bias}, which the base "
                f"model in {src.dir} does not have"
            )
        _expect(
            file,
            parts["b_bias"],
            plan.adapter.info(parts["b_bias"]).shape,
            src.info(bias).shape,
            bias,
        )
        plan.biases[bias] = (parts["b_bias"], scale)


def nf4_weights(shapes: dict[str, tuple[int, ...]]) -> set[str]:
    """The tensors (of {name: shape}) training held as NF4: the weight of every nn.Linear but
    the LM head (``edgetune.train.nf4.linear_targets``), which in the supported families'
    checkpoints are the 2-D ``*.weight`` tensors inside ``model.layers`` (the attention and
    MLP projections; norms are 1-D, the embedding and LM head sit outside the layers)."""
    return {
        n
        for n, shape in shapes.items()
        if _LAYER.match(n) and n.endswith(".weight") and len(shape) == 2
    }


# -- the output ------------------------------------------------------------------------------


def _order(name: str) -> tuple:
    """Sort key: the model's own tensors, then the LM head; model.layers.2 before
    model.layers.10, so each layer's tensors stay together."""
    return (
        not name.startswith("model."),
        [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)],
    )


def plan_shards(
    src: SafetensorsSource, shard_bytes: int | None = None
) -> list[tuple[str, list[str]]]:
    """[(file name, tensor names)] of the output, in order. Whole decoder layers (or single
    other tensors) are packed into a shard until the next would take it past ``shard_bytes``
    (default: the larger of the largest tensor, the largest layer and ``MIN_SHARD_BYTES``);
    a layer larger than that is split between tensors. One shard is ``model.safetensors``."""
    units: list[list[str]] = []  # one decoder layer's tensors, or one other tensor
    last = None
    for n in sorted(src.names(), key=_order):
        m = _LAYER.match(n)
        key = m.group(0) if m else n
        if key != last:
            units.append([])
        units[-1].append(n)
        last = key
    nbytes = {n: src.info(n).nbytes for u in units for n in u}
    if shard_bytes is None:
        shard_bytes = max(max(sum(nbytes[n] for n in u) for u in units), MIN_SHARD_BYTES)
    groups: list[list[str]] = [[]]
    size = 0
    for unit in units:
        if groups[-1] and size + sum(nbytes[n] for n in unit) > shard_bytes:
            groups.append([])
            size = 0
        for n in unit:
            if groups[-1] and size + nbytes[n] > shard_bytes:
                groups.append([])
                size = 0
            groups[-1].append(n)
            size += nbytes[n]
    if len(groups) == 1:
        return [("model.safetensors", groups[0])]
    return [
        (f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors", g) for i, g in enumerate(groups)
    ]


def merged_tensor(name: str, src: SafetensorsSource, plan: MergePlan, nf4: set[str]) -> np.ndarray:
    """Tensor ``name`` of the merged model: the base's (NF4 round trip where training had it
    so), or its modules_to_save replacement, plus the adapter's update. Untouched tensors are
    their stored values (fp32 for bf16, which the writer rounds back to the same bits)."""
    info = src.info(name)
    if not plan.touches(name) and name not in nf4:
        return src.array(name) if info.dtype == "BF16" else src.raw(name)
    if name in plan.replaced:
        x = np.ascontiguousarray(plan.adapter.array(plan.replaced[name]), np.float32)
    else:
        x = src.array(name)
        if name in nf4:
            nf4_roundtrip(x)
    if name in plan.updates:
        upd, ad = plan.updates[name], plan.adapter
        apply_update(
            x,
            ad.array(upd.a),
            ad.array(upd.b),
            upd,
            ad.array(upd.magnitude) if upd.magnitude else None,
        )
    if name in plan.biases:
        key, scale = plan.biases[name]
        apply_bias(x, plan.adapter.array(key), scale)
    return x


def _write_config(model_dir: Path, work: Path, dtype: str) -> None:
    """config.json as the base's, its dtype field(s) naming the dtype the weights are in."""
    cfg = read_json(model_dir / "config.json", ModelError)
    if dtype in _TORCH_DTYPES:
        for key in [k for k in ("dtype", "torch_dtype") if k in cfg] or ["torch_dtype"]:
            cfg[key] = _TORCH_DTYPES[dtype]
    (work / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def merge(
    model_dir: str | os.PathLike,
    adapter_dir: str | os.PathLike,
    out: str | os.PathLike,
    base_quantization: str = "auto",
    force: bool = False,
    shard_bytes: int | None = None,
) -> Path:
    """Write a plain Hugging Face model dir (safetensors, the base's dtype) with the adapter
    merged in; ``shard_bytes`` caps each weights file (default: about one decoder layer)."""
    from tqdm.auto import tqdm

    out, model_dir, adapter_dir = Path(out), Path(model_dir), Path(adapter_dir)
    if out.exists() and not force:
        raise OutputExistsError(f"{out}: output exists (use --force to replace it)")
    if base_quantization not in BASE_QUANTIZATIONS:
        raise ConfigError(
            f"base_quantization must be one of {', '.join(BASE_QUANTIZATIONS)}, "
            f"got {base_quantization!r}"
        )
    check_model_dir(model_dir)
    check_adapter_dir(adapter_dir)
    if base_quantization == "auto":
        base_quantization = adapter_base_quantization(adapter_dir)
    src = SafetensorsSource(model_dir)
    plan = read_plan(adapter_dir, src)  # every check before the first byte is written
    nf4 = (
        nf4_weights({n: i.shape for n, i in src.tensors.items()})
        if base_quantization == "nf4"
        else set()
    )
    shards = plan_shards(src, shard_bytes)

    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        bar = tqdm(total=len(src.names()), desc="merge", unit="tensor", disable=None, leave=False)
        for fname, names in shards:
            specs = [(n, src.info(n).dtype, src.info(n).shape) for n in names]
            with SafetensorsWriter(work / fname, specs) as w:
                for n in names:
                    w.write(n, merged_tensor(n, src, plan, nf4))
                    bar.update()
        bar.close()
        if len(shards) > 1:
            index = {
                "metadata": {"total_size": sum(i.nbytes for i in src.tensors.values())},
                "weight_map": {n: f for f, names in shards for n in sorted(names)},
            }
            (work / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        _write_config(model_dir, work, src.dtype())
        for name in COPIED_FILES:
            if (model_dir / name).is_file():
                shutil.copy(model_dir / name, work / name)
        commit_dir(work, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out
