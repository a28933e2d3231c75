"""Starting `fastsample serve` as a child process and loading it over loopback; shared by
bench/test_serving.py (the load test) and tests/test_serve.py (its smoke and the server tests).

Everything here talks to 127.0.0.1 only, is bounded in requests and seconds, and ends only the
process it started (by its pid; SIGKILL only after a graceful stop timed out).

The load generator is a minimal HTTP/1.1 keep-alive client on asyncio streams, one connection
per concurrent client, so that the client's own CPU (it shares the machine with the server)
stays small; tritonclient is what tests/test_serve.py checks protocol compliance with.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
HEADER_LEN = "Inference-Header-Content-Length"


class ServerProcess:
    """`python -m fastsample.serve ARGS --port 0` in its own session; `port` once listening."""

    def __init__(self, args, *, startup_timeout: float = 300.0, env: dict | None = None):
        self.args = [str(a) for a in args]
        self.startup_timeout = startup_timeout
        self.env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
        self.dir = Path(tempfile.mkdtemp(prefix="fastsample-serve-"))
        self.log_path = self.dir / "server.log"
        self.proc = None
        self.port = None
        self.startup_s = None

    def start(self) -> "ServerProcess":
        port_file = self.dir / "port"
        t0 = time.perf_counter()
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fastsample.serve", *self.args, "--host", HOST, "--port", "0",
             "--port-file", str(port_file)], cwd=REPO, env=self.env, stdin=subprocess.DEVNULL,
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        while time.perf_counter() - t0 < self.startup_timeout:
            if port_file.exists():
                self.port = int(port_file.read_text())
                self.startup_s = time.perf_counter() - t0
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode} before "
                                   f"listening:\n{self.log()[-3000:]}")
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"the server did not listen within {self.startup_timeout} s:\n"
                           f"{self.log()[-3000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def events(self) -> list[dict]:
        out = []
        for line in self.log().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict):
                out.append(rec)
        return out

    def stop(self, sig=signal.SIGTERM, timeout: float = 60.0) -> int:
        """Signal the server and wait for it; returns its exit code (-9 if it had to be
        killed after `timeout`)."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return -9

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def group_alive(self) -> bool:
        """Whether any process of the server's session (it and anything it started) runs."""
        try:
            os.killpg(self.proc.pid, 0)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            return True

    def cpu_seconds(self) -> float:
        """User + system CPU of the server process (all its threads) so far."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        self.kill()
        self._log.close()
        return False


#-----------------------------------------------------------------------------------------------
# A minimal keep-alive HTTP client.

class Conn:
    def __init__(self, port: int):
        self.port = port
        self.r = self.w = None

    async def open(self):
        self.r, self.w = await asyncio.open_connection(HOST, self.port)
        return self

    async def request(self, method: str, path: str, body: bytes = b"",
                      headers: dict | None = None):
        """-> (status, headers (lower-case keys), body)."""
        if self.w is None:
            await self.open()
        h = {"Host": HOST, "Content-Length": str(len(body)), **(headers or {})}
        head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in h.items())
        self.w.write(head.encode() + b"\r\n" + body)
        line = await self.r.readline()
        if not line:
            raise ConnectionError("the server closed the connection")
        status = int(line.split()[1])
        hdrs = {}
        while True:
            line = await self.r.readline()
            if line in (b"\r\n", b""):
                break
            k, _, v = line.decode().partition(":")
            hdrs[k.strip().lower()] = v.strip()
        data = await self.r.readexactly(int(hdrs.get("content-length", 0)))
        if hdrs.get("connection", "").lower() == "close":
            self.close()
        return status, hdrs, data

    def close(self):
        if self.w is not None:
            self.w.close()
        self.r = self.w = None


def infer_body(seed: int, num: int = 1) -> bytes:
    inputs = [{"name": "seed", "datatype": "INT64", "shape": [1], "data": [seed]}]
    if num != 1:
        inputs.append({"name": "num", "datatype": "INT64", "shape": [1], "data": [num]})
    return json.dumps({"inputs": inputs, "parameters": {"binary_data_output": True}}).encode()


def samples_of(hdrs: dict, body: bytes):
    """The `samples` tensor of a binary or JSON OIP response, as numpy."""
    import numpy as np
    n = int(hdrs.get(HEADER_LEN.lower(), len(body)))
    head = json.loads(body[:n])
    out = head["outputs"][0]
    if n < len(body):
        arr = np.frombuffer(body[n:n + out["parameters"]["binary_data_size"]], dtype="<f4")
    else:
        arr = np.asarray(out["data"], dtype=np.float32)
    return arr.reshape(out["shape"])


async def _load(port: int, model: str, concurrency: int, requests: int, seconds: float,
                num: int, seed0: int, stop_on_error: bool) -> dict:
    path = f"/v2/models/{model}/infer"
    lat, statuses, errors = [], Counter(), Counter()
    state = {"sent": 0}
    deadline = time.perf_counter() + seconds

    async def client(i):
        c = Conn(port)
        try:
            while state["sent"] < requests and time.perf_counter() < deadline:
                k = state["sent"]
                state["sent"] += 1
                t0 = time.perf_counter()
                try:
                    st, _, _ = await c.request("POST", path, infer_body(seed0 + k, num))
                except (OSError, asyncio.IncompleteReadError, ConnectionError) as e:
                    errors[type(e).__name__] += 1
                    c.close()
                    if stop_on_error:
                        break
                    await asyncio.sleep(0.01)
                    continue
                statuses[st] += 1
                if st == 200:
                    lat.append(time.perf_counter() - t0)
        finally:
            c.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(concurrency)))
    wall = time.perf_counter() - t0
    return {"concurrency": concurrency, "num": num, "ok": statuses[200],
            "statuses": dict(statuses), "errors": dict(errors), "wall_s": wall,
            "latencies_s": lat,
            "samples_per_s": statuses[200] * num / wall if wall > 0 else 0.0}


def load(port: int, model: str, *, concurrency: int, requests: int, seconds: float,
         num: int = 1, seed0: int = 0, stop_on_error: bool = False) -> dict:
    """Closed-loop load: `concurrency` clients, each sending its next request when the last one
    is answered, until `requests` were sent or `seconds` passed (stop_on_error: a client stops
    at its first connection error, as when the server shuts down)."""
    return asyncio.run(_load(port, model, concurrency, requests, seconds, num, seed0,
                             stop_on_error))


def get(port: int, path: str):
    async def go():
        c = Conn(port)
        try:
            return await c.request("GET", path)
        finally:
            c.close()
    return asyncio.run(go())


def post(port: int, path: str, body: bytes, headers: dict | None = None):
    async def go():
        c = Conn(port)
        try:
            return await c.request("POST", path, body, headers)
        finally:
            c.close()
    return asyncio.run(go())


def batch_histogram(port: int, model: str) -> dict:
    """{upper bound: executed batches with at most that many samples} (cumulative, from
    /metrics) and the batch count."""
    _, _, body = get(port, "/metrics")
    out = {}
    for line in body.decode().splitlines():
        m = re.match(r'fastsample_batch_size_bucket\{le="([^"]+)",model="([^"]+)"\} (\S+)', line)
        if m and m.group(2) == model:
            out[m.group(1)] = int(float(m.group(3)))
    return out


def histogram_diff(after: dict, before: dict) -> dict:
    """Per-bucket (non-cumulative) batch counts between two batch_histogram() readings."""
    keys = sorted(after, key=lambda k: float("inf") if k == "+Inf" else float(k))
    out, prev = {}, 0
    for k in keys:
        cum = after[k] - before.get(k, 0)
        if cum - prev:
            out[k] = cum - prev
        prev = cum
    return out


def percentile(xs, q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    i = min(len(xs) - 1, max(0, int(round(q / 100 * (len(xs) - 1)))))
    return xs[i]
