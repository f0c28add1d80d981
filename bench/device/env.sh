# Sourced by the bench/device/*.sh scripts on the lent GPU (device tool, carrying .swrcache and .whl):
# installs the carried wheels (pytest, click; accelerated-scan and fla for the alternatives) into
# /tmp/site, runs the package from the working tree with the pre-built cubin cache, and names the
# card. Results go to $OUT (the device tool's folder that comes back).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
  .whl/bench/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD SWRGEN_CACHE_DIR=$PWD/.swrcache PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader
