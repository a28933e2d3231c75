"""Triton Python-backend model that speaks `fastsample serve`'s protocol: inputs seed (INT64
[1]) and num (INT64 [1], optional), output samples (FP32 [num, ...], data space), so the same
tritonclient code works against `fastsample serve`, Ray Serve and Triton.

Copied into a `--format triton-repo` export of a whole-sampler graph as DATA-FAMILY/1/model.py
beside the checkpoint it was exported from. Per request it draws the graph's inputs exactly as
`fastsample sample --seed S --num N` does (the registry's ExportPart.feed) and calls the ONNX
model of the same repository through Triton's BLS, whose dynamic batcher merges the calls of
concurrent requests. Needs fastsample and torch (CPU is enough) in the Triton container
(docs/serving.md). The model config names the graph (parameter `graph`) and the checkpoint
(`checkpoint`, relative to this file's directory).
"""

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

SEED_MAX = (1 << 63) - 1


class TritonPythonModel:
    def initialize(self, args):
        from fastsample.export import core
        from fastsample.models import load_model
        cfg = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in cfg.get("parameters", {}).items()}
        here = Path(args["model_repository"]) / args["model_version"]
        self.graph = params["graph"]
        self.max_num = int(params["max_num"])
        model, card = load_model(here / params["checkpoint"])
        spec = core.build_spec(model, card, params["what"], params["sampler"],
                               int(params["steps"]))
        self.feed, self.names = spec.feed, [t.name for t in spec.inputs]

    def _one(self, request):
        seed = pb_utils.get_input_tensor_by_name(request, "seed")
        num = pb_utils.get_input_tensor_by_name(request, "num")
        s = seed.as_numpy().reshape(-1) if seed is not None else np.zeros(0, np.int64)
        n = num.as_numpy().reshape(-1) if num is not None else np.ones(1, np.int64)
        if s.size != 1 or not 0 <= int(s[0]) <= SEED_MAX:
            raise ValueError(f"seed must be one integer in [0, 2^63 - 1], got {s.tolist()}")
        if n.size != 1 or not 1 <= int(n[0]) <= self.max_num:
            raise ValueError(f"num must be one integer in [1, {self.max_num}], got {n.tolist()}")
        inputs = [pb_utils.Tensor(name, np.ascontiguousarray(t.numpy()))
                  for name, t in zip(self.names, self.feed(int(s[0]), int(n[0])))]
        resp = pb_utils.InferenceRequest(model_name=self.graph, inputs=inputs,
                                         requested_output_names=["samples"]).exec()
        if resp.has_error():
            raise RuntimeError(resp.error().message())
        out = pb_utils.get_output_tensor_by_name(resp, "samples")
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor("samples", np.ascontiguousarray(out.as_numpy(), np.float32))])

    def execute(self, requests):
        responses = []
        for r in requests:
            try:
                responses.append(self._one(r))
            except Exception as e:      # one clear message per request, the model keeps serving
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[], error=pb_utils.TritonError(str(e).splitlines()[0])))
        return responses
