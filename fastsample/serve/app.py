"""The HTTP application: the Open Inference Protocol (KServe v2 / Triton HTTP), a JSON and a
PNG convenience endpoint, Prometheus metrics, weight reload.

    GET  /v2/health/live | /v2/health/ready            200, or 503 when not ready
    GET  /v2                                           server metadata
    GET  /v2/models/{name}[/versions/1]                model metadata (inputs, outputs)
    GET  /v2/models/{name}[/versions/1]/ready
    GET  /v2/models/{name}[/versions/1]/config         Triton-style config (max_batch_size)
    POST /v2/models/{name}[/versions/1]/infer          inputs seed INT64 [1], num INT64 [1]
                                                       (optional, default 1); output samples
                                                       FP32 [num, *data_shape]; JSON or the
                                                       binary tensor extension both ways
    POST /v2/repository/index                          Triton's model list
    POST /v2/repository/models/{name}/load             re-read the model's checkpoint (hot
                                                       weight reload; no path from the client)
    POST /v1/sample  {"model", "seed", "num"}          JSON samples
    GET  /v1/models/{name}/grid.png?seed=&num=&cols=   a PNG grid of samples
    GET  /metrics                                      Prometheus text format

Every refusal is one status (400 bad input, 404 unknown model, 413 body too large, 503 queue
full or shutting down, 504 timeout) with a JSON body {"error": "one line"}, which is what
tritonclient reads into its exception message.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import struct
import time

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response

from fastsample.serve.batching import Batcher, Closed, QueueFull

log = logging.getLogger("fastsample.serve")

HEADER_LEN = "Inference-Header-Content-Length"
MAX_BODY = 1 << 20                 # a request is two int64s; anything near this is not one
SEED_MAX = (1 << 63) - 1
VERSION = "1"


class HTTPError(Exception):
    def __init__(self, status: int, msg: str, headers: dict | None = None):
        super().__init__(msg)
        self.status, self.msg, self.headers = status, msg, headers or {}


class Metrics:
    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
        self.registry = r = CollectorRegistry()
        self.requests = Counter("fastsample_requests", "Inference requests by model and HTTP "
                                "status", ["model", "code"], registry=r)
        self.latency = Histogram("fastsample_request_seconds", "Inference request latency "
                                 "(seconds, in the server)", ["model"], registry=r,
                                 buckets=(.001, .002, .005, .01, .02, .05, .1, .2, .5, 1, 2, 5))
        self.batch_size = Histogram("fastsample_batch_size", "Samples per executed batch",
                                    ["model"], registry=r,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512))
        self.queue_depth = Gauge("fastsample_queue_depth", "Requests waiting for a batch",
                                 ["model"], registry=r)
        self.samples = Counter("fastsample_samples", "Samples returned", ["model"], registry=r)
        self.reloads = Counter("fastsample_weight_reloads", "Weight reloads by outcome",
                               ["model", "outcome"], registry=r)


class Server:
    """The models, their batchers and the settings; `app()` builds the FastAPI application."""

    def __init__(self, models: dict, *, max_batch: int = 32, max_delay_ms: float = 5.0,
                 max_queue: int = 256, max_num: int = 64, timeout_s: float = 30.0):
        self.models = models
        self.max_num, self.timeout = max_num, timeout_s
        self.metrics = Metrics()
        self.batchers = {n: Batcher(m, max_batch=max_batch, max_delay_s=max_delay_ms / 1e3,
                                    max_queue=max_queue, metrics=self.metrics)
                         for n, m in models.items()}
        self.ready = False
        self.accepted = self.completed = self.failed = 0
        mt = self.metrics       # labelled children looked up once, not per request
        self._hot = {n: (mt.requests.labels(n, "200"), mt.latency.labels(n),
                         mt.samples.labels(n)) for n in models}

    # --------------------------------------------------------------------------------------
    # Requests.

    def model(self, name: str):
        if name not in self.models:
            raise HTTPError(404, f"unknown model {name!r}; this server serves "
                                 f"{', '.join(sorted(self.models)) or 'nothing'}")
        return self.models[name]

    def check_seed(self, v) -> int:
        if not _is_int(v) or not 0 <= v <= SEED_MAX:
            raise HTTPError(400, f"seed must be an integer in [0, 2^63 - 1], got {_show(v)}")
        return v

    def check_num(self, v) -> int:
        if not _is_int(v) or not 1 <= v <= self.max_num:
            raise HTTPError(400, f"num must be an integer in [1, {self.max_num}] (the server's "
                                 f"--max-num), got {_show(v)}")
        return v

    async def sample(self, name: str, seed: int, num: int) -> np.ndarray:
        m = self.model(name)
        b = self.batchers[m.name]
        ok, latency, samples = self._hot[name]
        t0 = time.perf_counter()
        code = 200
        self.accepted += 1
        try:
            out = await b.submit(seed, num, self.timeout)
            samples.inc(num)
            return out
        except QueueFull:
            code = 503
            raise HTTPError(503, f"model {name} is at capacity ({b.max_queue} requests "
                                 f"queued); retry shortly", {"Retry-After": "1"}) from None
        except Closed:
            code = 503
            raise HTTPError(503, "the server is shutting down", {"Retry-After": "1"}) from None
        except asyncio.TimeoutError:
            code = 504
            raise HTTPError(504, f"the request did not finish within {self.timeout:g} s (the "
                                 f"server's --timeout)") from None
        except asyncio.CancelledError:
            code = 499                             # the client went away
            raise
        except Exception as e:
            code = 500
            log.error(json.dumps({"event": "run_failed", "model": name, "error": str(e)}))
            raise HTTPError(500, f"model {name} failed to run: {str(e).splitlines()[0]}")
        finally:
            if code == 200:
                self.completed += 1
                ok.inc()
            else:
                self.failed += 1
                self.metrics.requests.labels(name, str(code)).inc()
            latency.observe(time.perf_counter() - t0)

    # --------------------------------------------------------------------------------------
    # The Open Inference Protocol's request body.

    def parse_infer(self, name: str, body: bytes, header_len: str | None):
        """-> (seed, num, binary output?, outputs wanted, request id)."""
        self.model(name)
        if len(body) > MAX_BODY:
            raise HTTPError(413, f"request body of {len(body)} bytes; the limit is {MAX_BODY}")
        if header_len is not None:
            try:
                n = int(header_len)
            except ValueError:
                n = -1
            if not 0 <= n <= len(body):
                raise HTTPError(400, f"{HEADER_LEN} {header_len!r} is not a length within the "
                                     f"{len(body)}-byte body")
            head, blob = body[:n], body[n:]
        else:
            head, blob = body, b""
        try:
            req = json.loads(head)
        except (ValueError, UnicodeDecodeError) as e:
            raise HTTPError(400, f"malformed JSON in the request body: {e}") from None
        if not isinstance(req, dict):
            raise HTTPError(400, "the request body must be a JSON object with `inputs`")
        inputs = req.get("inputs")
        if not isinstance(inputs, list) or not inputs:
            raise HTTPError(400, "`inputs` must be a non-empty list of tensors (seed INT64 [1], "
                                 "optionally num INT64 [1])")
        got, pos = {}, 0
        for t in inputs:
            if not isinstance(t, dict) or not isinstance(t.get("name"), str):
                raise HTTPError(400, "every input must be an object with a `name`")
            tname = t["name"]
            if tname not in ("seed", "num"):
                raise HTTPError(400, f"unknown input {tname!r}; model {name} takes seed (INT64 "
                                     f"[1]) and num (INT64 [1], optional)")
            if tname in got:
                raise HTTPError(400, f"input {tname!r} given twice")
            if t.get("datatype") != "INT64":
                raise HTTPError(400, f"input {tname!r} has datatype {_show(t.get('datatype'))}; "
                                     f"expected INT64")
            shape = t.get("shape")
            if shape not in ([1], [1, 1]) or not all(_is_int(d) for d in shape):
                raise HTTPError(400, f"input {tname!r} has shape {_show(shape)}; expected [1]")
            params = t.get("parameters") or {}
            if not isinstance(params, dict):
                raise HTTPError(400, f"input {tname!r}: `parameters` must be an object")
            size = params.get("binary_data_size")
            if size is not None:
                if size != 8 or pos + 8 > len(blob):
                    raise HTTPError(400, f"input {tname!r}: binary_data_size {_show(size)}; one "
                                         f"INT64 is 8 bytes (within the binary part)")
                got[tname] = struct.unpack_from("<q", blob, pos)[0]
                pos += 8
            else:
                data = t.get("data")
                while isinstance(data, list) and len(data) == 1:
                    data = data[0]
                if not _is_int(data):
                    raise HTTPError(400, f"input {tname!r}: data {_show(t.get('data'))} is not "
                                         f"one integer")
                got[tname] = data
        if pos != len(blob):
            raise HTTPError(400, f"{len(blob) - pos} bytes of binary data no input claims")
        if "seed" not in got:
            raise HTTPError(400, f"input 'seed' (INT64 [1]) is required by model {name}")
        seed = self.check_seed(got["seed"])
        num = self.check_num(got.get("num", 1))
        params = req.get("parameters") or {}
        if not isinstance(params, dict):
            raise HTTPError(400, "`parameters` must be an object")
        binary = bool(params.get("binary_data_output", False))
        outputs = req.get("outputs")
        if outputs is not None:
            if not isinstance(outputs, list):
                raise HTTPError(400, "`outputs` must be a list")
            for o in outputs:
                if not isinstance(o, dict) or o.get("name") != "samples":
                    oname = o.get("name") if isinstance(o, dict) else o
                    raise HTTPError(400, f"unknown output {_show(oname)}; model {name} has one "
                                         f"output, samples")
                binary = bool((o.get("parameters") or {}).get("binary_data", binary))
        rid = req.get("id")
        return seed, num, binary, rid

    def infer_response(self, name: str, out: np.ndarray, binary: bool, rid):
        out = np.ascontiguousarray(out, dtype="<f4")
        t = {"name": "samples", "datatype": "FP32", "shape": list(out.shape)}
        head = {"model_name": name, "model_version": VERSION, "outputs": [t]}
        if rid is not None:
            head["id"] = rid
        if binary:
            raw = out.tobytes()
            t["parameters"] = {"binary_data_size": len(raw)}
            h = json.dumps(head, separators=(",", ":")).encode()
            return Response(h + raw, media_type="application/octet-stream",
                            headers={HEADER_LEN: str(len(h))})
        t["data"] = out.reshape(-1).tolist()
        return Response(json.dumps(head, separators=(",", ":")), media_type="application/json")

    def metadata(self, name: str) -> dict:
        m = self.model(name)
        return {"name": m.name, "versions": [VERSION],
                "platform": f"fastsample_{m.backend}",
                "inputs": [{"name": "seed", "datatype": "INT64", "shape": [1]},
                           {"name": "num", "datatype": "INT64", "shape": [1]}],
                "outputs": [{"name": "samples", "datatype": "FP32",
                             "shape": [-1, *m.data_shape]}],
                "parameters": {"family": m.family, "sampler": m.sampler, "nfe": m.steps,
                               "backend": m.backend, "max_num": self.max_num}}

    def config(self, name: str) -> dict:
        m = self.model(name)
        b = self.batchers[name]
        return {"name": name, "platform": f"fastsample_{m.backend}", "max_batch_size": 0,
                "input": [{"name": "seed", "data_type": "TYPE_INT64", "dims": [1]},
                          {"name": "num", "data_type": "TYPE_INT64", "dims": [1],
                           "optional": True}],
                "output": [{"name": "samples", "data_type": "TYPE_FP32",
                            "dims": [-1, *m.data_shape]}],
                "dynamic_batching": {"max_batch_samples": b.max_batch,
                                     "max_queue_delay_microseconds": int(b.max_delay * 1e6),
                                     "max_queue_size": b.max_queue}}

    # --------------------------------------------------------------------------------------
    # Lifecycle.

    async def startup(self) -> None:
        for b in self.batchers.values():
            b.start()
        self.ready = True
        log.info(json.dumps({"event": "ready", "models": [m.describe() for m in
                                                           self.models.values()]}))

    async def shutdown(self) -> None:
        self.ready = False
        await asyncio.gather(*(b.close() for b in self.batchers.values()))
        log.info(json.dumps({"event": "stopped", "accepted": self.accepted,
                             "completed": self.completed, "failed": self.failed}))

    def app(self):
        return build_app(self)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _show(v) -> str:
    s = json.dumps(v) if not isinstance(v, (bytes, bytearray)) else repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def build_app(server: Server):
    @contextlib.asynccontextmanager
    async def lifespan(app):
        await server.startup()
        try:
            yield
        finally:
            await server.shutdown()

    app = FastAPI(title="fastsample serve", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.server = server

    def error(status: int, msg: str, headers=None):
        return JSONResponse({"error": msg}, status_code=status, headers=headers)

    @app.exception_handler(HTTPError)
    async def _http_error(request, e: HTTPError):
        if e.status >= 500:
            log.warning(json.dumps({"event": "refused", "path": request.url.path,
                                    "status": e.status, "error": e.msg}))
        return error(e.status, e.msg, e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _starlette_error(request, e):
        msg = "no such endpoint" if e.status_code == 404 else str(e.detail)
        return error(e.status_code, f"{msg}: {request.method} {request.url.path}")

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, e):
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return error(400, f"{where}: {first.get('msg', 'invalid request')}")

    @app.get("/v2/health/live")
    async def live():
        return Response(status_code=200)

    @app.get("/v2/health/ready")
    async def ready():
        return Response(status_code=200 if server.ready else 503)

    @app.get("/v2")
    async def server_metadata():
        from fastsample import __version__
        return {"name": "fastsample", "version": __version__,
                "extensions": ["binary_tensor_data", "model_repository"]}

    for prefix in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
        app.add_api_route(prefix, _meta_route(server), methods=["GET"])
        app.add_api_route(prefix + "/ready", _ready_route(server), methods=["GET"])
        app.add_api_route(prefix + "/config", _config_route(server), methods=["GET"])
        # A plain Starlette route: the hot path skips FastAPI's dependency resolution.
        app.router.add_route(prefix + "/infer", _infer_route(server), methods=["POST"])

    @app.post("/v2/repository/index")
    async def repository_index():
        return [{"name": n, "version": VERSION, "state": "READY" if server.ready else
                 "UNAVAILABLE"} for n in sorted(server.models)]

    @app.post("/v2/repository/models/{name}/load")
    async def reload(name: str):
        m = server.model(name)
        t0 = time.perf_counter()
        try:
            # In its own thread: the model keeps serving the old weights meanwhile.
            await asyncio.to_thread(m.reload)
        except Exception as e:
            server.metrics.reloads.labels(name, "failed").inc()
            raise HTTPError(400, f"reloading {name} from {m.checkpoint} failed: "
                                 f"{str(e).splitlines()[0]}") from None
        server.metrics.reloads.labels(name, "ok").inc()
        log.info(json.dumps({"event": "reloaded", "model": name,
                             "checkpoint": str(m.checkpoint),
                             "seconds": round(time.perf_counter() - t0, 3)}))
        return {}

    @app.post("/v1/sample")
    async def sample_json(request: Request):
        body = await _body(request)
        try:
            req = json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise HTTPError(400, f"malformed JSON in the request body: {e}") from None
        if not isinstance(req, dict):
            raise HTTPError(400, 'the body must be a JSON object {"model": ..., "seed": ..., '
                                 '"num": ...}')
        unknown = sorted(set(req) - {"model", "seed", "num"})
        if unknown:
            raise HTTPError(400, f"unknown field(s) {unknown}; expected model, seed, num")
        if not isinstance(req.get("model"), str):
            raise HTTPError(400, f"`model` must be a model name, one of "
                                 f"{', '.join(sorted(server.models))}")
        name = req["model"]
        server.model(name)
        seed = server.check_seed(req.get("seed", 0))
        num = server.check_num(req.get("num", 1))
        out = await server.sample(name, seed, num)
        return {"model": name, "seed": seed, "num": num, "shape": list(out.shape),
                "samples": out.tolist()}

    @app.get("/v1/models/{name}/grid.png")
    async def grid(name: str, seed: int = 0, num: int = 16, cols: int | None = None):
        from fastsample.io import save_png
        server.model(name)
        seed, num = server.check_seed(seed), server.check_num(num)
        if cols is not None and not 1 <= cols <= num:
            raise HTTPError(400, f"cols must be in [1, num], got {cols}")
        out = await server.sample(name, seed, num)
        buf = io.BytesIO()
        try:
            await asyncio.to_thread(save_png, buf, out, cols)
        except ValueError as e:
            raise HTTPError(400, str(e)) from None
        return Response(buf.getvalue(), media_type="image/png")

    @app.get("/metrics")
    async def metrics():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
        for n, b in server.batchers.items():
            server.metrics.queue_depth.labels(n).set(b.depth)
        return Response(generate_latest(server.metrics.registry),
                        media_type=CONTENT_TYPE_LATEST)

    return app


async def _body(request) -> bytes:
    """The request body, refused with 413 past MAX_BODY before more of it is read."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY:
        raise HTTPError(413, f"request body of {declared} bytes; the limit is {MAX_BODY}")
    chunks, n = [], 0
    async for chunk in request.stream():
        n += len(chunk)
        if n > MAX_BODY:
            raise HTTPError(413, f"request body of more than {MAX_BODY} bytes; the limit is "
                                 f"{MAX_BODY}")
        chunks.append(chunk)
    return b"".join(chunks)


def _check_version(version: str | None) -> None:
    if version is not None and version != VERSION:
        raise HTTPError(404, f"model version {version!r} does not exist; version {VERSION} does")


def _meta_route(server):
    async def meta(name: str, version: str | None = None):
        _check_version(version)
        return server.metadata(name)
    return meta


def _ready_route(server):
    async def ready(name: str, version: str | None = None):
        _check_version(version)
        server.model(name)
        return Response(status_code=200 if server.ready else 503)
    return ready


def _config_route(server):
    async def config(name: str, version: str | None = None):
        _check_version(version)
        return server.config(name)
    return config


def _infer_route(server):
    async def infer(request: Request):
        name = request.path_params["name"]
        _check_version(request.path_params.get("version"))
        server.model(name)
        body = await _body(request)
        seed, num, binary, rid = server.parse_infer(name, body,
                                                    request.headers.get(HEADER_LEN))
        out = await server.sample(name, seed, num)
        return server.infer_response(name, out, binary, rid)
    return infer
