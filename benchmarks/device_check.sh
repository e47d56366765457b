#!/usr/bin/env bash
# One call on the GPU machine (see ../shared/docs/DEVICE.md): build dcgen._C against the torch
# there, run the test suite (CUDA tests included), run the benchmark suite with JSON into $OUT,
# print the baseline-vs-dcgen table last. Needs the wheels in .whl/ (diffusers, its
# importlib_metadata and lazy-importer, nvidia-cutlass) carried with the call.
# Then (DCGEN_SPEED_TABLE=1, the default; 0 skips it) the paper's speed table in quick mode:
# `dcgen bench --quick` for FLUX at 1K/2K/4K (stock and kernels variants, SDPA default and
# flash, FP8 rows) and SANA-1.6B (stock and kernels), md/json/png into $OUT/speed_{flux,sana},
# both tables printed at the very end.
#
# Time on an H100 (estimate, not yet measured with this step): build + tests + benchmarks
# about 3-4 min (measured in earlier sessions; since then 6 sm_90a files, about 35-40 s of one
# core each, built in parallel, and the Hopper kernels' extra test and benchmark cases, which
# the tests and benchmarks switch on themselves: DCGEN_NVFP4_SM90, DCGEN_ATTENTION_SM90);
# the speed table about 2.5 min more (FLUX: 12
# bf16 row pairs + 6 FP8 rows of a 1+1-block model, dominated by the base FLUX VAE decode at
# 4K, ~2 s each, and ~20 s of imports / model builds; SANA: 6 row pairs of a 1-block model,
# under 1 min), so about 6-7 min in all. Each bench call is capped by DCGEN_SPEED_TIMEOUT
# (default 200 s) so the script cannot run away.
#
#   run(command="bash benchmarks/device_check.sh", carry=[".whl"], timeout_s=480)
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

speed_rc=0
if [ "${DCGEN_SPEED_TABLE:-1}" = 1 ]; then
  stamp "speed table (dcgen bench --quick)"
  speed() {  # name, then dcgen bench arguments
    local name=$1; shift
    timeout "${DCGEN_SPEED_TIMEOUT:-200}" python3 -m dcgen.cli bench --quick "$@" \
      --out "$OUT/speed_$name" >"$OUT/speed_$name.log" 2>&1
    local rc=$?
    [ $rc = 0 ] || { tail -20 "$OUT/speed_$name.log"; echo "speed table $name FAILED (rc=$rc)"; }
    return $rc
  }
  speed flux --model flux --resolutions 1024,2048,4096 --variants stock,kernels \
    --attention default,flash --fp8 || speed_rc=1
  stamp "speed table flux done"
  speed sana --model sana-1.6b --resolutions 1024,2048,4096 --variants stock,kernels || speed_rc=1
fi

stamp "done (tests rc=$test_rc, benchmarks rc=$bench_rc, speed table rc=$speed_rc)"
cat "$OUT/build_info.json"
python3 benchmarks/summarize.py "$OUT/bench.json" --markdown "$OUT/table.md"
for name in flux sana; do
  [ -f "$OUT/speed_$name/speed.md" ] && { echo; cat "$OUT/speed_$name/speed.md"; }
done
exit $(( test_rc != 0 || bench_rc != 0 || speed_rc != 0 ))
