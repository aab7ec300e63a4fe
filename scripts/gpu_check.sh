#!/usr/bin/env bash
# A short, prepared GPU check: environment, a CUDA training run, and the data-path benchmark.
#
#   bash scripts/gpu_check.sh            # on a CUDA machine (bf16 autocast, pinned memory)
#   bash scripts/gpu_check.sh --dry      # the same steps on the CPU at toy size (CI runs this)
#
# Prints samples/s of the run and bench_train.py's end-to-end / compute-only ratio. Outputs go to
# ${OUT:-$(mktemp -d)}; set UNIREC_CACHE to reuse prepared data.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-$(mktemp -d)}
cache=${UNIREC_CACHE:-$out/cache}

if [[ "${1:-}" == "--dry" ]]; then
  device=cpu
  train_args=(debug=toy trainer.max_steps=10)
  bench_args=(--steps 3 --repeats 1 --loader-batches 4 debug=toy)
else
  device=cuda
  train_args=(trainer.max_steps=600 loader.batch_size=16384 trainer.eval_every=300)
  bench_args=(--steps 50 --repeats 3 loader.batch_size=4096)
fi

python - "$device" <<'PY'
import sys, torch
want = sys.argv[1]
print(f"torch {torch.__version__}, cuda available: {torch.cuda.is_available()}")
if want == "cuda":
    assert torch.cuda.is_available(), "no CUDA device visible: run with --dry on a CPU machine"
    print("device:", torch.cuda.get_device_name(0), "bf16:", torch.cuda.is_bf16_supported())
PY

python -m unirec.train "${train_args[@]}" trainer.device="$device" trainer.progress=false \
  data.cache_dir="$cache" hydra.run.dir="$out/run"
python - "$out/run/metrics.json" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
print(f"training: {m['samples_per_s']:,.0f} samples/s over {m['steps']} steps, peak RSS {m['peak_rss_mb']} MB")
PY
python scripts/bench_train.py "${bench_args[@]}" trainer.device="$device" data.cache_dir="$cache"
# The device-resident data path (and torch.compile on the GPU): the end-to-end figure to set beside the above.
extra=(); [[ "$device" == cuda ]] && extra=(trainer.compile=true)
python scripts/bench_train.py "${bench_args[@]}" trainer.device="$device" data.cache_dir="$cache" \
  loader.resident=true "${extra[@]}"
echo "gpu_check done: outputs in $out"
