#!/usr/bin/env bash
# hyperkern GPU suite: build the CUDA extension, run the CUDA and Triton correctness tests on the
# GPU, then both benchmark suites, writing everything into one results directory.
#
#   bash bench/gpu_suite.sh [RESULTS_DIR]          # default ./gpu-results
#
# For an H100 machine that has its own python3 with torch (CUDA build), triton, ninja, nvcc and
# pytest, and no internet: nothing is downloaded (pip runs with --no-deps --no-build-isolation).
# Run from anywhere; it works in the repository that contains this script.
#
# Environment knobs:
#   PYTHON       interpreter to use (default python3)
#   BENCH_ARGS   extra arguments for every `python -m bench` call, e.g. "--quick"
#   MAX_JOBS     parallel compile jobs for the extension (default: CPU count, at most 16)
#   TEST_WORKERS pytest-xdist workers for the GPU tests when xdist is installed (default 8)
#   MODEL_VARIANTS  the model suite's variants (default every one of bench/models.py; the CUDA-graph
#                step uses the same list)
#   GPU_SUITE_LIMITS  per-step wall-clock limits in seconds, e.g. "build=120 tests=150 ops=120"
#                (keys: the step names of GPU_SUITE_STEPS); a step past its limit is killed, reported
#                as FAILED (exit 124) and the suite goes on, so a time-boxed call still gets the later
#                steps and targets.md. The op step rewrites bench-ops.json after each op module and dtype
#                (marked "partial" until the end), so a killed op step still reports the rows it measured
#   GPU_SUITE_STEPS  which steps to run (default "build tests ops models graphs host profile"; "ops" includes the conv
#                strategies A/B of bench/ops_conv.py). The environment and the extension check
#                always run. To split the suite over calls with a time limit, on machines that start
#                bare, keep "build" in each call: "build tests", then "build ops models" with
#                BENCH_ARGS=--quick. On an H200 (docs/benchmark-history.md, GPU run 3): build 94 s, the GPU
#                tests more than 190 s with 14 workers, models 13 s, CUDA graphs 15 s, host 9 s (all
#                --quick), ops --quick more than 100 s. A 10-minute call that fits:
#                GPU_SUITE_LIMITS="build=150 tests=300 models=60 graphs=40 host=30 ops=150".
#
# Every step runs even when an earlier one failed (except that a failed build is reported and the
# tests and benchmarks then run against whatever extension exists); the exit status is nonzero if
# any step failed. RESULTS_DIR/summary.txt lists each step with its status and log file,
# RESULTS_DIR/targets.md the issue's GPU targets (PASS / MISS) read from the benchmark JSON files.
set -uo pipefail
set -f  # no globbing: MODEL_VARIANTS holds names like batch[torch]

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
OUT=${1:-./gpu-results}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PYTHON=${PYTHON:-python3}
BENCH_ARGS=${BENCH_ARGS:-}
MODEL_VARIANTS=${MODEL_VARIANTS:-plain batch batch[torch] batch[triton] batch/tabm batch/torch_unc hyper_batch deep/loop deep/vmap}
STEPS=" ${GPU_SUITE_STEPS:-build tests ops models graphs host profile} "
want() { [[ "$STEPS" == *" $1 "* ]]; }
CPUS=$(nproc 2>/dev/null || echo 8)
export MAX_JOBS=${MAX_JOBS:-$(( CPUS < 16 ? CPUS : 16 ))}
unset TRITON_INTERPRET  # the Triton kernels must be compiled for the GPU, not interpreted
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # this tree's hyperkern and bench, installed or not

cd "$ROOT" || exit 1
SUMMARY="$OUT/summary.txt"
# appended, so a suite split over several calls (GPU_SUITE_STEPS) keeps every call's lines
echo "== $(date -u +"%Y-%m-%d %H:%M UTC") steps:${STEPS% } (GPU_SUITE_STEPS)" >> "$SUMMARY"
FAILED=0

# limit KEY: the seconds GPU_SUITE_LIMITS gives step KEY (empty when none)
limit() { local kv; for kv in ${GPU_SUITE_LIMITS:-}; do [ "${kv%%=*}" = "$1" ] && echo "${kv#*=}"; done; }

# step KEY NAME LOGFILE COMMAND...: run COMMAND with stdout+stderr to OUT/LOGFILE (and the terminal),
# under KEY's limit from GPU_SUITE_LIMITS when it has one (COMMAND may be a function of this script).
step() {
  local key=$1 name=$2 log=$3
  shift 3
  local secs
  secs=$(limit "$key")
  echo "== $name: $*${secs:+ (limit ${secs}s)}"
  local t0=$SECONDS
  if [ -n "$secs" ]; then
    timeout -k 15 "$secs" bash -c '"$@"' _ "$@" 2>&1 | tee "$OUT/$log"
  else
    "$@" 2>&1 | tee "$OUT/$log"
  fi
  local rc=${PIPESTATUS[0]}
  local status=ok
  if [ "$rc" -ne 0 ]; then
    status="FAILED (exit $rc)"
    FAILED=$((FAILED + 1))
  fi
  printf '%-34s %-18s %5ss  %s\n' "$name" "$status" "$((SECONDS - t0))" "$log" | tee -a "$SUMMARY"
}

environment() {
  date -u +"%Y-%m-%d %H:%M UTC"
  git -C "$ROOT" log -1 --format="commit %H %s" 2>/dev/null || true
  nvidia-smi || true
  command -v nvcc && nvcc --version
  # the C++ compiler the extension is built with (an H200 image's /opt/gcc g++ built an extension whose
  # TORCH_CHECK messages crashed in std::ostringstream: docs/benchmark-history.md, first GPU run)
  echo "c++: $(command -v "${CXX:-c++}") $("${CXX:-c++}" --version 2>/dev/null | head -1)"
  "$PYTHON" - <<'PY'
import platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| cudnn", torch.backends.cudnn.version())
print("cuda available:", torch.cuda.is_available(),
      "| device:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
try:
    import triton
    print("triton", triton.__version__)
except ImportError as exc:
    print("triton missing:", exc)
PY
}

# CUDA headers shipped in pip wheels (nvidia/cu*/include), for toolkits that lack some of them.
WHEEL_CUDA_INCLUDES=$("$PYTHON" - 2>/dev/null <<'PY'
import glob, os, site
dirs = [d for p in site.getsitepackages() for d in sorted(glob.glob(os.path.join(p, "nvidia", "cu*", "include")))]
print(":".join(d for d in dirs if os.path.isdir(d)))
PY
)

# The system g++ unless CXX says otherwise: an H200 image's default /opt/gcc/bin/g++ wrapper built an
# extension whose TORCH_CHECK messages crashed in std::ostringstream; /usr/bin/g++ (the same 13.3)
# built one that raises cleanly (docs/benchmark-history.md, GPU runs 1 and 2).
# That image also sets CXX / CC to the wrapper, so a CXX under /opt/gcc is replaced too (GPU run 3).
if [ -x /usr/bin/g++ ] && { [ -z "${CXX:-}" ] || [[ "$CXX" == /opt/gcc/* ]]; }; then
  export CXX=/usr/bin/g++ CC=/usr/bin/gcc
fi

install_extension() {
  local cpath=${WHEEL_CUDA_INCLUDES}${CPATH:+:$CPATH}
  if FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="9.0" CPATH=$cpath \
      "$PYTHON" -m pip install --no-build-isolation --no-deps --no-index -v -e "$ROOT"; then
    return 0
  fi
  echo "pip install -e failed; building the extension in place instead (the step stays FAILED)"
  FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="9.0" CPATH=$cpath "$PYTHON" setup.py build_ext --inplace
  return 1
}

check_extension() {
  "$PYTHON" - <<'PY'
import torch, hyperkern
from hyperkern._backends import backend_status
print("available backends on cuda:", hyperkern.available_backends("cuda"))
bad = False
for op in ("batch_ensemble_linear", "hyper_batch_ensemble_linear", "batch_ensemble_conv2d",
           "hyper_batch_ensemble_conv2d"):
    st = backend_status("cuda", op)
    print(f"{op}: " + ", ".join(f"{k}={'ok' if v is None else v}" for k, v in st.items()))
    bad |= st["cpp"] is not None or st["triton"] is not None
raise SystemExit(1 if bad else 0)
PY
}

gpu_tests() {
  # The tests that put tensors on the GPU: the cpp backend's CUDA kernels, the Triton kernels, the
  # raw-op error paths (which crashed with one image's default compiler), and the public ops' errors
  # when the CUDA kernels' checks stand in for the Python ones (test_ops_validate_fast_path.py, its cuda cases). Parallel workers when
  # pytest-xdist is there: on an H200 with 14 workers the CUDA kernel tests take about 95 s and the
  # Triton tests about 60 s (mostly compiling); a worker that crashes is reported and replaced.
  local parallel=()
  if "$PYTHON" -c "import xdist" 2>/dev/null; then parallel=(-n "${TEST_WORKERS:-8}"); fi
  # one hung test must not take the step's whole limit
  if "$PYTHON" -c "import pytest_timeout" 2>/dev/null; then parallel+=(--timeout 180); fi
  # -v: one line per test as it finishes, so a run stopped by its limit still names its failures (xdist
  # prints the failure summary only at the end; GPU run 3 lost the names that way)
  "$PYTHON" -m pytest -v -p no:cacheprovider -rfE "${parallel[@]}" --junitxml="$OUT/gpu-tests-junit.xml" \
    "$ROOT/tests/test_ops_cpp_cuda.py" "$ROOT/tests/test_ops_linear_triton.py" "$ROOT/tests/test_ops_conv_triton.py" \
    "$ROOT/tests/test_ops_linear_cpp.py::test_direct_op_call_with_bad_shapes_raises" \
    "$ROOT/tests/test_ops_conv_cpp.py::test_bad_inputs_raise_instead_of_crashing" \
    "$ROOT/tests/test_ops_validate_fast_path.py"
}

# the functions and variables that `step` may run in a child bash (under a limit)
export -f environment install_extension check_extension gpu_tests
export OUT ROOT PYTHON WHEEL_CUDA_INCLUDES

step env "environment" environment.txt environment
want build && step build "build extension (sm_90)" build.log install_extension
step check "extension has CUDA + Triton ops" backends.txt check_extension
want tests && step tests "CUDA + Triton kernel tests on GPU" tests.log gpu_tests
# shellcheck disable=SC2086
want models && step models "bench models (cuda)" bench-models.md \
  "$PYTHON" -m bench.models --device cuda --variants $MODEL_VARIANTS --json "$OUT/bench-models.json" $BENCH_ARGS
# shellcheck disable=SC2086
# GPU time without the host: each step replayed as one CUDA graph (ResNet-20's eager step is host-bound)
want graphs && step graphs "bench models, CUDA graphs" bench-models-graphs.md \
  "$PYTHON" -m bench.models --device cuda --cuda-graphs --repeats 9 --variants $MODEL_VARIANTS \
  --json "$OUT/bench-models-graphs.json"
# host cost of every op and layer at a tiny shape (forward + backward against the plain torch call)
# shellcheck disable=SC2086
want host && step host "bench host cost (cuda)" bench-host.md \
  "$PYTHON" -m bench --device cuda --suite host --json "$OUT/bench-host.json" $BENCH_ARGS
# the op suite last of the benchmarks: the Triton rows autotune on first call (minutes at the large shapes)
# shellcheck disable=SC2086  # BENCH_ARGS is a list of words
want ops && step ops "bench ops (cuda)" bench-ops.md \
  "$PYTHON" -m bench --device cuda --suite ops --json "$OUT/bench-ops.json" --auto-table "$OUT/auto-table.json" \
  $BENCH_ARGS
# where a step's time goes: top kernels and host operators per step
want profile && step profile "profile ResNet-20 + WRN-28-10 steps" profile.md bash -c \
  "$PYTHON -m bench.profile_step --device cuda --model resnet20 --variants plain batch hyper_batch && \
   $PYTHON -m bench.profile_step --device cuda --model wrn28-10 --variants plain batch hyper_batch"

# The issue's GPU targets (a MISS is a result, not a failed step).
"$PYTHON" - "$OUT" <<'PY' | tee "$OUT/targets.md"
import json, os, sys
print("GPU targets: linear fwd >= 90% of torch.mm (large bf16), >= 2x eager (memory-bound); conv <= 1.15x cuDNN;")
print("train step x plain: batch <= 1.15x (ResNet-20) / <= 1.10x (WRN-28-10), hyper-batch <= 2.0x, eager and as")
print("CUDA graph replays ('train (graph)'); host cost at a tiny shape: batch <= 1.5x, hyper-batch <= 2.5x\n")
for name in ("bench-ops.json", "bench-models.json", "bench-models-graphs.json", "bench-host.json"):
    path = os.path.join(sys.argv[1], name)
    if not os.path.exists(path):
        print(f"- {name}: missing (that benchmark step failed or has not run)")
        continue
    for t in json.load(open(path)).get("targets", []):
        print(f"- {'PASS' if t['ok'] else 'MISS'}  {t['target']}: {t['value']}")
PY

echo
echo "== summary ($OUT)"
cat "$SUMMARY"
if [ "$FAILED" -ne 0 ]; then
  echo "$FAILED step(s) failed" | tee -a "$SUMMARY"
  exit 1
fi
echo "all steps passed" | tee -a "$SUMMARY"
