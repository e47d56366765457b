#!/usr/bin/env bash
# One call on the GPU machine (see ../shared/docs/DEVICE.md): build dcgen._C against the torch
# there, run the test suite (CUDA tests included), run the benchmark suite with JSON into $OUT,
# print the baseline-vs-dcgen table last. Needs the wheels in .whl/ (diffusers, its
# importlib_metadata and lazy-importer, nvidia-cutlass) carried with the call.
#
#   run(command="bash benchmarks/device_check.sh", carry=[".whl"], timeout_s=420)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/dcgen_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 )) s] $*"; }

if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"

stamp "build"
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export DCGEN_CUDA_ARCHS=${DCGEN_CUDA_ARCHS:-90} MAX_JOBS=${MAX_JOBS:-16}
export DCGEN_BUILD_DIR=/tmp/dcgen_build
rm -f dcgen/_C*.so
if ! DCGEN_REQUIRE_EXTENSION=1 DCGEN_CUDA=1 python3 setup.py -q build_ext --inplace >"$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"; echo "BUILD FAILED"; exit 1
fi
python3 -c "import dcgen, json; print(json.dumps(dcgen.build_info()))" | tee "$OUT/build_info.json"

stamp "tests"
python3 -m pytest tests -q -p no:cacheprovider ${DCGEN_TEST_ARGS:-} 2>&1 | tee "$OUT/tests.log" | tail -15
test_rc=${PIPESTATUS[0]}

if [ "${DCGEN_SKIP_BENCH:-0}" = 1 ]; then stamp "benchmarks skipped"; exit "$test_rc"; fi
stamp "benchmarks"
python3 -m pytest benchmarks -q -p no:cacheprovider --benchmark-json="$OUT/bench.json" \
  ${DCGEN_BENCH_ARGS:-} >"$OUT/bench.log" 2>&1
bench_rc=$?
tail -5 "$OUT/bench.log"

stamp "done (tests rc=$test_rc, benchmarks rc=$bench_rc)"
cat "$OUT/build_info.json"
python3 benchmarks/summarize.py "$OUT/bench.json" --markdown "$OUT/table.md"
exit $(( test_rc != 0 || bench_rc != 0 ))
