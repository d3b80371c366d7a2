#!/usr/bin/env bash
# One-GPU benchmark, moetune and Transformers v5 in the same call (issue #6's table):
#   bench/run_one_gpu.sh BIN_DIR OUT_DIR "MICRO_BATCHES" "ROUTINGS" [LAYERS]
#   e.g. bench/run_one_gpu.sh build-cuda out "1 4" "real balanced"
# For each micro batch and routing, on the Qwen3-30B-A3B proxy (LAYERS layers, default 8,
# sequence 4096): moetune bench with the optimizer after the backward, in the backward
# inline (--no-overlap-optimizer) and in the backward overlapped on a side stream, then
# bench/hf_baseline.py. JSON lines go to OUT_DIR/bench.jsonl, everything to OUT_DIR/bench.log
# (moetune's per-op table included); bench/make_results.py turns the lines into latest.json.
set -uo pipefail
bin="$(cd "$1" && pwd)"; out="$2"; mbs="$3"; routings="$4"; layers="${5:-8}"
mkdir -p "$out"
for mb in $mbs; do
  for routing in $routings; do
    C=(--config bench/configs/qwen3_30b_a3b.json --layers "$layers" --seq 4096 --micro-batch "$mb"
       --steps 5 --routing "$routing")
    for mode in "" "--optimizer-in-backward --no-overlap-optimizer" "--optimizer-in-backward"; do
      echo "== moetune mb $mb $routing $mode" | tee -a "$out/bench.log"
      # shellcheck disable=SC2086
      timeout 300 "$bin/moetune" bench "${C[@]}" $mode 2>&1 | tee -a "$out/bench.log" \
        | grep '^{' | tee -a "$out/bench.jsonl"
    done
    echo "== transformers mb $mb $routing" | tee -a "$out/bench.log"
    PYTHONUNBUFFERED=1 timeout 400 python3 bench/hf_baseline.py "${C[@]}" 2>&1 \
      | tee -a "$out/bench.log" | grep '^{' | tee -a "$out/bench.jsonl"
  done
done
