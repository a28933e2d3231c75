"""The same model as a Ray Serve deployment (the optional `cluster` extra: pip install
'fastsample[cluster]'), speaking the same Open Inference Protocol subset as `fastsample serve`,
so the same tritonclient code works against either.

    from fastsample.serve.ray import build
    from ray import serve
    serve.start(http_options={"host": "127.0.0.1", "port": 8000})
    serve.run(build("checkpoints/digits/ddgan.safetensors", num_replicas=2), route_prefix="/")

Each replica loads the model as `fastsample serve` does (serve/backends.py, the same ONNX export
cache) and merges requests with `@serve.batch` (max_batch_size counts requests, each of up to
max_num samples; batch_wait_timeout_s is --max-delay-ms). Replicas: `num_replicas`, or
`autoscaling` (a Ray autoscaling_config dict, e.g. {"min_replicas": 1, "max_replicas": 4,
"target_ongoing_requests": 32}); one replica per 1-2 CPU cores, or one per GPU with the Engine
backend (ray_actor_options num_gpus=1).

Measured by the issue's probe on this 2-core machine: Ray Serve cost 4-5x the in-process floor's
CPU per request, ~1.3 GB resident and ~19 s to start, and its internal ports listen on every
interface: on a shared machine run it inside a network namespace (tests/test_serve_ray.py runs
it under `unshare --net`). Prefer `fastsample serve` on one machine; Ray is for scale-out.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path


def build(checkpoint, *, name: str | None = None, backend: str = "auto", device: str = "cpu",
          max_batch: int = 32, max_delay_ms: float = 5.0, max_num: int = 32,
          threads: int | None = None, cache=None, num_replicas: int = 1,
          autoscaling: dict | None = None, ray_actor_options: dict | None = None):
    """A bound Ray Serve application serving one checkpoint (see the module docstring)."""
    from ray import serve

    from fastsample.serve.command import default_cache
    spec = f"{name}={checkpoint}" if name else str(checkpoint)
    cache = Path(cache) if cache else default_cache()
    opts = {"ray_actor_options": ray_actor_options or {"num_cpus": 1}}
    if autoscaling:
        opts["autoscaling_config"] = autoscaling
    else:
        opts["num_replicas"] = num_replicas

    @serve.deployment(name="fastsample", **opts)
    class FastsampleDeployment:
        def __init__(self):
            from fastsample.serve import backends
            from fastsample.serve.app import Server
            m = backends.load(spec, backend=backend, cache=cache, max_batch=max_batch,
                              threads=threads, device=device)
            self.served = m
            # Only the request parsing and the response format of the server are used; the
            # batching is Ray's.
            self.oip = Server({m.name: m}, max_batch=max_batch, max_num=max_num)
            self.oip.ready = True

        @serve.batch(max_batch_size=max_batch, batch_wait_timeout_s=max_delay_ms / 1e3)
        async def run(self, reqs: list) -> list:
            return await asyncio.to_thread(self.served.run, reqs)

        async def __call__(self, request):
            from starlette.responses import JSONResponse, Response

            from fastsample.serve.app import HEADER_LEN, HTTPError, VERSION
            path, method = request.url.path.rstrip("/"), request.method
            name = self.served.name
            base = f"/v2/models/{name}"
            try:
                if path in ("/v2/health/live", "/v2/health/ready"):
                    return Response(status_code=200)
                if path == "/v2/repository/index" and method == "POST":
                    return JSONResponse([{"name": name, "version": VERSION, "state": "READY"}])
                if path.startswith("/v2/models/"):
                    rest = path[len("/v2/models/"):].split("/")
                    self.oip.model(rest[0])
                    if len(rest) >= 3 and rest[1] == "versions":
                        if rest[2] != VERSION:
                            raise HTTPError(404, f"model version {rest[2]!r} does not exist")
                        rest = [rest[0], *rest[3:]]
                    if rest == [name] and method == "GET":
                        return JSONResponse(self.oip.metadata(name))
                    if rest == [name, "ready"]:
                        return Response(status_code=200)
                    if rest == [name, "infer"] and method == "POST":
                        body = await request.body()
                        seed, num, binary, rid = self.oip.parse_infer(
                            name, body, request.headers.get(HEADER_LEN))
                        out = await self.run((seed, num))
                        return self.oip.infer_response(name, out, binary, rid)
                raise HTTPError(404, f"no such endpoint: {method} {path} (this deployment "
                                     f"serves {base})")
            except HTTPError as e:
                return JSONResponse({"error": e.msg}, status_code=e.status, headers=e.headers)

    return FastsampleDeployment.bind()


def main(argv=None) -> int:
    """python -m fastsample.serve.ray CKPT [--port P] [--replicas N] [--seconds S]: start Ray
    Serve on 127.0.0.1 and serve until interrupted (or for S seconds)."""
    import argparse
    p = argparse.ArgumentParser(prog="python -m fastsample.serve.ray",
                                description="serve a fastsample checkpoint with Ray Serve")
    p.add_argument("checkpoint")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--max-delay-ms", type=float, default=5.0)
    p.add_argument("--cache", default=None)
    p.add_argument("--seconds", type=float, default=None,
                   help="stop after this long (default: until SIGINT/SIGTERM)")
    p.add_argument("--port-file", default=None, help="write the port here once serving")
    ns = p.parse_args(argv)
    import ray
    from ray import serve
    ray.init(include_dashboard=False, num_cpus=max(ns.replicas, 1) + 1)
    serve.start(http_options={"host": ns.host, "port": ns.port})
    serve.run(build(ns.checkpoint, num_replicas=ns.replicas, max_batch=ns.max_batch,
                    max_delay_ms=ns.max_delay_ms, cache=ns.cache), route_prefix="/")
    if ns.port_file:
        Path(ns.port_file).write_text(json.dumps({"port": ns.port}))
    try:
        t0 = time.monotonic()
        while ns.seconds is None or time.monotonic() - t0 < ns.seconds:
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
