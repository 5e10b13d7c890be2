#!/usr/bin/env bash
# The GPU measurements the issues ask for, as one prepared run on a lent GPU host, e.g. with the
# device tool: run(command="bash benchmarks/gpu_checks.sh", timeout_s=540).
#   - training samples/s per GPU and the K = 6 / K = 10 step overhead of the paper-sized model
#     (benchmarks/kcl_overhead.py --full: Swin-B 224 + XLM-R-large-sized layers, random weights,
#     bf16 autocast, batch 64), with short and with web-length captions.
# It installs nothing: the host's python3 (or $PY) needs torch, transformers, sentencepiece, numpy,
# scipy, Pillow, PyYAML, tqdm and rich. Outputs go to $OUT (default /tmp/ccrk-gpu) as well as
# stdout. STEPS (default 10) and BATCH (default 64 on a GPU) override the benchmark's.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/ccrk-gpu}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1  # keeps a carried-wheels path
(nvidia-smi || echo "no nvidia-smi") > "$OUT/nvidia-smi.txt" 2>&1
"$PY" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__,
'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')" \
  2>&1 | tee "$OUT/versions.txt"
args=(--full --steps "${STEPS:-10}")
[ -n "${BATCH:-}" ] && args+=(--batch "$BATCH")
# Demo-grammar captions of one phrase (about 7 tokens), then two (about 13, as web captions run).
for phrases in 1 2; do
  timeout "${KCL_TIMEOUT:-200}" "$PY" benchmarks/kcl_overhead.py "${args[@]}" --phrases "$phrases" 2>&1 \
    | tee "$OUT/kcl_full_p$phrases.txt"
  echo "kcl_overhead --phrases $phrases exit: ${PIPESTATUS[0]}" | tee -a "$OUT/kcl_full_p$phrases.txt"
done
