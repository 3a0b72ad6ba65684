#!/usr/bin/env bash
# The prepared GPU check (issue: exact on the GPU): one call on a lent GPU machine, about 9.5 minutes, every result
# under $OUT. Each stage runs under its own time box, cut to what is left of the whole; a stage that hangs loses
# only its box. Order (since the third H200 run found the split step exact and the whole one not): the compiled
# fuzz at CUDA's default (split) step, the 7B-shaped step latency against compiled greedy, tests/test_cuda.py, the
# tuner's predicted latencies, the latency against tokens fed. GPU_CHECK_DIAGNOSE=1 first runs the diagnosis of a
# wrong step (every variant, the pieces, compute-sanitizer, an inductor bisect, the generated code of the whole
# step), about 5 minutes of its own.
#
#   device run:  benchmarks/gpu_check.sh                 (OUT is set there; timeout_s 590)
#   here:        OUT=/tmp/gpu_check benchmarks/gpu_check.sh --smoke   (the same stages, tiny, on the CPU)
#
# $OUT gets stages.txt (what ran, how long, how it ended, and each stage's last lines), cuda_fuzz.json,
# gpu_fast_path.json, gpu_auto_tune.json and results.tgz (every stage's full output and JSON). At most 8 files come back from a lease.
set -u
cd "$(dirname "$0")/.."
SMOKE=""
TOTAL=${GPU_CHECK_SECONDS:-560}
if [ "${1:-}" = "--smoke" ]; then SMOKE="--smoke"; TOTAL=${GPU_CHECK_SECONDS:-900}; fi
OUT=${OUT:-benchmarks/results/gpu_check}
WORK=$(mktemp -d /tmp/gpu_check.XXXX)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
export TORCHINDUCTOR_CACHE_DIR=$WORK/inductor-cache  # later stages reuse the kernels compiled by earlier ones
START=$(date +%s)

left() { echo $((TOTAL - ($(date +%s) - START))); }
pack() {
  cp "$WORK/stages.txt" "$OUT/stages.txt"
  for f in cuda_fuzz.json gpu_fast_path.json gpu_auto_tune.json; do [ -f "$WORK/$f" ] && cp "$WORK/$f" "$OUT/$f"; done
  tar czf "$OUT/results.tgz" -C "$WORK" --exclude inductor-cache . 2>/dev/null
}
stage() {  # stage NAME SECONDS COMMAND...: run COMMAND into $WORK/NAME.txt under min(SECONDS, what is left)
  local name=$1 want=$2 have box began rc
  shift 2
  have=$(left)
  if [ "$have" -lt 25 ]; then
    echo "== $name: skipped, $have s left" >>"$WORK/stages.txt"
    return 99
  fi
  box=$((want < have ? want : have))
  began=$(date +%s)
  echo "== $name (box $box s, at $((began - START)) s): $*" >>"$WORK/stages.txt"
  timeout -k 10 "$box" "$@" >"$WORK/$name.txt" 2>&1
  rc=$?
  echo "   exit $rc after $(($(date +%s) - began)) s$([ $rc = 124 ] && echo ' (TIMED OUT)')" >>"$WORK/stages.txt"
  tail -n 12 "$WORK/$name.txt" | sed 's/^/   | /' >>"$WORK/stages.txt"
  pack
  return $rc
}

{
  echo "gpu_check at $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null), smoke '${SMOKE}'"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -2
  python -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'transformers', transformers.__version__)" 2>&1 | tail -1
} >"$WORK/stages.txt"

# 1. Only with GPU_CHECK_DIAGNOSE=1: every variant (split/whole, with/without the step's CUDA graph, eager) at the
#    GPU's shape, then where a wrong one breaks.
if [ -n "${GPU_CHECK_DIAGNOSE:-}" ]; then
  stage exactness 210 python benchmarks/cuda_exactness.py --part generations --budget-s 150 --out "$WORK" $SMOKE
  broken=$(python - "$WORK/cuda_exactness_generations.json" <<'EOF'
import json, sys
try:
    found = json.load(open(sys.argv[1]))
except Exception:
    print("unknown"); raise SystemExit
bad = [name for name, runs in found.items() if isinstance(runs, dict) and any(str(v).startswith("first wrong") for v in runs.values())]
print(" ".join(bad) if bad else "none")
EOF
  )
  echo "   variants with a wrong token: $broken" >>"$WORK/stages.txt"
  # 2. Where it breaks.
  stage pieces 100 python benchmarks/cuda_exactness.py --part pieces --out "$WORK" $SMOKE
  if command -v compute-sanitizer >/dev/null && [ -z "$SMOKE" ]; then
    stage initcheck 75 compute-sanitizer --tool initcheck --print-limit 30 \
      python benchmarks/cuda_exactness.py --part one --variant whole --tokens 16
    stage memcheck 75 compute-sanitizer --tool memcheck --print-limit 30 \
      python benchmarks/cuda_exactness.py --part one --variant whole --tokens 16
  else
    echo "== compute-sanitizer: not run ($([ -n "$SMOKE" ] && echo smoke || echo 'not on PATH'))" >>"$WORK/stages.txt"
  fi
  stage bisect 150 python benchmarks/cuda_exactness.py --part bisect --budget-s 120 --out "$WORK" $SMOKE
  stage output_code 90 env TORCH_LOGS=output_code TORCHINDUCTOR_FX_GRAPH_CACHE=0 python benchmarks/cuda_exactness.py \
    --part one --variant whole --tokens 16 $SMOKE
  gzip -f "$WORK/output_code.txt" 2>/dev/null
  pack
fi

# 3. The fuzz, the step latencies (split, CUDA's default), the CUDA tests.
stage fuzz 190 python benchmarks/cuda_fuzz.py --budget-s 140 --cases 60 --out "$WORK/cuda_fuzz.json" $SMOKE
stage fast_path 190 python benchmarks/gpu_fast_path.py --configs 15:5:15,7:5:7 --out "$WORK/gpu_fast_path.json" $SMOKE
if [ -z "$SMOKE" ]; then
  stage test_cuda 170 python -m pytest -q -rs tests/test_cuda.py -p no:cacheprovider
else
  echo "== test_cuda: not run (smoke: no GPU here)" >>"$WORK/stages.txt"
fi

# 4. If time is left: the self-tuner's cost curve of the 7B shape, its predicted step latencies against measured ones.
stage auto_tune 80 python benchmarks/gpu_auto_tune.py --out "$WORK/gpu_auto_tune.json" $SMOKE

# 5. If time is left: compiled step latency against tokens fed (the scaling study's input).
tiny="--device cpu --hidden 64 --layers 2 --heads 4 --kv-heads 4 --ffn 128 --vocab 97 --max-tokens 8 --iters 2"
stage scaling 120 python benchmarks/gpu_forward_scaling.py --cuda-graphs --max-tokens 1024 --out "$WORK/scaling" \
  $([ -n "$SMOKE" ] && echo "$tiny")
echo "done at $(($(date +%s) - START)) s" >>"$WORK/stages.txt"
pack
