"""fastsample serve: an HTTP inference server for fastsample models (layer 7).

    backends.py   a checkpoint behind ONNX Runtime (the whole-sampler export) or the Engine
    batching.py   the per-model dynamic batcher (bounded queue, delay, timeouts)
    app.py        the Open Inference Protocol (KServe v2 / Triton HTTP) + /v1 + /metrics
    command.py    `fastsample serve` / `python -m fastsample.serve`
    ray.py        the same model as a Ray Serve deployment (optional `cluster` extra)

The serve extra (fastapi, uvicorn, prometheus-client) is imported by app.py and command.py
only when a server starts; docs/serving.md is the user's guide.
"""
