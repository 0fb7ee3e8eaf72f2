#!/usr/bin/env bash
# Everything that needs a GPU, in one go, for a session that is lent one (target: under
# 8 minutes on one H100/H200). Never run yet: no GPU has been lent to this project so far.
#   1. the gpu-marked tests (bf16 kernels against their twins, on the device);
#   2. the kernel benchmark in its quick mode (Llama-3-8B shapes, M = 1 and 16), which writes
#      benchmarks/kernels_<device>.json and prints the pass/fail table against
#      docs/kernels.md#speed-targets;
#   3. a small Llama-shaped recipe end to end on CUDA (train, merge, GPTQ, AWQ, evaluate),
#      so the NF4 and W4A16 kernels run inside the pipeline.
# Usage: bash scripts/gpu_check.sh   (from the repository root, with .venv set up)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
$PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: this script is for a machine with a GPU')"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true

echo "== 1/3 gpu tests"
timeout 180 $PY -m pytest -q -m gpu tests/kernels

echo "== 2/3 kernel benchmark (quick)"
timeout 240 $PY scripts/bench_kernels.py --quick

echo "== 3/3 a Llama-shaped recipe on CUDA"
work=$(mktemp -d)
$PY - "$work" <<'PYEOF'
import sys
from pathlib import Path
sys.path.insert(0, ".")
from tests.conftest import make_tiny_llama
from qlora_pipeline.models import resolve_model
from qlora_pipeline.recipe import ModelConfig
make_tiny_llama(Path(sys.argv[1]) / "model", resolve_model(ModelConfig(source="builtin:smollm2-135m")),
                layers=4, hidden=1024, intermediate=2816, kv_heads=4)
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
timeout 300 .venv/bin/pipeline run "$work/recipe.yaml" || [ $? -eq 1 ]  # 1: the random model may fail the gate
cat "$work/runs/gpu_check/report/output/report.md"
