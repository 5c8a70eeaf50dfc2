"""``edgetune serve``: a bundle (and adapters over it) behind OpenAI's API. Torch-free.

    edgetune serve BUNDLE [--adapter NAME=DIR ...] [--host 127.0.0.1] [--port 8000]

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    client.chat.completions.create(model="bundle", messages=[...])

``engine`` batches every running request through one decoder (continuous batching),
``app`` is the ASGI app (FastAPI on uvicorn), ``grammar`` constrains structured output
(llguidance), ``runtime.adapters`` applies LoRA/DoRA adapters unmerged over the int4 base;
``store``, ``finetune`` and ``ft_api`` are the fine-tuning service (--base, --state-dir).
Needs the ``serve`` extra: pip install 'edgetune[serve]'.
"""

from .config import ServeConfig

__all__ = ["ServeConfig", "serve", "load_server"]


def load_server(cfg: ServeConfig, log=print):
    """The model, its adapters and the engine, loaded and checked: a ``Server``."""
    import os
    from pathlib import Path

    from ..errors import BundleError
    from ..runtime import Model
    from ..runtime.adapters import load_adapter
    from .app import Server
    from .engine import Engine, EngineConfig

    backend = cfg.backend
    if backend == "auto":
        try:
            model = Model.load(cfg.bundle, backend="native", threads=cfg.threads)
            backend = "native"
        except BundleError as e:
            log(f"edgetune serve: native backend unavailable ({e}); using onnxruntime")
            model = Model.load(cfg.bundle, backend="ort", threads=cfg.threads)
            backend = "ort"
    else:
        model = Model.load(cfg.bundle, backend=backend, threads=cfg.threads)
    if cfg.adapters and backend != "native":
        raise BundleError(
            "adapters are applied by the native backend: serve this bundle with "
            "--backend native (or auto), or merge the adapter and serve the merged bundle"
        )
    adapters = {
        name: load_adapter(Path(path), model.decoder, model.manifest, name=name)
        for name, path in cfg.adapters
    }
    engine = Engine(
        model,
        EngineConfig(
            max_batch=cfg.max_batch if backend == "native" else 1,
            max_queue=cfg.max_queue,
            prefill_chunk=cfg.prefill_chunk,
        ),
    )
    base = cfg.name or Path(os.path.abspath(cfg.bundle)).name
    if base in adapters:
        from ..errors import ConfigError

        raise ConfigError(f"model id {base!r} is given twice (the base and an adapter)")
    server = Server(
        model=model,
        engine=engine,
        base=base,
        adapters=adapters,
        api_key=cfg.api_key,
        max_body_bytes=cfg.max_body_bytes,
        max_upload_bytes=cfg.max_upload_bytes,
    )
    if cfg.state_dir:
        if backend != "native":
            raise BundleError("the fine-tuning service serves its models as adapters: it needs "
                              "the native backend")  # fmt: skip
        server.runner = start_jobs(cfg, server, log)
    return server, backend


def start_jobs(cfg: ServeConfig, server, log):
    """The fine-tuning service: the store under --state-dir and the job runner, after
    checking that --base is the model the bundle was exported from."""
    from pathlib import Path

    from ..errors import ModelError
    from ..hub import resolve_model
    from ..models import weights_sha256
    from ..runtime.adapters import base_fingerprint, load_adapter
    from .finetune import JobRunner, RunnerConfig
    from .store import Store

    assert cfg.base and cfg.state_dir
    exported_from = base_fingerprint(server.model.manifest)
    base = resolve_model(cfg.base, cfg.base_revision)  # a Hub id: its snapshot, for every job
    if exported_from and weights_sha256(base) != exported_from:
        raise ModelError(
            f"--base {cfg.base}: its weights are not the ones {cfg.bundle} was exported from "
            "(SHA-256 differs): give the model dir the bundle was exported from"
        )

    def publish(name: str, adapter_dir: Path) -> None:
        adapter = load_adapter(adapter_dir, server.model.decoder, server.model.manifest, name)
        server.adapters[name] = adapter

    store = Store(cfg.state_dir)
    runner_cfg = RunnerConfig(
        base_model=str(base),
        base_name=server.base,
        max_concurrent=cfg.max_concurrent_jobs,
        train_threads=cfg.train_threads,
    )
    return JobRunner(store, runner_cfg, publish, log)


def serve(cfg: ServeConfig, log=print) -> None:
    """Load, bind, print the address, serve until interrupted."""
    import socket

    import uvicorn

    from .app import create_app
    from .config import is_loopback

    server, backend = load_server(cfg, log)
    host = cfg.host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, cfg.port))
    except OSError as e:
        from ..errors import ConfigError

        raise ConfigError(f"cannot bind {cfg.host}:{cfg.port} ({e.strerror})") from None
    sock.listen(128)
    port = sock.getsockname()[1]
    shown = f"[{host}]" if family == socket.AF_INET6 else host
    names = ", ".join(server.names)
    print(f"edgetune serve: {names} ({backend} backend) on http://{shown}:{port}/v1", flush=True)
    if not is_loopback(host) and not cfg.api_key:
        log("edgetune serve: WARNING: no API key on a non-loopback address (--insecure)")
    config = uvicorn.Config(
        create_app(server),
        log_level="warning",
        timeout_graceful_shutdown=5,
        h11_max_incomplete_event_size=cfg.max_body_bytes,
    )
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        if server.runner is not None:
            server.runner.close()
        server.engine.close()
