"""``edgetune serve``'s flags (one per ServeConfig field) and the command itself."""

from __future__ import annotations

import os
from dataclasses import fields

from .config import ServeConfig, parse_adapter


def add_parser(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a bundle (and adapters) over the OpenAI API",
        description="An OpenAI-compatible server (chat completions, completions, models) "
        "over a bundle: continuous batching, streaming, structured output, adapters served "
        "unmerged over one int4 base; with --base and --state-dir also OpenAI's files and "
        "fine-tuning API (durable jobs). Binds 127.0.0.1 unless --host says otherwise.",
    )
    p.add_argument("bundle")
    p.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="serve the PEFT adapter in DIR (from edgetune train) as model NAME; repeatable",
    )
    doc = {f.name: f for f in fields(ServeConfig)}
    for name in (
        "name",
        "host",
        "port",
        "api_key",
        "backend",
        "threads",
        "max_batch",
        "max_queue",
        "prefill_chunk",
        "max_body_bytes",
        "base",
        "state_dir",
        "max_concurrent_jobs",
        "train_threads",
        "max_upload_bytes",
    ):
        f = doc[name]
        kind = int if isinstance(f.default, int) or name in ("threads", "train_threads") else str
        p.add_argument(
            f"--{name.replace('_', '-')}", type=kind, default=f.default, help=_help(name)
        )
    p.add_argument("--insecure", action="store_true", help=_help("insecure"))
    p.set_defaults(func=cmd_serve)


def _help(name: str) -> str:
    from ..config import field_help

    return field_help(ServeConfig, name)


def cmd_serve(args) -> int:
    from . import serve

    cfg = ServeConfig(
        bundle=args.bundle,
        name=args.name,
        adapters=tuple(parse_adapter(a) for a in args.adapter),
        host=args.host,
        port=args.port,
        api_key=args.api_key or os.environ.get("EDGETUNE_API_KEY") or None,
        insecure=args.insecure,
        backend=args.backend,
        threads=args.threads,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        prefill_chunk=args.prefill_chunk,
        max_body_bytes=args.max_body_bytes,
        base=args.base,
        state_dir=args.state_dir,
        max_concurrent_jobs=args.max_concurrent_jobs,
        train_threads=args.train_threads,
        max_upload_bytes=args.max_upload_bytes,
    )
    serve(cfg)
    return 0
