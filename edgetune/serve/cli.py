"""``edgetune serve``: a flag (and a --config YAML key) per ServeConfig field, and the command."""

from __future__ import annotations

import os

from .config import ServeConfig


def add_parser(sub) -> None:
    from ..config import add_flags

    p = sub.add_parser(
        "serve",
        help="serve a bundle (and adapters) over the OpenAI API",
        description="An OpenAI-compatible server (chat completions, completions, models) "
        "over a bundle: continuous batching, streaming, structured output, adapters served "
        "unmerged over one int4 base; with --base and --state-dir also OpenAI's files and "
        "fine-tuning API (durable jobs). Binds 127.0.0.1 unless --host says otherwise. "
        "Flags override values from --config YAML.",
    )
    p.add_argument("bundle", help="the bundle directory served as the base model")
    add_flags(p, ServeConfig, skip=("bundle",))
    p.set_defaults(func=cmd_serve)


def cmd_serve(args) -> int:
    from ..config import config_from_args
    from . import serve

    args.api_key = args.api_key or os.environ.get("EDGETUNE_API_KEY") or None
    serve(config_from_args(ServeConfig, args))
    return 0
