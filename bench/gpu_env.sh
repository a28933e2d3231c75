# Sourced by the bench/gpu_*.sh scripts on a lent GPU machine: $OUT, PYTHONPATH, and the wheels
# the device image lacks (POT, nvtx) from .whl/, installed into /tmp/site.
OUT=${OUT:-/tmp/fastsample-gpu}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PWD:/tmp/site
fi
