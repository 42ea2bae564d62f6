#!/usr/bin/env bash
# The one GPU command: build the extension, run the C++ kernel tests, the whole pytest suite (GPU
# tests included) and the benchmarks, writing every log and result into OUT_DIR. Prints a short
# summary last. Usage (repository root, on a machine with a CUDA GPU):
#
#     bench/gpu_run.sh OUT_DIR [bench names...]
#
# The tokenizer file is taken from $GPTOSS_TIKTOKEN_FILE, else ../shared/tokenizer/ or
# .gpu_carry/ (a git-ignored copy for machines that only get the repository).
set -uo pipefail
OUT=${1:?usage: bench/gpu_run.sh OUT_DIR [bench names...]}
shift
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 GPTOSS_PTXAS_VERBOSE=1
PY=${PYTHON:-python3}
for f in "${GPTOSS_TIKTOKEN_FILE:-}" ../shared/tokenizer/o200k_base.tiktoken .gpu_carry/o200k_base.tiktoken; do
  if [ -n "$f" ] && [ -f "$f" ]; then export GPTOSS_TIKTOKEN_FILE=$(realpath "$f"); break; fi
done
status=0
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 )) s] $*"; }

stamp "build"
if ! $PY -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"; echo "BUILD FAILED"; exit 1
fi
grep -E "gptoss-ext:|registers|spill" "$OUT/build.log" | grep -v "0 bytes spill" > "$OUT/ptxas.log" || true
$PY -c "import gptoss_ext, json; print(json.dumps(gptoss_ext.info(), indent=1))" | tee "$OUT/info.json"

stamp "C++ kernel tests"
{ cmake -S . -B build/kernel_tests -G Ninja -DGPTOSS_BUILD_EXTENSION=OFF > /dev/null &&
  cmake --build build/kernel_tests --target gptoss_kernel_tests -j 16 > /dev/null &&
  ./build/kernel_tests/gptoss_kernel_tests; } > "$OUT/kernel_tests.log" 2>&1 || status=1
tail -1 "$OUT/kernel_tests.log"

stamp "pytest"
$PY -m pytest -q -ra --junitxml="$OUT/tests.xml" ${PYTEST_ARGS:-} > "$OUT/tests.log" 2>&1 || status=1
tail -15 "$OUT/tests.log"

stamp "benchmarks"
$PY bench/run_all.py --out "$OUT" ${1:+--only "$@"} > "$OUT/bench.log" 2>&1 || status=1
stamp "done (status $status)"
cat "$OUT/bench.md" 2>/dev/null || tail -30 "$OUT/bench.log"
exit $status
