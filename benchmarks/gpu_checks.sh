#!/usr/bin/env bash
# The GPU measurements the issues ask for, as one prepared run on a lent GPU host. Prepare here
# with `bash benchmarks/gpu_wheels.sh` (wheels and the parity fixture into .whl/), then call the
# device tool: run(command="bash benchmarks/gpu_checks.sh", carry=[".whl"], timeout_s=580).
# Steps, in order, each under a time limit that keeps the whole run inside BUDGET seconds
# (default 530; a fast step leaves its time to the later ones):
#   1. the model-parity tests (tests/test_parity_model.py, tests/test_parity_losses.py) on CUDA,
#      in float32 and under bf16 autocast (CCRK_PARITY_DEVICE=cuda, CCRK_PARITY_AUTOCAST=bf16),
#      against the reference-parity fixture: shared/reference-parity in the checkout, else
#      .whl/reference-parity (gpu_wheels.sh copies it there), else ../shared/reference-parity.
#      tests/conftest.py starts a Prefect test server for every session, and the host has no
#      Prefect: these tests run with --noconftest (and -p no:cacheprovider).
#   2. translation throughput of a random M2M-100 of facebook/m2m100_418M's architecture and
#      vocabulary size (benchmarks/translation.py --size 418m --device cuda): CTranslate2 float16
#      against naive transformers generate in float32 (and float16), 512 captions, every engine
#      exactly 32 target tokens per caption. CTranslate2's wheel is built for CUDA 12 and opens
#      libcublas.so.12; the image's torch is CUDA 13: where no CUDA 12 cuBLAS is found,
#      libcublas.so.12 is linked to torch's cuBLAS 13 for that step, and the output says so.
#   3. training samples/s per GPU and the K = 6 / K = 10 step overhead of the paper-sized model
#      (benchmarks/kcl_overhead.py --full: Swin-B 224 + XLM-R-large-sized layers, random weights,
#      bf16 autocast, batch 64), with short and with web-length captions.
#   4. the shard build against a plain copy (benchmarks/build.py, BUILD_IMAGES images, default
#      20,000) on the host's CPUs: whether throughput_vs_copy reaches 0.70 where the build is not
#      short of cores, as it is on a 2-core machine.
# A step whose package is missing (duckdb, ctranslate2 without the carried .whl) is skipped, saying
# so. It installs nothing but the carried wheels, each only where the host lacks its module (into
# /tmp/site): the host's python3 (or $PY) needs torch, transformers, sentencepiece, numpy, scipy,
# Pillow, PyYAML, tqdm, rich and pyarrow. Outputs go to $OUT (default /tmp/ccrk-gpu; 8 files, what
# the device tool brings back) as well as stdout; summary.txt has each step's exit status and time.
# STEPS (default 10) and BATCH (default 64 on a GPU) override the kcl benchmark's; TR_CAPTIONS and
# TR_TOKENS the translation benchmark's; PARITY_TESTS the parity test files; *_TIMEOUT each
# step's cap. CPU_SMOKE=1 checks the plumbing on a machine without a GPU: every step on the CPU at
# small sizes (parity tests with CCRK_PARITY_DEVICE=cpu).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/ccrk-gpu}
PY=${PY:-python3}
SMOKE=${CPU_SMOKE:-}
BUDGET=${BUDGET:-$([ -n "$SMOKE" ] && echo 1200 || echo 530)}
DEV=$([ -n "$SMOKE" ] && echo cpu || echo cuda)
mkdir -p "$OUT"
rm -f "$OUT"/{host,summary,parity_*,translation,kcl_full_p1,kcl_full_p2,build}.txt
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1  # keeps a carried-wheels path
# What tests/conftest.py sets (it is not loaded here); no hub: the host reaches no network.
export TOKENIZERS_PARALLELISM=false WANDB_MODE=disabled NO_ALBUMENTATIONS_UPDATE=1 HF_HUB_OFFLINE=1
START=$SECONDS

# run_step NAME FILE CAP RESERVE COMMAND...: COMMAND under min(CAP, what the budget leaves after
# RESERVE seconds kept for the later steps), its output appended to FILE and stdout.
run_step() {
  local name=$1 file=$2 cap=$3 reserve=$4 t0=$SECONDS rc
  shift 4
  local limit=$((BUDGET - (SECONDS - START) - reserve))
  ((limit > cap)) && limit=$cap
  if ((limit < 20)); then
    echo "$name skipped: ${limit}s left for it of the ${BUDGET}s budget" | tee -a "$file" "$OUT/summary.txt"
    return
  fi
  timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$file"
  rc=${PIPESTATUS[0]}
  echo "$name exit: $rc ($((SECONDS - t0)) s; limit $limit s)$( ((rc == 124 || rc == 137)) && echo ', timed out')" \
    | tee -a "$file" "$OUT/summary.txt"
}
note() { echo "$2" | tee -a "$1" "$OUT/summary.txt"; }

{ nvidia-smi || echo "no nvidia-smi"; } > "$OUT/host.txt" 2>&1
"$PY" -c "import sys, torch, transformers; print('python', sys.version.split()[0], 'torch', torch.__version__,
'transformers', transformers.__version__, 'cuda', torch.cuda.is_available(),
torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')" 2>&1 | tee -a "$OUT/host.txt"
{ echo "cpus: $(nproc)"; df -hT . /tmp; } >> "$OUT/host.txt" 2>&1

# The carried wheels (.whl/*.whl, and .whl/*.tar.xz: unpacked wheels), each only where the host
# lacks its module: a second version of a package the host has would shadow it.
SITE=/tmp/site
wheels=() tars=()
for name in duckdb ctranslate2 pytest pluggy iniconfig packaging pygments pytest_timeout safetensors; do
  "$PY" -c "import $name" 2> /dev/null && continue
  for f in .whl/"$name"-[0-9]*; do
    case $f in *.whl) wheels+=("$f") ;; *.tar.xz) tars+=("$f") ;; esac
  done
done
if ((${#wheels[@]} + ${#tars[@]})); then
  echo "installing into $SITE: ${wheels[*]} ${tars[*]}" | tee -a "$OUT/host.txt"
  mkdir -p "$SITE"
  ok=1
  if ((${#wheels[@]})); then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
      "${wheels[@]}" 2>&1 | tee -a "$OUT/host.txt" || ok=
  fi
  if ((${#tars[@]})); then
    "$PY" - "$SITE" "${tars[@]}" << 'PYEOF' 2>&1 | tee -a "$OUT/host.txt" || ok=
import sys, tarfile
for path in sys.argv[2:]:
    with tarfile.open(path) as t:
        kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        t.extractall(sys.argv[1], **kwargs)
PYEOF
  fi
  [ -n "$ok" ] && export PYTHONPATH=$SITE:$PYTHONPATH || echo "installing the carried wheels failed" | tee -a "$OUT/host.txt"
fi

# 1. Model parity on the device, float32 then bf16 autocast.
read -r -a parity_tests <<< "${PARITY_TESTS:-tests/test_parity_model.py tests/test_parity_losses.py}"
present=()
for t in "${parity_tests[@]}"; do [ -f "$t" ] && present+=("$t"); done
fixture=
for d in shared/reference-parity .whl/reference-parity ../shared/reference-parity; do
  [ -d "$d" ] && { fixture=$(cd "$d" && pwd); break; }
done
for mode in fp32 bf16; do
  file=$OUT/parity_${DEV}_$mode.txt
  reserve=$([ $mode = fp32 ] && echo 435 || echo 390)
  if [ -z "$fixture" ]; then
    note "$file" "parity $DEV $mode skipped: no reference-parity fixture (shared/reference-parity, .whl/reference-parity or ../shared/reference-parity; bash benchmarks/gpu_wheels.sh copies it into .whl)"
  elif ((${#present[@]} == 0)); then
    note "$file" "parity $DEV $mode skipped: none of ${parity_tests[*]} is in this checkout"
  elif ! "$PY" -c "import pytest" 2> /dev/null; then
    note "$file" "parity $DEV $mode skipped: no pytest here (carry .whl from bash benchmarks/gpu_wheels.sh)"
  else
    echo "fixture $fixture; CCRK_PARITY_DEVICE=$DEV CCRK_PARITY_AUTOCAST=$([ $mode = bf16 ] && echo bf16)" > "$file"
    run_step "parity $DEV $mode" "$file" "${PARITY_TIMEOUT:-90}" "$reserve" \
      env CCRK_PARITY_DEVICE="$DEV" CCRK_PARITY_AUTOCAST="$([ $mode = bf16 ] && echo bf16)" \
      CCRK_PARITY_FIXTURE="$fixture" "$PY" -m pytest -q -p no:cacheprovider --noconftest "${present[@]}"
  fi
done

# 2. Translation throughput, 418M-sized M2M-100.
file=$OUT/translation.txt
if ! "$PY" -c "import ctranslate2" 2> /dev/null; then
  note "$file" "translation skipped: no ctranslate2 here (run bash benchmarks/gpu_wheels.sh before the call and carry .whl)"
else
  tr_env=()
  if [ -z "$SMOKE" ]; then
    # CTranslate2's CUDA 12 build opens libcublas.so.12; with only torch's cuBLAS 13 here, a folder
    # with libcublas.so.12 -> libcublas.so.13 goes first on LD_LIBRARY_PATH. It calls cublasCreate,
    # SetStream, Sgemm, GemmEx, the strided-batched GEMMs, GetMathMode and GetProperty, all of
    # which cuBLAS 13 keeps; that their ABI is unchanged is what this step finds out.
    libdirs=$("$PY" - /tmp/ccrk-cublas12 << 'PYEOF' 2>> "$file"
import ctypes, glob, os, sys, sysconfig

try:
    ctypes.CDLL("libcublas.so.12")
    print("cuBLAS: libcublas.so.12 loads as it is", file=sys.stderr)
    sys.exit(0)
except OSError:
    pass
roots = [os.path.join(sysconfig.get_paths()["purelib"], "nvidia"), "/usr/local/cuda/lib64",
         "/usr/lib/x86_64-linux-gnu"] + glob.glob("/usr/local/cuda-12*/lib64")
found = sorted(p for r in roots for p in glob.glob(os.path.join(r, "**", "libcublas.so.12*"), recursive=True))
if found:
    print(f"cuBLAS: a CUDA 12 one, {found[0]}", file=sys.stderr)
    print(os.path.dirname(found[0]))
    sys.exit(0)
import torch

x = torch.ones(64, 64, device="cuda")
(x @ x).sum().item()  # torch's cuBLAS is loaded now
loaded = sorted({line.split()[-1] for line in open("/proc/self/maps") if "/libcublas" in line})
if not loaded:
    print("cuBLAS: none found; CTranslate2 will fail to load libcublas.so.12", file=sys.stderr)
    sys.exit(0)
shim = sys.argv[1]
os.makedirs(shim, exist_ok=True)
for path in loaded:
    link = os.path.join(shim, os.path.basename(path).split(".so")[0] + ".so.12")
    if os.path.lexists(link):
        os.remove(link)
    os.symlink(path, link)
    print(f"cuBLAS: no CUDA 12 one here; {link} -> {path} (an ABI guess: cuBLAS 13 under CTranslate2's CUDA 12 build)",
          file=sys.stderr)
print(":".join([shim] + sorted({os.path.dirname(p) for p in loaded})))
PYEOF
)
    [ -n "$libdirs" ] && tr_env+=("LD_LIBRARY_PATH=$libdirs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}")
    # CTranslate2's wheel has sm_53-sm_86 code and sm_86 PTX: the H200 (sm_90) runs the PTX, compiled
    # by the driver on first use (lazily, cached for the process); the warm-up time shows it.
    tr_env+=(CUDA_MODULE_LOADING=LAZY CUDA_CACHE_MAXSIZE=4294967296)
    tr_args=(--size 418m --device cuda --captions "${TR_CAPTIONS:-512}" --fixed-tokens "${TR_TOKENS:-32}")
  else
    tr_args=(--size 418m --device cpu --captions "${TR_CAPTIONS:-8}" --fixed-tokens "${TR_TOKENS:-4}" --threads 2)
  fi
  cat "$file" 2> /dev/null
  env "${tr_env[@]}" "$PY" -c "import ctranslate2 as c; print('ctranslate2', c.__version__, 'cuda devices',
c.get_cuda_device_count(), 'compute types', sorted(c.get_supported_compute_types('$DEV')))" 2>&1 | tee -a "$file"
  run_step "translation 418m $DEV" "$file" "${TRANSLATION_TIMEOUT:-180}" 240 \
    env "${tr_env[@]}" "$PY" benchmarks/translation.py "${tr_args[@]}"
fi

# 3. K-caption overhead, demo-grammar captions of one phrase (about 7 tokens), then two (about 13,
# as web captions run).
if [ -z "$SMOKE" ]; then
  kcl_args=(--full --steps "${STEPS:-10}")
else
  kcl_args=(--steps "${STEPS:-2}")
fi
[ -n "${BATCH:-}" ] && kcl_args+=(--batch "$BATCH")
for phrases in 1 2; do
  run_step "kcl_overhead --phrases $phrases" "$OUT/kcl_full_p$phrases.txt" "${KCL_TIMEOUT:-180}" \
    $((phrases == 1 ? 150 : 60)) "$PY" benchmarks/kcl_overhead.py "${kcl_args[@]}" --phrases "$phrases"
done

# 4. The build benchmark on the host's disk (TMPDIR under the working tree, not a memory-backed /tmp).
if "$PY" -c "import duckdb, pyarrow, PIL" 2> /dev/null; then
  mkdir -p .bench-tmp
  { nproc; df -hT .bench-tmp /tmp; } > "$OUT/build.txt" 2>&1
  run_step "build benchmark" "$OUT/build.txt" "${BUILD_TIMEOUT:-150}" 0 \
    env TMPDIR="$PWD/.bench-tmp" "$PY" benchmarks/build.py --images "${BUILD_IMAGES:-$([ -n "$SMOKE" ] && echo 5000 || echo 20000)}" \
    --repeat "${BUILD_REPEAT:-$([ -n "$SMOKE" ] && echo 1 || echo 2)}"
  rm -rf .bench-tmp
else
  note "$OUT/build.txt" "build benchmark skipped: no duckdb here (run bash benchmarks/gpu_wheels.sh before the call and carry .whl)"
fi
echo "total: $((SECONDS - START)) s of the ${BUDGET}s budget" >> "$OUT/summary.txt"
echo "== summary" && cat "$OUT/summary.txt"
