"""``edgetune bench``: its flags and the dispatch to each benchmark (kernels, runtime, train,
dist, scale, serve, tokens), which prints a table or, with --json, one JSON object."""

from __future__ import annotations

import json
import os
import sys

from ..errors import ConfigError


def add_parser(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="benchmarks against baselines run in the same process",
        description="kernels: Q4 GEMV/GEMM (fp32 and int8 activations) and "
        "dequantization vs ONNX Runtime MatMulNBits, with the memory bandwidth "
        "measured in the same run. runtime: the ort and native backends side by "
        "side, each in its own process (prefill/decode tok/s, first-token latency, "
        "peak RSS, decode bandwidth utilisation). train: QLoRA/QDoRA step time and peak RSS on a "
        "~330M-parameter Phi-3-shaped model vs fp32 LoRA and PEFT + bitsandbytes. "
        "dist: per-rank weight/gradient/optimizer bytes and step time of ddp, "
        "fsdp and DeepSpeed ZeRO 1/2/3 with --nproc processes. scale: peak RSS "
        "and time of export, merge, a QLoRA step and decode, each in its own "
        "process, on random Phi-3-mini-width models at --layers layer counts, "
        "with the per-layer slope and the extrapolation to Phi-3-mini and "
        "Phi-3-medium against the memory targets. serve: an edgetune serve process "
        "under 1, 2, 4 and 8 concurrent streams (TTFT p50/p95, aggregate tok/s), an "
        "unmerged adapter's decode against the base, and HTTP against edgetune run. "
        "tokens: token selection (top-k/top-p) and streaming text per token against their "
        "whole-vocabulary / whole-sequence specs.",
    )
    p.add_argument(
        "what", choices=("kernels", "runtime", "train", "dist", "scale", "serve", "tokens")
    )
    p.add_argument(
        "bundle",
        nargs="?",
        help="runtime, serve: the bundle to run (default: a cached "
        "~0.55B-parameter Phi-3-shaped int4 bundle with random weights, built once)",
    )
    p.add_argument(
        "--threads", type=int, default=2, help="runtime: threads per backend; serve: server threads"
    )
    p.add_argument("--prompt-tokens", type=int, help="runtime, serve: prompt length (default 128)")
    p.add_argument("--new-tokens", type=int, help="runtime, serve: tokens to decode (default 64)")
    p.add_argument("--json", action="store_true", help="one JSON object with a results list")
    p.add_argument(
        "--quick",
        action="store_true",
        help="kernels: one shape, batch 1, 2 threads; train: 4 layers instead of 16; "
        "dist: a 4-layer model, ddp / zero2 / zero3 only",
    )
    p.add_argument("--nproc", type=int, default=2, help="dist: processes per strategy")
    p.add_argument(
        "--hidden",
        type=int,
        help="train: hidden size of the benchmark model (default 1024: ~330M "
        "parameters, 1536: ~700M; intermediate 4x, 16 layers); scale: hidden size "
        "of the random models (default 3072, Phi-3-mini's)",
    )
    p.add_argument(
        "--layers",
        default="2,4,8",
        help="scale: layer counts to measure (default 2,4,8; 32: the full Phi-3-mini, "
        "7.6 GB of bf16 on disk)",
    )
    p.add_argument(
        "--stages",
        default="export,merge,qlora-step,decode",
        help="scale: stages to measure (default all: export,merge,qlora-step,decode)",
    )
    p.add_argument("--intermediate", type=int, help="scale: MLP width (default 8192)")
    p.add_argument("--heads", type=int, help="scale: attention heads (default 32)")
    p.add_argument("--kv-heads", type=int, help="scale: key/value heads (default: --heads)")
    p.add_argument("--vocab", type=int, help="scale: vocabulary size (default 32064, >= 2048)")
    p.add_argument(
        "--keep",
        action="store_true",
        help="scale: keep every stage's output (bundles, merged models, runs)",
    )
    p.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="train: gradient checkpointing in every setup (activation memory "
        "then no longer hides the weights' share of peak RSS)",
    )
    p.set_defaults(func=cmd_bench)


def cmd_bench(args) -> int:
    if not args.json:
        return _bench(args, print)
    # --json prints one object on stdout: whatever libraries print there while the benchmark
    # runs (DeepSpeed's accelerator notice, in child processes too) goes to stderr instead
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        report = _bench(args, lambda s: print(s, file=sys.stderr))
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
    print(json.dumps(report))
    return 0


def _bench(args, log):
    """Run one benchmark: its JSON-ready report with --json, else print its table (None)."""
    if args.what not in ("runtime", "serve") and args.bundle:
        raise ConfigError(f"bench {args.what} takes no bundle (only bench runtime and serve do)")
    if args.what == "serve":
        from . import serve as serve_bench

        given = {"threads": args.threads, "prompt_tokens": args.prompt_tokens,
                 "new_tokens": args.new_tokens}  # fmt: skip
        cfg = serve_bench.ServeBenchConfig(**{k: v for k, v in given.items() if v is not None})
        report = serve_bench.bench(args.bundle, cfg, log=log)
        if args.json:
            return report
        print(serve_bench.format_results(report))
        return 0
    if args.what == "runtime":
        from .runtime import bench, format_results

        report = bench(
            args.bundle,
            quick=args.quick,
            threads=args.threads,
            prompt_tokens=args.prompt_tokens,
            new_tokens=args.new_tokens,
            log=log,
        )
        if args.json:
            return report
        print(format_results(report))
        return 0
    if args.what == "scale":
        from . import scale

        report = scale.bench(_scale_config(args), log=log)
        if args.json:
            return report
        print(scale.format_results(report))
        return 0
    if args.what == "tokens":
        from . import tokens

        report = tokens.bench(log=log)
        if args.json:
            return report
        print(tokens.format_results(report))
        return 0
    # each benchmark's results and table are its own types: one branch each
    if args.what == "kernels":
        from ..kernels import isa as kernels_isa
        from . import kernels as kernel_bench
        from .gemm import gemm_results

        results = kernel_bench.bench(quick=args.quick, log=log)
        results += gemm_results(2, log)  # compute-bound rows, at the last thread count
        rows = [r.as_dict() for r in results]
        if args.json:
            return {"benchmark": args.what, "isa": kernels_isa(), "results": rows}
        print(kernel_bench.format_results(results))
        return 0
    if args.what == "dist":
        from . import dist as dist_bench

        rows = dist_bench.bench(nproc=args.nproc, quick=args.quick, log=log)
        if args.json:
            return {"benchmark": args.what, "results": rows}
        print(dist_bench.format_results(rows))
        return 0
    from . import train as train_bench

    rows = train_bench.bench(
        hidden=args.hidden or 1024,
        layers=4 if args.quick else 16,
        rounds=1 if args.quick else 2,
        checkpointing=args.gradient_checkpointing,
        log=log,
    )
    if args.json:
        return {"benchmark": args.what, "results": rows}
    print(train_bench.format_results(rows))
    return 0


def _scale_config(args):
    """bench scale's flags -> ScaleConfig (unset flags keep its Phi-3-mini defaults)."""
    from .scale import ScaleConfig, parse_list

    given = {
        k: v
        for k, v in (
            ("hidden", args.hidden),
            ("intermediate", args.intermediate),
            ("heads", args.heads),
            ("kv_heads", args.kv_heads),
            ("vocab", args.vocab),
            ("prompt_tokens", args.prompt_tokens),
            ("new_tokens", args.new_tokens),
        )
        if v is not None
    }
    return ScaleConfig(
        layers=parse_list(args.layers, "layers", int),
        stages=parse_list(args.stages, "stages"),
        threads=args.threads,
        keep=args.keep,
        **given,
    )
