"""The ``edgetune`` command: one small function per subcommand over the stage functions.

Exit codes: 0 success, 2 a user error (one line on stderr), 1 an internal failure,
130 interrupted. Heavy libraries (torch, transformers) load only in the
subcommands that need them.

The settings flags are not written here: ``edgetune.config.add_flags`` makes one per field of
the stage's config dataclass (TrainConfig, ExportConfig, SamplingConfig, QuickstartConfig),
with the field's docstring as help, and ``config_from_args`` resolves defaults < ``--config``
YAML < flags. Only what is not a setting (paths given positionally, --resume, --force,
--json, the backend) is hand-written.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from . import __version__
from .errors import EdgetuneError
from .noise import quiet

SCALING = ("nproc", "strategy", "nnodes", "node_rank", "master_addr", "master_port")

#: the extra that installs each optional library a subcommand may import (pyproject.toml)
EXTRAS = {
    **dict.fromkeys(("torch", "transformers", "peft", "accelerate", "matplotlib"), "train"),
    **dict.fromkeys(("optimum", "onnx_ir", "gguf", "sentencepiece"), "export"),
    **dict.fromkeys(("fastapi", "uvicorn", "pydantic", "llguidance", "multipart"), "serve"),
    "deepspeed": "distributed",
    "numba": "numba",
    "hls4ml": "fpga",
}


def _add_train(sub) -> None:
    from .config import add_flags
    from .train.config import TrainConfig

    p = sub.add_parser(
        "train",
        help="fine-tune with QLoRA / QDoRA / LoRA / DoRA",
        description="Fine-tune a Hugging Face causal LM (local dir or Hub id); writes RUN/adapter "
        "(PEFT format), metrics.jsonl, loss.png, config.yaml and checkpoints. "
        "Flags override values from --config YAML (recipes: examples/configs).",
    )
    add_flags(
        p,
        TrainConfig,
        exclusive=[("max_steps", "epochs")],
        groups={
            "scaling out": (
                "several processes / nodes (README: scaling out); > 1 process starts "
                "torchrun or DeepSpeed's launcher",
                SCALING,
            )
        },
    )
    p.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    p.set_defaults(func=cmd_train)


def cmd_train(args) -> int:
    from .config import config_from_args
    from .train import TrainConfig, train

    cfg = config_from_args(TrainConfig, args)
    try:
        run = train(cfg, resume=args.resume)
    except KeyboardInterrupt:
        saved = "last checkpoint" if cfg.distributed else "checkpoint saved"
        print(
            f"interrupted: {saved} in {cfg.out}/checkpoints; continue with --resume",
            file=sys.stderr,
        )
        return 130
    # one line per job: from rank 0 when torchrun/deepspeed started it, else from edgetune's
    # own launcher (its workers stay quiet)
    if os.environ.get("RANK", "0") == "0" and "EDGETUNE_LAUNCHED" not in os.environ:
        print(f"adapter: {run / 'adapter'}")
    return 0


def _add_revision(p, what: str = "the model") -> None:
    p.add_argument(
        "--revision",
        help=f"branch, tag or commit of {what} when it is a Hugging Face Hub id (org/name)",
    )


def _resolved(args, name: str) -> str:
    """``args.<name>`` as a local dir: a Hub id (at ``--revision``) as its cached snapshot."""
    from .hub import resolve_model

    return str(resolve_model(getattr(args, name), args.revision))


def cmd_merge(args) -> int:
    from .merge import merge

    out = merge(
        _resolved(args, "model"), args.adapter, args.out, args.base_quantization, force=args.force
    )
    print(f"merged model: {out}")
    return 0


def cmd_export(args) -> int:
    from .config import config_from_args
    from .export.config import ExportConfig

    if args.format == "gguf":
        from .export.config import gguf_quant
        from .export.gguf import export_gguf

        quant = gguf_quant(args.quant)  # a bad one fails before a Hub id is downloaded
        tokens = getattr(args, "eval_tokens", None)
        out = export_gguf(
            _resolved(args, "model"),
            args.out,
            quant,
            force=args.force,
            report=True,
            eval_data=getattr(args, "eval_data", None),
            eval_tokens=int(tokens) if tokens else ExportConfig.eval_tokens,
        )
        print(f"GGUF: {out}")
        return 0
    cfg = config_from_args(ExportConfig, args)  # bad flags fail before any download
    args.model = _resolved(args, "model")
    if args.target == "fpga":
        from .fpga.project import export_fpga

        out = export_fpga(args.model, args.out, block=cfg.block_size, force=args.force)
        print(f"HLS project: {out}")
        return 0
    from .export import export

    out = export(args.model, args.out, cfg, force=args.force)
    print(f"bundle: {out}")
    return 0


def cmd_export_adapter(args) -> int:
    from .export.gguf_lora import export_gguf_lora

    out = export_gguf_lora(args.adapter, _resolved(args, "base"), args.out, force=args.force)
    print(f"GGUF LoRA: {out} (llama.cpp: --lora {out}; Ollama: ADAPTER {out})")
    return 0


def cmd_verify(args) -> int:
    from .bundle import verify

    m = verify(args.bundle)
    print(
        f"{args.bundle}: OK ({len(m['files'])} files, {m['architecture']['model_type']}, "
        f"{m['quantization']['quant']})"
    )
    return 0


def cmd_eval(args) -> int:
    from .evaluate import evaluate_path

    r = evaluate_path(_resolved(args, "path"), args.data, args.limit)
    if args.json:
        print(json.dumps(r.as_dict()))
    else:
        print(
            f"exact match {100 * r.exact_match:.1f}%  perplexity {r.perplexity:.3f}  "
            f"decode {r.decode_tokens_per_s:.0f} tok/s  ({r.examples} examples)"
        )
    return 0


def _sampling(args) -> dict:
    """The sampling flags of ``run`` and ``chat``, checked (a bad value is a user error)."""
    from dataclasses import asdict

    from .config import config_from_args
    from .runtime import SamplingConfig

    return asdict(config_from_args(SamplingConfig, args))


def cmd_run(args) -> int:
    from .runtime import Model

    sampling = _sampling(args)
    model = Model.load(args.bundle, backend=args.backend, threads=args.threads)
    model.encode(args.prompt)  # empty or undecodable: a PromptError before the chat template
    prompt = args.prompt
    if not args.raw and model.manifest["tokenizer"].get("chat_template"):
        msgs = [{"role": "system", "content": args.system}] if args.system else []
        prompt = model.render_chat(msgs + [{"role": "user", "content": args.prompt}])
    if args.stream:
        for piece in model.stream(prompt, **sampling):
            print(piece, end="", flush=True)
        print()
    else:
        print(model.generate(prompt, **sampling))
    return 0


def cmd_chat(args) -> int:
    """Interactive chat over stdin: history kept (oldest turns dropped to fit the context),
    replies streamed; /reset clears the history, /exit, EOF or Ctrl-C quit."""
    from .errors import BundleError
    from .runtime import Model, PromptError

    sampling = _sampling(args)
    model = Model.load(args.bundle, backend=args.backend, threads=args.threads)
    if not model.manifest["tokenizer"].get("chat_template"):
        raise BundleError(f"{args.bundle}: bundle has no chat template (use edgetune run --raw)")
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict] = []
    tty = sys.stdin.isatty()

    def note(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    try:
        note(
            f"chat with {args.bundle} ({model.backend} backend, {model.context_length}-token "
            "context); /reset clears the history, /exit quits"
        )
        while True:
            if tty:
                print("> ", end="", flush=True)
            raw = sys.stdin.buffer.readline()
            if not raw:
                break
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError as e:
                note(f"error: input is not valid UTF-8 ({e.reason}); message ignored")
                continue
            if not line:
                continue
            if line in ("/exit", "/quit"):
                break
            if line == "/reset":
                history = []
                note("(history cleared)")
                continue
            try:
                msgs, dropped = model.fit_chat(
                    system + history + [{"role": "user", "content": line}],
                    reserve=sampling["max_new_tokens"],
                )
            except PromptError as e:
                note(f"error: {e}; message ignored")
                continue
            if dropped:
                note(
                    f"(dropped the {dropped} oldest messages to fit the {model.context_length}-"
                    "token context)"
                )
            reply = []
            for piece in model.stream_chat(msgs, **sampling):
                print(piece, end="", flush=True)
                reply.append(piece)
            print(flush=True)
            history = msgs[len(system) :] + [{"role": "assistant", "content": "".join(reply)}]
    except KeyboardInterrupt:
        print(file=sys.stderr)
    return 0


def cmd_quickstart(args) -> int:
    from .config import config_from_args
    from .quickstart import QuickstartConfig, quickstart

    quickstart(config_from_args(QuickstartConfig, args))
    return 0


def _add_sampling(p) -> None:
    """Backend and sampling flags shared by ``run`` and ``chat``."""
    from .config import add_flags
    from .runtime.sampling import SamplingConfig

    p.add_argument(
        "--backend",
        choices=("auto", "ort", "native", "native-int"),
        default="auto",
        help="ort: ONNX Runtime; native: edgetune kernels; native-int: the FPGA "
        "fixed-point datapath",
    )
    p.add_argument("--threads", type=int)
    add_flags(p, SamplingConfig)


def _add_export_flags(p) -> None:
    from .config import add_flags
    from .export.config import GGUF_QUANTS, ExportConfig  # onnx: only when export runs

    p.add_argument("model", help="merged HF model dir or Hub id (with --target fpga also a bundle)")
    _add_revision(p)
    p.add_argument("--out", required=True, help="bundle dir to create")
    p.add_argument(
        "--target",
        choices=("onnx", "fpga"),
        default="onnx",
        help="onnx: the bundle; fpga: an HLS project with the weights as memory images",
    )
    p.add_argument(
        "--format",
        choices=("onnx", "gguf"),
        default="onnx",
        help="onnx: the bundle (--out a dir); gguf: one GGUF file for llama.cpp / Ollama (--out "
        "FILE.gguf, --quant f32|f16|bf16|q8_0|q6_k|q5_k_m|q4_k_m|q4_0 as llama-quantize "
        "writes them; int4/int8/none mean q4_0/q8_0/f16)",
    )
    add_flags(p, ExportConfig)
    for action in p._actions:  # the GGUF types share --quant
        if action.dest == "quant" and action.choices is not None:
            action.choices = (*action.choices, *GGUF_QUANTS)
    p.add_argument(
        "--asymmetric",
        dest="symmetric",
        action="store_false",
        default=None,
        help="the same as --no-symmetric: stored 4-bit zero points",
    )
    p.add_argument("--force", action="store_true", help="replace an existing --out")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole parser; with ``command``, the flags of that subcommand only (``main`` passes
    the one it runs, so that ``edgetune run`` does not import the export stage's config)."""
    ap = argparse.ArgumentParser(
        prog="edgetune",
        description="Fine-tune, merge, export and run a small language model on the edge.",
    )
    ap.add_argument("--version", action="version", version=f"edgetune {__version__}")
    ap.add_argument(
        "--verbose", action="store_true", help="show other libraries' log lines edgetune hides"
    )
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def wanted(name: str) -> bool:
        return command is None or command == name

    from .config import add_flags
    from .quickstart import QuickstartConfig

    p = sub.add_parser(
        "quickstart",
        help="run the whole path on the shipped tiny model",
        description="Fine-tune the shipped tiny model on the bundled smart-home "
        "task with the recipe examples/configs/tiny-phi3_qlora_cpu.yaml, merge, "
        "export int4 (tiny-phi3_int4_cpu.yaml), run it, and print one table.",
    )
    add_flags(p, QuickstartConfig, config_flag=False)
    p.set_defaults(func=cmd_quickstart)

    _add_train(sub)

    p = sub.add_parser(
        "merge",
        help="merge an adapter into its base model",
        description="Write a plain HF model dir with the adapter merged in. For "
        "qlora/qdora adapters the base is NF4-dequantized exactly as in training.",
    )
    p.add_argument(
        "--model", required=True, help="base model dir or Hub id the adapter was trained on"
    )
    _add_revision(p)
    p.add_argument("--adapter", required=True, help="RUN/adapter (PEFT format)")
    p.add_argument("--out", required=True)
    p.add_argument(
        "--base-quantization",
        choices=("auto", "nf4", "none"),
        default="auto",
        help="how the base was quantized in training (auto: from edgetune's note)",
    )
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser(
        "export",
        help="export to an ONNX bundle (int4 by default)",
        description="Streamed ONNX export (decoder with KV cache, weights quantized as they are read), a "
        "parity report, and a verified bundle. Flags override values from --config YAML "
        "(recipes: examples/configs).",
    )
    if wanted("export"):
        _add_export_flags(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "export-adapter",
        help="export a LoRA adapter as a GGUF LoRA for llama.cpp / Ollama",
        description="A PEFT LoRA adapter as one GGUF LoRA file, applied by llama.cpp (--lora) "
        "and Ollama (ADAPTER) over a GGUF of the base model without a merge.",
    )
    p.add_argument("adapter", help="RUN/adapter (PEFT format)")
    p.add_argument(
        "--base", required=True, help="the base model dir or Hub id the adapter was trained on"
    )
    _add_revision(p, "the base")
    p.add_argument("--format", choices=("gguf",), default="gguf")
    p.add_argument("--out", required=True, help="FILE.gguf to create")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.set_defaults(func=cmd_export_adapter)

    p = sub.add_parser("verify", help="check a bundle's structure and file hashes")
    p.add_argument("bundle")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("eval", help="exact match and perplexity of a bundle or model dir")
    p.add_argument("path", help="bundle, HF model dir or Hub id")
    _add_revision(p)
    p.add_argument("--data", required=True, help="JSONL with messages or prompt/completion")
    p.add_argument("--limit", type=int, help="first N examples only")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "run",
        help="generate from a bundle",
        description="Generate a completion; the prompt is wrapped in the bundle's "
        "chat template unless --raw.",
    )
    p.add_argument("bundle")
    p.add_argument("--prompt", required=True)
    p.add_argument("--system", help="system message (chat bundles)")
    p.add_argument("--raw", action="store_true", help="do not apply the chat template")
    if wanted("run"):
        _add_sampling(p)
    p.add_argument("--stream", action="store_true")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "chat",
        help="interactive chat with a bundle",
        description="Chat over stdin with the bundle's chat template. Keeps the "
        "history (dropping the oldest turns when it outgrows the context) and "
        "streams each reply. /reset clears the history; /exit, EOF or Ctrl-C quit.",
    )
    p.add_argument("bundle")
    p.add_argument("--system", help="system message")
    if wanted("chat"):
        _add_sampling(p)
    p.set_defaults(func=cmd_chat)

    if wanted("serve"):
        from .serve.cli import add_parser as add_serve

        add_serve(sub)

    from .bench.cli import add_parser as add_bench

    add_bench(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), "")
    args = build_parser(command).parse_args(argv)
    quiet(args.verbose)
    try:
        return args.func(args)
    except EdgetuneError as e:
        print(f"edgetune {args.command}: error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        extra = EXTRAS.get((e.name or "").partition(".")[0])
        if extra is None:
            raise
        print(
            f"edgetune {args.command}: error: needs {e.name}, which is not installed: "
            f"pip install 'edgetune[{extra}]'",
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":
    sys.exit(main())
