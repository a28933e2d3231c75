"""fastsample.serve.ray: the Ray Serve deployment answers the same tritonclient code as
`fastsample serve`, single node, inside a network namespace (`unshare --net`: Ray's internal
ports listen on every interface, so the test gives it a private loopback).

Skipped when Ray Serve is not installed (the optional `cluster` extra: ~1.3 GB resident, ~19 s
to start) or when this machine does not allow an unprivileged network namespace.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install "
                                        "'fastsample[cluster]')")

REPO = Path(__file__).resolve().parents[1]
CKPT = "checkpoints/grid25/ddgan.safetensors"

SCRIPT = textwrap.dedent("""
    import subprocess, sys, time
    import numpy as np
    subprocess.run(["ip", "link", "set", "lo", "up"], check=False)
    import ray
    from ray import serve
    import tritonclient.http as th
    from fastsample.serve.ray import build
    from fastsample.models import load_model
    from fastsample.models.registry import family_of
    from fastsample import samplers
    ckpt, cache = sys.argv[1], sys.argv[2]
    ray.init(include_dashboard=False, num_cpus=2)
    serve.start(http_options={"host": "127.0.0.1", "port": 8000})
    serve.run(build(ckpt, max_batch=8, max_delay_ms=5, max_num=8, cache=cache, threads=1),
              route_prefix="/")
    try:
        c = th.InferenceServerClient("127.0.0.1:8000", network_timeout=120)
        assert c.is_server_live() and c.is_model_ready("grid25-ddgan")
        seed = th.InferInput("seed", [1], "INT64")
        seed.set_data_from_numpy(np.array([11], dtype=np.int64))
        num = th.InferInput("num", [1], "INT64")
        num.set_data_from_numpy(np.array([5], dtype=np.int64))
        got = c.infer("grid25-ddgan", [seed, num]).as_numpy("samples")
        model, card = load_model(ckpt)
        e = family_of(model)
        want, _ = samplers.sample(e.sampling, model, e.default[0], None, 5, 11, **e.default[1])
        np.testing.assert_allclose(got, want.numpy(), atol=1e-5, rtol=1e-5)
        bad = th.InferInput("seed", [1], "INT64")
        bad.set_data_from_numpy(np.array([-1], dtype=np.int64))
        try:
            c.infer("grid25-ddgan", [bad])
            raise SystemExit("a negative seed was accepted")
        except th.InferenceServerException as err:
            assert "seed must be" in str(err), err
        print("RAY-OK")
    finally:
        serve.shutdown()
        ray.shutdown()
""")


def test_ray_serve_deployment_in_a_network_namespace(tmp_path):
    if shutil.which("unshare") is None:
        pytest.skip("no unshare(1)")
    probe = subprocess.run(["unshare", "-rn", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"no unprivileged network namespace here: {probe.stderr.decode().strip()}")
    script = tmp_path / "ray_check.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_USAGE_STATS_ENABLED": "0"}
    r = subprocess.run(["unshare", "-rn", sys.executable, str(script), CKPT,
                        str(tmp_path / "cache")], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0 and "RAY-OK" in r.stdout, (r.stdout[-2000:], r.stderr[-4000:])
