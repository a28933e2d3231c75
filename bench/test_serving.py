"""Serving load test (issue 19): `fastsample serve` over loopback against the same model called
in-process, side by side in one run.

    floor     the served model's ONNX Runtime session (the exported whole DDGAN sampler, same
              thread count as the server's), called in-process: batch-1 latency p50/p99 on
              pre-drawn inputs, and batch-32 throughput and CPU per sample; also the in-process
              `Served.run` (per-request input draws + the session), what an embedding program
              would call
    server    `fastsample serve` in a child process: batch-1 latency p50/p99 at low load
              (one client, one request at a time), then closed-loop throughput at concurrency
              1, 8 and 32, with the server process's CPU per request (/proc) and the batch-size
              histogram of each phase (from /metrics)

Concurrency 32 and the batch-32 floor, like batch-1 latency and its floor, are measured in
alternating rounds, so that both see the same load on the shared machine. Done-when ratios
(issue 19), measured in this run: server throughput at concurrency 32 / floor
throughput at batch 32 (>= 0.8); server CPU per request at 32 / floor CPU per sample (<= 1.3);
server batch-1 p50 - floor batch-1 p50 (<= 2 ms).

Bounded: every phase stops after its request count or SERVING_PHASE_S seconds (default 30); the
server is stopped with SIGTERM at the end. Loopback only. Environment: SERVING_THREADS (ONNX
Runtime intra-op threads on both sides, default 1), SERVING_BACKEND (onnx | engine, default
onnx), SERVING_DEVICE (default cpu), SERVING_CKPT (default the released digits DDGAN).

`pytest --benchmark bench/test_serving.py -s --benchmark-json=F.json`; the numbers are printed
and stored in the benchmark's extra_info.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")

from bench.serve_load import (ServerProcess, batch_histogram, histogram_diff, load,  # noqa: E402
                              percentile)
from fastsample.models.registry import released_checkpoint  # noqa: E402

THREADS = int(os.environ.get("SERVING_THREADS", "1"))
BACKEND = os.environ.get("SERVING_BACKEND", "onnx")
DEVICE = os.environ.get("SERVING_DEVICE", "cpu")
PHASE_S = float(os.environ.get("SERVING_PHASE_S", "30"))
FAMILY_CKPT = os.environ.get("SERVING_CKPT") or str(released_checkpoint("ddgan"))
BATCH = 32
PHASES = ((1, 200), (8, 480))                   # (concurrency, requests)
ROUNDS_32 = 5                 # concurrency 32: rounds of (floor batch 32, server), interleaved
FLOOR_RUNS_32, REQUESTS_32 = 8, 320             # per round


def _loadavg() -> str:
    try:
        return Path("/proc/loadavg").read_text().split(" ")[0]
    except OSError:
        return "?"


@pytest.fixture(scope="module")
def served():
    """The model in-process, built exactly as the server builds it (same cache, threads)."""
    from fastsample.serve import backends
    from fastsample.serve.command import default_cache
    if not Path(FAMILY_CKPT).is_file():
        pytest.skip(f"no checkpoint {FAMILY_CKPT} (make checkpoints)")
    return backends.load(FAMILY_CKPT, backend=BACKEND, cache=default_cache(), max_batch=BATCH,
                         threads=THREADS, device=DEVICE)


def _lat_ms(fn, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def test_serving_vs_in_process(benchmark, served):
    res = {"backend": served.backend, "device": DEVICE, "threads": THREADS,
           "model": served.name, "nfe": served.steps, "loadavg_start": _loadavg()}

    # ---- the floor, in-process -------------------------------------------------------------
    if served.backend == "onnx":
        sess, feed, names, k = served._run_parts
        out_name = sess.get_outputs()[k].name

        def inputs(n, seed0=0):
            parts = [feed(seed0 + i, 1) for i in range(n)]
            import torch
            return {nm: torch.cat([p[i] for p in parts]).numpy() for i, nm in enumerate(names)}
        x1, x32 = inputs(1), inputs(BATCH, 1000)
        run1 = lambda: sess.run([out_name], x1)            # noqa: E731
        run32 = lambda: sess.run([out_name], x32)          # noqa: E731
    else:
        run1 = lambda: served.run([(0, 1)])                # noqa: E731
        run32 = lambda: served.run([(i, 1) for i in range(BATCH)])   # noqa: E731
    for _ in range(5):
        run1()
        run32()
    lat1 = _lat_ms(run1, 200)
    res["floor_b1_p50_ms"], res["floor_b1_p99_ms"] = percentile(lat1, 50), percentile(lat1, 99)
    served_b1 = _lat_ms(lambda: served.run([(7, 1)]), 100)
    res["floor_served_run_b1_p50_ms"] = percentile(served_b1, 50)

    def floor32():
        return run32()
    reps = 40
    c0, t0 = time.process_time(), time.perf_counter()
    for _ in range(reps):
        run32()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    res["floor_b32_samples_per_s"] = reps * BATCH / wall
    res["floor_b32_cpu_ms_per_sample"] = cpu / (reps * BATCH) * 1e3
    c0, t0 = time.process_time(), time.perf_counter()
    for r in range(reps):
        served.run([(r * BATCH + i, 1) for i in range(BATCH)])
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    res["floor_served_run_b32_samples_per_s"] = reps * BATCH / wall
    res["floor_served_run_b32_cpu_ms_per_sample"] = cpu / (reps * BATCH) * 1e3
    benchmark.pedantic(floor32, rounds=10, iterations=1, warmup_rounds=1)

    # ---- the server ------------------------------------------------------------------------
    args = [FAMILY_CKPT, "--backend", BACKEND, "--device", DEVICE, "--max-batch", str(BATCH),
            "--max-num", str(BATCH), "--max-delay-ms", os.environ.get("SERVING_DELAY_MS", "5"),
            "--max-queue", "1024",
            "--threads", str(THREADS), "--log-level", "warning"]
    with ServerProcess(args) as srv:
        res["server_startup_s"] = round(srv.startup_s, 2)
        name = served.name
        load(srv.port, name, concurrency=1, requests=20, seconds=PHASE_S)      # warm-up
        # Low-load latency, interleaved with the in-process floor in rounds, so that both see
        # the same machine load (the 2-core box is shared; its load moves within seconds).
        srv_ms, floor_ms = [], []
        for rnd in range(5):
            floor_ms += _lat_ms(run1, 40)
            r = load(srv.port, name, concurrency=1, requests=40, seconds=PHASE_S,
                     seed0=10_000 + 40 * rnd)
            srv_ms += [x * 1e3 for x in r["latencies_s"]]
        res["server_b1_p50_ms"], res["server_b1_p99_ms"] = (percentile(srv_ms, 50),
                                                            percentile(srv_ms, 99))
        res["floor_b1_interleaved_p50_ms"], res["floor_b1_interleaved_p99_ms"] = (
            percentile(floor_ms, 50), percentile(floor_ms, 99))
        res["phases"] = []
        for conc, n in PHASES:
            h0, c0 = batch_histogram(srv.port, name), srv.cpu_seconds()
            r = load(srv.port, name, concurrency=conc, requests=n, seconds=PHASE_S,
                     seed0=100_000 * conc)
            cpu = srv.cpu_seconds() - c0
            ms = [x * 1e3 for x in r["latencies_s"]]
            res["phases"].append({
                "concurrency": conc, "requests_ok": r["ok"], "statuses": r["statuses"],
                "errors": r["errors"], "wall_s": round(r["wall_s"], 3),
                "samples_per_s": r["samples_per_s"],
                "p50_ms": percentile(ms, 50), "p99_ms": percentile(ms, 99),
                "server_cpu_ms_per_request": cpu / max(r["ok"], 1) * 1e3,
                "batch_histogram": histogram_diff(batch_histogram(srv.port, name), h0)})
        # Concurrency 32 against the batch-32 floor, interleaved in rounds so that both see
        # the same machine load.
        h0 = batch_histogram(srv.port, name)
        f_wall = f_cpu = s_wall = s_cpu = 0.0
        ok, lat, statuses, errors = 0, [], {}, {}
        for rnd in range(ROUNDS_32):
            c0, t0 = time.process_time(), time.perf_counter()
            for _ in range(FLOOR_RUNS_32):
                run32()
            f_wall += time.perf_counter() - t0
            f_cpu += time.process_time() - c0
            c0 = srv.cpu_seconds()
            r = load(srv.port, name, concurrency=32, requests=REQUESTS_32, seconds=PHASE_S,
                     seed0=10_000_000 + REQUESTS_32 * rnd)
            s_cpu += srv.cpu_seconds() - c0
            s_wall += r["wall_s"]
            ok += r["ok"]
            lat += [x * 1e3 for x in r["latencies_s"]]
            for k, v in r["statuses"].items():
                statuses[k] = statuses.get(k, 0) + v
            for k, v in r["errors"].items():
                errors[k] = errors.get(k, 0) + v
        floor_samples = ROUNDS_32 * FLOOR_RUNS_32 * BATCH
        res["floor_b32_interleaved_samples_per_s"] = floor_samples / f_wall
        res["floor_b32_interleaved_cpu_ms_per_sample"] = f_cpu / floor_samples * 1e3
        res["phases"].append({
            "concurrency": 32, "requests_ok": ok, "statuses": statuses, "errors": errors,
            "wall_s": round(s_wall, 3), "samples_per_s": ok / s_wall,
            "p50_ms": percentile(lat, 50), "p99_ms": percentile(lat, 99),
            "server_cpu_ms_per_request": s_cpu / max(ok, 1) * 1e3,
            "batch_histogram": histogram_diff(batch_histogram(srv.port, name), h0)})
        res["server_rss_mb"] = round(srv.rss_mb(), 1)
        rc = srv.stop()
    res["server_exit_code"] = rc
    res["loadavg_end"] = _loadavg()

    p32 = res["phases"][-1]
    res["ratio_throughput_c32_over_floor_b32"] = p32["samples_per_s"] / res[
        "floor_b32_interleaved_samples_per_s"]
    res["ratio_cpu_c32_over_floor_b32"] = p32["server_cpu_ms_per_request"] / res[
        "floor_b32_interleaved_cpu_ms_per_sample"]
    res["server_cpu_ms_over_floor_c32"] = p32["server_cpu_ms_per_request"] - res[
        "floor_b32_interleaved_cpu_ms_per_sample"]
    res["b1_p50_over_floor_ms"] = res["server_b1_p50_ms"] - res["floor_b1_interleaved_p50_ms"]
    benchmark.extra_info.update(res)
    print("\n" + json.dumps(res, indent=1, default=float))
    for p in res["phases"]:
        assert set(p["statuses"]) == {200} and not p["errors"], p
    assert rc == 0
