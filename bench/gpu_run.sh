#!/usr/bin/env bash
# The one GPU command: build the extension, run the C++ kernel tests, the whole pytest suite (GPU
# tests first), every kernel under compute-sanitizer, the benchmarks and the end-to-end runs.
# Results go into OUT_DIR: bench.json, bench.md, bench.png, e2e_<preset>.{json,md}, sanitize.md and
# logs.tar.gz (build with ptxas registers/spills, kernel tests, pytest, sanitizer and benchmark
# logs, junit xml). Prints a short summary last. Usage (repository root, on a machine with a GPU):
#
#     bench/gpu_run.sh OUT_DIR [bench names...]
#
#   STAGES     which stages run, in this order (default all but parallel): build kernel_tests tests sanitize
#              bench e2e serve http parallel (http: the server's targets, wheels in .whl/; parallel: 2 GPUs)
#   E2E        presets of the e2e stage (default "gpt-oss-20b gpt-oss-120b")
#   BASELINE   a source tree of an earlier version (e.g. `git archive REV | tar -x -C DIR`): the e2e
#              stage also builds it and runs its 20b benchmark on the same GPU (e2e_baseline.md), so
#              the single-stream decode figure stands beside the previous one from the same run
#   CPU_TESTS  narrows the CPU half of the test stage (default: the whole suite)
#   E2E_PEERS  0: the e2e stage skips the transformers peer
#   SANITIZE_TOOLS  the compute-sanitizer tools (default "memcheck racecheck synccheck")
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
STAGES=" ${STAGES:-build kernel_tests tests sanitize bench e2e serve} "
for f in "${GPTOSS_TIKTOKEN_FILE:-}" ../shared/tokenizer/o200k_base.tiktoken .gpu_carry/o200k_base.tiktoken; do
  if [ -n "$f" ] && [ -f "$f" ]; then export GPTOSS_TIKTOKEN_FILE=$(realpath "$f"); break; fi
done
status=0
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
want() { [[ "$STAGES" == *" $1 "* ]]; }
finish() {
  tar -czf "$OUT/logs.tar.gz" -C "$(dirname "$LOGS")" logs
  stamp "done (status $status)"
  cat "$OUT/bench.md" 2>/dev/null | head -3
  for f in "$OUT"/e2e_*.md "$OUT"/serve_*.md "$OUT/sanitize.md"; do [ -f "$f" ] && cat "$f"; done
  exit $status
}

if want build; then
  stamp "build"
  if ! $PY -m pip install -v --no-build-isolation --no-deps -e . > "$LOGS/build.log" 2>&1; then
    tail -40 "$LOGS/build.log"; echo "BUILD FAILED"; status=1; finish
  fi
  grep -E "gptoss-ext:|registers|spill|stack frame" "$LOGS/build.log" > "$LOGS/ptxas.log" || true
  grep -E "gptoss-ext:" "$LOGS/build.log" | sort -u
  $PY -c "import gptoss_ext, json; print(json.dumps(gptoss_ext.info()))" | tee "$LOGS/info.json"
  readelf -d gptoss_ext/_C*.so | grep -E "NEEDED.*(stdc|c10)" || true
fi

if want kernel_tests; then
  stamp "C++ kernel tests"
  { cmake -S . -B build/kernel_tests -G Ninja -DGPTOSS_BUILD_EXTENSION=OFF > /dev/null &&
    cmake --build build/kernel_tests --target gptoss_kernel_tests -j 16 > /dev/null &&
    ./build/kernel_tests/gptoss_kernel_tests; } > "$LOGS/kernel_tests.log" 2>&1 || status=1
  tail -1 "$LOGS/kernel_tests.log"
fi

if want tests; then
  stamp "pytest (GPU tests, then the rest)"
  $PY -m pytest -v -ra -m gpu --junitxml="$LOGS/tests_gpu.xml" ${PYTEST_ARGS:-} > "$LOGS/tests_gpu.log" 2>&1 || status=1
  grep -E "PASSED|FAILED|ERROR|SKIPPED|Fatal|Segmentation" "$LOGS/tests_gpu.log" | grep -v PASSED | tail -20
  tail -1 "$LOGS/tests_gpu.log" | tee "$OUT/tests_gpu_summary.txt"
  $PY -m pytest -q -ra -m "not gpu" --junitxml="$LOGS/tests_cpu.xml" ${PYTEST_ARGS:-} ${CPU_TESTS:-tests} > "$LOGS/tests_cpu.log" 2>&1 || status=1
  tail -1 "$LOGS/tests_cpu.log"
fi

if want sanitize; then
  # Every kernel once (tests/gpu_sanitize.py) under each tool (the few torch launches there are checked too).
  stamp "compute-sanitizer"
  SAN=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
  { echo "| compute-sanitizer tool | errors | launches covered |"; echo "|---|---:|---|"; } > "$OUT/sanitize.md"
  for tool in ${SANITIZE_TOOLS:-memcheck racecheck synccheck}; do
    timeout ${SANITIZE_TIMEOUT:-150} "$SAN" --tool "$tool" --error-exitcode 9 \
      $PY tests/gpu_sanitize.py > "$LOGS/sanitize_$tool.log" 2>&1
    rc=$?
    summary=$(grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$LOGS/sanitize_$tool.log" | tail -1)
    covered=$(grep -oE "gpu_sanitize: [0-9]+ launches" "$LOGS/sanitize_$tool.log" || echo "did not finish (rc $rc)")
    echo "| $tool | ${summary:-no summary (rc $rc)} | $covered |" >> "$OUT/sanitize.md"
    [ $rc -eq 0 ] || status=1
  done
fi

if want bench; then
  stamp "benchmarks"
  $PY bench/run_all.py --out "$OUT" ${1:+--only "$@"} > "$LOGS/bench.log" 2>&1 || status=1
fi

if want e2e; then
  # End to end (python -m gptoss_ext bench) for the presets in $E2E (default both; E2E=none skips).
  for preset in ${E2E:-gpt-oss-20b gpt-oss-120b}; do
    [ "$preset" = none ] && continue
    stamp "e2e $preset"
    $PY -m gptoss_ext bench --preset "$preset" --json "$OUT/e2e_$preset.json" $([ "${E2E_PEERS:-1}" = 0 ] && echo --no-peers) \
      > "$OUT/e2e_$preset.md" 2> "$LOGS/e2e_$preset.log" || status=1
    tail -3 "$LOGS/e2e_$preset.log"
  done
  if [ -n "${BASELINE:-}" ] && [ -d "$BASELINE" ]; then
    stamp "baseline build and e2e gpt-oss-20b ($BASELINE)"
    if (cd "$BASELINE" && $PY setup.py -q build_ext --inplace) > "$LOGS/baseline_build.log" 2>&1; then
      (cd "$BASELINE" && PYTHONPATH=. $PY -m gptoss_ext bench --preset gpt-oss-20b --no-peers \
        --json "$OUT/e2e_baseline.json") > "$OUT/e2e_baseline.md" 2> "$LOGS/e2e_baseline.log" || status=1
    else
      tail -20 "$LOGS/baseline_build.log"; echo "BASELINE BUILD FAILED"; status=1
    fi
  fi
fi
if want serve; then
  # The serving engine's targets (bench-serve): 512 requests 1k in / 1k out at once for each preset
  # in $E2E (20b beside static batches of 64), and the mixed load (a 16k prompt while 64 decode)
  # with the prefill of decoding steps capped and not.
  for preset in ${E2E:-gpt-oss-20b gpt-oss-120b}; do
    [ "$preset" = none ] && continue
    stamp "bench-serve $preset"
    $PY -m gptoss_ext bench-serve --preset "$preset" --num-requests 512 --input-len 1024 --output-len 1024 \
      --max-num-seqs $([ "$preset" = gpt-oss-20b ] && echo 512 || echo 256) \
      --static-batch $([ "$preset" = gpt-oss-20b ] && echo 64 || echo 0) --json "$OUT/serve_$preset.json" \
      > "$OUT/serve_$preset.md" 2> "$LOGS/serve_$preset.log" || status=1
  done
  stamp "serve overhead (sleep engine, CPU only)"
  $PY bench/serve_overhead.py --json "$OUT/serve_overhead.json" > "$OUT/serve_overhead.md" \
    2> "$LOGS/serve_overhead.log" || status=1
  for cap in 0 512; do
    stamp "bench-serve --mixed (prefill cap $cap)"
    $PY -m gptoss_ext bench-serve --preset gpt-oss-20b --mixed 16384 --num-requests 64 --input-len 1024 \
      --max-prefill-with-decodes $cap --json "$OUT/serve_mixed_cap$cap.json" > "$OUT/serve_mixed_cap$cap.md" \
      2> "$LOGS/serve_mixed_cap$cap.log" || status=1
  done
fi
if want http; then
  # The server's targets on the GPU (not in the default stages): 256 streaming clients through HTTP
  # against the engine driven directly on the same requests (20b, 1k in / 256 out; target within
  # 10 %), and one streaming client against the engine alone at batch 1, which is generate()'s
  # road (target within 5 %); serve_overhead runs in the serve stage. The image
  # has no fastapi / uvicorn: wheels carried in .whl/ (git-ignored) go to a private site dir.
  if ! $PY -c "import fastapi, uvicorn" 2>/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl > "$LOGS/wheels.log" 2>&1 \
      && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  stamp "http: serve gpt-oss-20b"
  $PY -m gptoss_ext serve --preset gpt-oss-20b --port 8011 --max-num-seqs 256 --log-level warning \
    > "$LOGS/serve_http.log" 2>&1 &
  SP=$!
  for i in $(seq 180); do curl -sf http://127.0.0.1:8011/health > /dev/null && break; sleep 1; done
  for n in 256 1; do
    stamp "http: $n clients"
    $PY -m gptoss_ext bench-serve --base-url http://127.0.0.1:8011/v1 --num-requests $n --max-concurrency $n \
      --input-len 1024 --output-len 256 --json "$OUT/http_$n.json" > "$OUT/http_$n.md" 2> "$LOGS/http_$n.log" || status=1
  done
  kill -INT $SP; wait $SP
  for n in 256 1; do
    stamp "http: the same $n requests direct"
    $PY -m gptoss_ext bench-serve --preset gpt-oss-20b --num-requests $n --input-len 1024 --output-len 256 \
      --static-batch 0 --json "$OUT/direct_$n.json" > "$OUT/direct_$n.md" 2> "$LOGS/direct_$n.log" || status=1
  done
  cat "$OUT"/http_256.md "$OUT"/direct_256.md 2>/dev/null | grep -E "output tok/s|per output"
fi
if want parallel; then
  # Several GPUs (not in the default stages): the 2-GPU tests, then 120b batch-1 decode on 1 and 2
  # GPUs in the same run (target: 2 GPUs >= 1.6x), 120b 512 x 1k/1k served on 2 GPUs (target 12k
  # output tok/s), and 20b on 2 GPUs against one GPU (two replicas: twice the 1-GPU figure).
  NGPU=$($PY -c "import torch; print(torch.cuda.device_count())")
  if [ "$NGPU" -lt 2 ]; then
    echo "parallel: $NGPU GPU here, skipped"
  else
    TR="$PY -m torch.distributed.run --standalone --nproc-per-node 2"
    stamp "parallel tests"
    $PY -m pytest -q -rs tests/test_parallel_gpu.py --junitxml="$LOGS/parallel_junit.xml" \
      > "$LOGS/parallel_tests.log" 2>&1 || status=1
    tail -3 "$LOGS/parallel_tests.log"
    for preset in gpt-oss-120b gpt-oss-20b; do
      stamp "e2e $preset on 1 and 2 GPUs"
      $PY -m gptoss_ext bench --preset $preset --no-peers --json "$OUT/tp1_$preset.json" > "$OUT/tp1_$preset.md" \
        2> "$LOGS/tp1_$preset.log" || status=1
      $TR -m gptoss_ext bench --preset $preset --no-peers --tensor-parallel 2 --json "$OUT/tp2_$preset.json" \
        > "$OUT/tp2_$preset.md" 2> "$LOGS/tp2_$preset.log" || status=1
      stamp "bench-serve $preset on 2 GPUs"
      $TR -m gptoss_ext bench-serve --preset $preset --tensor-parallel 2 --num-requests 512 --input-len 1024 \
        --output-len 1024 --max-num-seqs 512 --json "$OUT/serve_tp2_$preset.json" > "$OUT/serve_tp2_$preset.md" \
        2> "$LOGS/serve_tp2_$preset.log" || status=1
    done
  fi
fi
finish
