#!/usr/bin/env bash
# On a CUDA machine: build instrument._C with its CUDA kernels, run the GPU tests, then the GPU benchmarks.
#
#     bash scripts/gpu_check.sh [LOG_DIR]      # logs: build, gpu_tests, kernels, memory, throughput, suite
#
# SKIP="kernels suite" leaves out those steps (of tests, kernels, memory, oom, throughput, suite). Uses the
# machine's python3 and torch (never installs torch). Inseq and Captum, when present (or as wheels in .whl/,
# installed with --no-deps into /tmp/site), are compared against in benchmarks/throughput.py.
set -uo pipefail
cd "$(dirname "$0")/.."
logs="${1:-/tmp/gpu_check}"
mkdir -p "$logs"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
python3 -c "import torch, transformers; print('torch', torch.__version__, 'CUDA', torch.version.cuda, '| transformers', transformers.__version__)"

step() { echo "== $1 ($(date +%T))"; }
wanted() { [[ " ${SKIP:-} " != *" $1 "* ]]; }

step build
# Not the image's $CXX (/opt/gcc/bin/g++ on the lent H200s): it links libstdc++ statically, and the extension's
# copy then crashes beside torch's shared one at the first formatted error message (std::ostream).
[ -x /usr/bin/g++ ] && export CXX=/usr/bin/g++
start=$SECONDS
MAX_JOBS="$(nproc)" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" python3 setup.py build_ext --inplace \
  >"$logs/build.log" 2>&1 || { tail -40 "$logs/build.log"; exit 1; }
echo "built in $((SECONDS - start)) s"
python3 -c "import instrument._C as c; print('instrument._C:', c.__file__, '| CUDA kernels:', c.with_cuda)"

wanted tests && step "GPU tests" && INSTRUMENT_REQUIRE_EXT=1 python3 -m pytest -q -p no:cacheprovider -m gpu tests 2>&1 |
  tee "$logs/gpu_tests.log" | tail -25

wanted kernels && step "kernels benchmark" && python3 benchmarks/kernels.py --devices cuda --repeats 20 2>&1 |
  tee "$logs/kernels.log" | tail -60

wanted memory && step "integrated gradients' peak memory" && python3 benchmarks/memory.py --device cuda --unchunked 2>&1 |
  tee "$logs/memory.log" | tail -9

wanted oom && step "recovery from a real out-of-memory error" && python3 scripts/oom_recovery.py 2>&1 | tail -5

wanted throughput && step "throughput benchmark" && python3 benchmarks/throughput.py --device cuda --repeats 5 2>&1 |
  tee "$logs/throughput.log" | tail -30

if wanted suite; then
  step "whole suite (CPU models, the GPU visible)"
  INSTRUMENT_REQUIRE_EXT=1 timeout 150 python3 -m pytest -q -p no:cacheprovider -n "$(nproc)" tests \
    >"$logs/suite.log" 2>&1
  echo "suite rc=$?"; grep -E "^(FAILED|ERROR)|passed|failed" "$logs/suite.log" | tail -15
fi
step done
