"""`fastsample serve` / `python -m fastsample.serve`: arguments, model loading, uvicorn.

Shutdown: uvicorn turns SIGTERM and SIGINT into a graceful stop (the listening socket closes,
requests already read are answered, then the lifespan's shutdown drains every batcher), and
the process exits 0 with no thread or child left; a second signal forces the exit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

DEFAULT_PORT = 8000


def default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fastsample" / "serve"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from fastsample.serve.backends import BACKENDS
    p.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    p.epilog = (
        "Models are named DATA-FAMILY (digits-ddgan, digits-cld, ...). Protocol: the Open "
        "Inference Protocol (KServe v2 / Triton HTTP), so tritonclient.http works unchanged: "
        "inputs seed (INT64 [1]) and num (INT64 [1], optional), output samples (FP32 [num, "
        "...], data space, as `fastsample sample` writes them). Also POST /v1/sample "
        '{"model": "digits-ddgan", "seed": 0, "num": 4}, GET /v1/models/NAME/grid.png, '
        "GET /metrics (Prometheus). More CPU: run one server per core pair on its own port "
        "behind a load balancer, or the Ray Serve deployment (fastsample.serve.ray); on a GPU "
        "one Engine server per device. docs/serving.md has the details.")
    p.add_argument("models", nargs="*", metavar="[NAME=]CKPT[@BACKEND]",
                   help="checkpoints to serve, optionally named and with their own backend "
                   "(default: every released checkpoints/digits/ model present)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind; the default answers this machine only")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="0 picks a free port")
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="onnx: the exported whole-sampler graph in ONNX Runtime (CPU); engine: "
                   "fastsample.runtime.Engine (CUDA graphs on a GPU); auto: onnx where the "
                   "family exports its whole sampler and --device is cpu, else engine")
    p.add_argument("--device", default="cpu", help="engine backend: cpu | cuda | cuda:N")
    p.add_argument("--max-batch", type=int, default=32,
                   help="most samples merged into one batch by the dynamic batcher")
    p.add_argument("--max-delay-ms", type=float, default=5.0,
                   help="how long the batcher waits for more requests before running a batch "
                   "smaller than --max-batch")
    p.add_argument("--max-queue", type=int, default=256,
                   help="requests waiting per model; beyond it 503 with Retry-After")
    p.add_argument("--max-num", type=int, default=32, help="most samples one request may ask "
                   "for (<= --max-batch)")
    p.add_argument("--timeout", type=float, default=30.0,
                   help="seconds a request may wait and run before it is answered 504")
    p.add_argument("--threads", type=int, default=None,
                   help="ONNX Runtime intra-op threads per model (default: its own choice)")
    p.add_argument("--cache", type=Path, default=None,
                   help=f"where the ONNX exports are kept (default: {default_cache()})")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")
    p.add_argument("--port-file", type=Path, default=None,
                   help="write the bound port here once serving (for --port 0)")


def _check(ns) -> None:
    def rng(flag, v, lo, hi=None):
        if v < lo or (hi is not None and v > hi):
            raise ValueError(f"{flag} must be in [{lo}, {hi if hi is not None else 'inf'}], "
                             f"got {v}")
    rng("--port", ns.port, 0, 65535)
    rng("--max-batch", ns.max_batch, 1, 4096)
    rng("--max-num", ns.max_num, 1, ns.max_batch)
    rng("--max-queue", ns.max_queue, 1, 1 << 20)
    if ns.threads is not None:
        rng("--threads", ns.threads, 1, 1024)
    if not 0 <= ns.max_delay_ms <= 10_000:
        raise ValueError(f"--max-delay-ms must be in [0, 10000], got {ns.max_delay_ms}")
    if not 0 < ns.timeout <= 86_400:
        raise ValueError(f"--timeout must be in (0, 86400] seconds, got {ns.timeout}")


class _JsonFormatter(logging.Formatter):
    """One JSON object per line: a message that is already JSON is merged, not quoted."""

    def format(self, r):
        rec = {"ts": round(r.created, 3), "level": r.levelname.lower(), "logger": r.name}
        msg = r.getMessage()
        try:
            body = json.loads(msg)
        except ValueError:
            body = None
        rec.update(body if isinstance(body, dict) else {"msg": msg})
        return json.dumps(rec)


def setup_logging(level: str) -> dict:
    h = logging.StreamHandler(sys.stderr)
    h.setFormatter(_JsonFormatter())
    lg = logging.getLogger("fastsample.serve")
    lg.handlers[:] = [h]
    lg.setLevel(level.upper())
    lg.propagate = False
    # uvicorn's own loggers in the same format; its per-request access log is off (CPU).
    return {"version": 1, "disable_existing_loggers": False,
            "formatters": {"json": {"()": _JsonFormatter}},
            "handlers": {"err": {"class": "logging.StreamHandler", "formatter": "json",
                                 "stream": "ext://sys.stderr"}},
            "loggers": {"uvicorn": {"handlers": ["err"], "level": level.upper(),
                                    "propagate": False},
                        "uvicorn.error": {"level": level.upper()},
                        "uvicorn.access": {"handlers": [], "level": "WARNING",
                                           "propagate": False}}}


def build_server(ns):
    from fastsample.models.registry import REGISTRY, released_checkpoint
    from fastsample.serve import backends
    from fastsample.serve.app import Server
    specs = list(ns.models)
    if not specs:
        specs = [str(released_checkpoint(e.name)) for e in REGISTRY.values()
                 if released_checkpoint(e.name).is_file()]
        if not specs:
            raise ValueError("no checkpoints given and no released checkpoints in "
                             "checkpoints/digits/ (make checkpoints)")
    cache = ns.cache or default_cache()
    models = {}
    for s in specs:
        t0 = time.perf_counter()
        m = backends.load(s, backend=ns.backend, cache=cache, max_batch=ns.max_batch,
                          threads=ns.threads, device=ns.device)
        if m.name in models:
            raise ValueError(f"two models named {m.name}; name them NAME=CKPT")
        models[m.name] = m
        logging.getLogger("fastsample.serve").info(json.dumps(
            {"event": "loaded", **m.describe(), "seconds": round(time.perf_counter() - t0, 2)}))
    return Server(models, max_batch=ns.max_batch, max_delay_ms=ns.max_delay_ms,
                  max_queue=ns.max_queue, max_num=ns.max_num, timeout_s=ns.timeout)


def _server_class():
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, except that after the graceful stop a SIGTERM/SIGINT is not
        raised again (uvicorn re-raises it, so the exit status would say "killed by a signal"
        although every request was answered): a requested stop ends with status 0."""

        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            old = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT,
                                                                    signal.SIGTERM)}
            try:
                yield
            finally:
                for s, h in old.items():
                    signal.signal(s, h)
    return Server


def serve(ns) -> int:
    try:
        import uvicorn

        from fastsample.serve.app import build_app   # noqa: F401 (fastapi present?)
    except ImportError as e:
        raise ValueError(f"fastsample serve needs the serve extra (pip install "
                         f"'fastsample[serve]'): {e}") from None
    _check(ns)
    _Server = _server_class()
    t0 = time.perf_counter()
    log_config = setup_logging(ns.log_level)
    server = build_server(ns)
    app = server.app()
    config = uvicorn.Config(app, host=ns.host, port=ns.port, log_config=log_config,
                            access_log=False, timeout_graceful_shutdown=ns.timeout + 5,
                            lifespan="on")
    userver = _Server(config)

    port_file = ns.port_file

    async def announce():
        while not userver.started:
            await asyncio.sleep(0.01)
        port = userver.servers[0].sockets[0].getsockname()[1]
        logging.getLogger("fastsample.serve").info(json.dumps(
            {"event": "listening", "url": f"http://{ns.host}:{port}",
             "startup_seconds": round(time.perf_counter() - t0, 2), "pid": os.getpid()}))
        if port_file is not None:
            tmp = port_file.with_suffix(".tmp")
            tmp.write_text(f"{port}\n")
            os.replace(tmp, port_file)

    async def main():
        task = asyncio.create_task(announce())
        await userver.serve()
        task.cancel()

    # uvicorn's loop choice (uvloop when installed), as uvicorn.Server.run makes it.
    with asyncio.Runner(loop_factory=config.get_loop_factory()) as runner:
        runner.run(main())
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastsample.serve",
                                description="serve fastsample models over HTTP (the Open "
                                "Inference Protocol; tritonclient.http works unchanged)")
    add_arguments(p)
    ns = p.parse_args(argv)
    from fastsample.checkpoint import CheckpointError
    try:
        return serve(ns)
    except (ValueError, FileNotFoundError, CheckpointError) as e:
        print(f"fastsample serve: error: {e}", file=sys.stderr)
        return 2
