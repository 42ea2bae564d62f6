#!/usr/bin/env bash
# The one GPU command: build the extension, run the C++ kernel tests, the whole pytest suite (GPU
# tests first) and the benchmarks. Results go into OUT_DIR: bench.json, bench.md, bench.png, and
# logs.tar.gz (build with ptxas registers/spills, kernel tests, pytest, benchmark logs, junit xml).
# Then the end-to-end benchmark (e2e_<preset>.json/.md). Prints a short summary last. Usage (repository root, on a machine with a CUDA GPU):
#
#     bench/gpu_run.sh OUT_DIR [bench names...]
#
# The tokenizer file is taken from $GPTOSS_TIKTOKEN_FILE, else ../shared/tokenizer/ or
# .gpu_carry/ (a git-ignored copy for machines that only get the repository).
set -uo pipefail
OUT=${1:?usage: bench/gpu_run.sh OUT_DIR [bench names...]}
shift
mkdir -p "$OUT"
LOGS=$(mktemp -d)/logs
mkdir -p "$LOGS"
export PYTHONUNBUFFERED=1 GPTOSS_PTXAS_VERBOSE=1
PY=${PYTHON:-python3}
for f in "${GPTOSS_TIKTOKEN_FILE:-}" ../shared/tokenizer/o200k_base.tiktoken .gpu_carry/o200k_base.tiktoken; do
  if [ -n "$f" ] && [ -f "$f" ]; then export GPTOSS_TIKTOKEN_FILE=$(realpath "$f"); break; fi
done
status=0
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
finish() {
  tar -czf "$OUT/logs.tar.gz" -C "$(dirname "$LOGS")" logs
  stamp "done (status $status)"
  cat "$OUT/bench.md" 2>/dev/null || tail -30 "$LOGS/bench.log"
  exit $status
}

stamp "build"
if ! $PY -m pip install -v --no-build-isolation --no-deps -e . > "$LOGS/build.log" 2>&1; then
  tail -40 "$LOGS/build.log"; echo "BUILD FAILED"; status=1; finish
fi
grep -E "gptoss-ext:|registers|spill|stack frame" "$LOGS/build.log" > "$LOGS/ptxas.log" || true
grep -E "gptoss-ext:" "$LOGS/build.log" | sort -u
$PY -c "import gptoss_ext, json; print(json.dumps(gptoss_ext.info()))" | tee "$LOGS/info.json"
readelf -d gptoss_ext/_C*.so | grep -E "NEEDED.*(stdc|c10)" || true

stamp "C++ kernel tests"
{ cmake -S . -B build/kernel_tests -G Ninja -DGPTOSS_BUILD_EXTENSION=OFF > /dev/null &&
  cmake --build build/kernel_tests --target gptoss_kernel_tests -j 16 > /dev/null &&
  ./build/kernel_tests/gptoss_kernel_tests; } > "$LOGS/kernel_tests.log" 2>&1 || status=1
tail -1 "$LOGS/kernel_tests.log"

stamp "pytest (GPU tests, then the rest)"
$PY -m pytest -v -ra -m gpu --junitxml="$LOGS/tests_gpu.xml" ${PYTEST_ARGS:-} > "$LOGS/tests_gpu.log" 2>&1 || status=1
grep -E "PASSED|FAILED|ERROR|SKIPPED|Fatal|Segmentation" "$LOGS/tests_gpu.log" | grep -v PASSED | tail -20
tail -1 "$LOGS/tests_gpu.log"
# CPU_TESTS narrows the second run (default: the whole suite) when device time is short.
$PY -m pytest -q -ra -m "not gpu" --junitxml="$LOGS/tests_cpu.xml" ${PYTEST_ARGS:-} ${CPU_TESTS:-tests} > "$LOGS/tests_cpu.log" 2>&1 || status=1
tail -1 "$LOGS/tests_cpu.log"

stamp "benchmarks"
$PY bench/run_all.py --out "$OUT" ${1:+--only "$@"} > "$LOGS/bench.log" 2>&1 || status=1

# End-to-end (python -m gptoss_ext bench) for the presets in $E2E (default both; E2E=none skips).
for preset in ${E2E:-gpt-oss-20b gpt-oss-120b}; do
  [ "$preset" = none ] && continue
  stamp "e2e $preset"
  $PY -m gptoss_ext bench --preset "$preset" --json "$OUT/e2e_$preset.json" > "$OUT/e2e_$preset.md" 2> "$LOGS/e2e_$preset.log" || status=1
  cat "$OUT/e2e_$preset.md"; tail -3 "$LOGS/e2e_$preset.log"
done
finish
