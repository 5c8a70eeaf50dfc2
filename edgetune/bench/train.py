"""``edgetune bench train``: QLoRA / QDoRA step time and peak memory against the usual stack.

A Phi-3-shaped model with random weights (values do not matter for speed), large enough
that weights dominate memory, saved once as an fp32 safetensors checkpoint; each setup loads
it the way a user would and trains a few steps with the same batch, in its own process so
its peak RSS (loading included) is its own:

* ``lora-fp32``   ``from_pretrained`` + PEFT LoRA over fp32 ``nn.Linear`` (edgetune's ``lora``)
* ``qlora``       ``load_model_nf4`` (quantized tensor by tensor while loading) + PEFT LoRA
                  over edgetune's ``NF4Linear`` (edgetune's default)
* ``qdora``       the same with DoRA (edgetune's NF4 DoRA layer)
* ``bnb-qlora``   ``from_pretrained`` + PEFT LoRA over bitsandbytes ``Linear4bit`` (NF4, double
                  quant), its CPU backend

Every setup runs with the allocator settings of edgetune's trainer
(``train.memory.return_freed_memory``), the baselines included, so the ratios measure the
methods, not the allocator.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import tempfile
import time
from typing import TYPE_CHECKING, cast

from . import best_round, in_fresh_process, peak_rss_bytes

if TYPE_CHECKING:
    from transformers import PreTrainedModel

SETUPS = ("lora-fp32", "qlora", "qdora", "bnb-qlora")


def _model(hidden: int, layers: int, vocab: int):
    import torch
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(0)
    cfg = Phi3Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        max_position_embeddings=1024,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    with torch.device("cpu"):
        return Phi3ForCausalLM(cfg).float()


def _copy_tokenizer(model_dir: str) -> None:
    import shutil

    from ..models import tiny_model_path

    for f in tiny_model_path().iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, model_dir)


def _run(
    setup: str,
    model_dir: str,
    vocab: int,
    batch: int,
    seq: int,
    steps: int,
    checkpointing: bool,
    out: mp.Queue,
) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from ..train.adapters import for_nf4_base
    from ..train.memory import return_freed_memory
    from ..train.nf4 import load_model_nf4

    return_freed_memory()  # as edgetune's trainer does; every setup, baselines included

    config = LoraConfig(
        r=16,
        lora_alpha=32,
        target_modules="all-linear",
        use_dora=setup == "qdora",
        task_type="CAUSAL_LM",
    )
    model: PreTrainedModel
    if setup in ("qlora", "qdora"):
        # load_model_nf4 is annotated nn.Module; what it returns is the transformers model
        model = cast("PreTrainedModel", load_model_nf4(model_dir))
        for_nf4_base(config)
    elif setup == "bnb-qlora":  # the usual stack: bitsandbytes quantizes while loading
        from transformers import BitsAndBytesConfig

        bnb = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.float32, quantization_config=bnb, device_map="cpu"
        )
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    for p in model.parameters():
        p.requires_grad_(False)
    if checkpointing:  # as PEFT's prepare_model_for_kbit_training sets up QLoRA by default
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    peft = get_peft_model(model, config)
    peft.train()  # as a trainer does: from_pretrained returns eval mode, where HF skips checkpointing
    opt = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(3, vocab, (batch, seq))
    times = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        loss = peft(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    n_params = sum(p.numel() for p in model.parameters())
    out.put(
        {
            "name": setup,
            "ms": 1e3 * sorted(times[1:])[len(times[1:]) // 2],
            "peak_rss_mb": peak_rss_bytes() / 2**20,
            "params_m": n_params / 1e6,
        }
    )


def bench(
    hidden: int = 1024,
    layers: int = 16,
    vocab: int = 32064,
    batch: int = 1,
    seq: int = 128,
    steps: int = 3,
    rounds: int = 2,
    checkpointing: bool = False,
    log=print,
) -> list[dict]:
    """Run every setup in a fresh process, ``rounds`` times in alternation (a slow phase of a
    shared machine then hits every setup; each keeps its fastest round, and the highest peak
    RSS of its rounds); ratios are against bitsandbytes and fp32 LoRA. ``checkpointing``:
    gradient checkpointing in every setup."""
    runs: dict[str, list[dict]] = {s: [] for s in SETUPS}
    with tempfile.TemporaryDirectory(prefix="edgetune-bench-train-") as model_dir:
        _model(hidden, layers, vocab).save_pretrained(model_dir)  # fp32 safetensors
        _copy_tokenizer(model_dir)  # a model dir is complete with one (not used for speed)
        for _ in range(rounds):
            for setup in SETUPS:
                r, code = in_fresh_process(
                    _run, setup, model_dir, vocab, batch, seq, steps, checkpointing
                )
                if r is None:
                    log(f"{setup}: failed (exit code {code})")
                    continue
                log(f"{setup}: {r['ms']:.0f} ms/step, peak RSS {r['peak_rss_mb']:.0f} MB")
                runs[setup].append(r)
    results = [
        {
            **best_round(runs[s], lambda r: -r["ms"], "peak_rss_mb"),
            "gradient_checkpointing": checkpointing,
        }
        for s in SETUPS
        if runs[s]
    ]
    by = {r["name"]: r for r in results}
    for r in results:
        for base in ("bnb-qlora", "lora-fp32"):
            if base in by and r["name"] != base:
                r[f"step_time_vs_{base}"] = r["ms"] / by[base]["ms"]
                r[f"peak_rss_vs_{base}"] = r["peak_rss_mb"] / by[base]["peak_rss_mb"]
        if r["name"] != "bnb-qlora" and "bnb-qlora" in by:
            r.update(baseline="bnb-qlora", ratio=by["bnb-qlora"]["ms"] / r["ms"])
    return results


def format_results(results: list[dict]) -> str:
    lines = [
        f"{'setup':<12}{'ms/step':>10}{'peak RSS MB':>13}{'vs bnb (time)':>15}"
        f"{'vs fp32 LoRA (time)':>21}{'vs fp32 LoRA (RSS)':>20}"
    ]
    for r in results:
        lines.append(
            f"{r['name']:<12}{r['ms']:>10.0f}{r['peak_rss_mb']:>13.0f}"
            f"{r.get('step_time_vs_bnb-qlora', float('nan')):>15.2f}"
            f"{r.get('step_time_vs_lora-fp32', float('nan')):>21.2f}"
            f"{r.get('peak_rss_vs_lora-fp32', float('nan')):>20.2f}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    res = bench()
    print(format_results(res))
    print(json.dumps(res))
