#!/usr/bin/env bash
# SM partition sweep for the optimizer in the backward (issue #6; InBackwardOptions::optimizer_sms):
#   bench/run_optimizer_sms_sweep.sh BIN_DIR OUT_DIR ["SMS"] ["MICRO_BATCHES"] ["ROUTINGS"]
#   e.g. bench/run_optimizer_sms_sweep.sh build-cuda out "8 16 24 32 48" "1 4" "real balanced"
# First the partition's own tests and microbenchmark (moetune_gpu_tests --gtest_filter
# '*SmPartition*', DISABLED_OverlapBench included: AdamW on k SMs alone, a grouped GEMM on the
# rest alone, both at once), then on the 8-layer Qwen3-30B-A3B proxy (sequence 4096), for each
# micro batch and routing: moetune bench with the optimizer in the backward inline, overlapped
# on a shared side stream, and overlapped with the updates on K SMs of their own for each K.
# JSON lines to OUT_DIR/bench.jsonl ("optimizer_sms": the SMs the partition got), the per-op
# tables to OUT_DIR/bench.log, the partition's output to OUT_DIR/partition.log.
set -uo pipefail
bin="$(cd "$1" && pwd)"; out="$2"; sms="${3:-8 16 24 32 48}"; mbs="${4:-1}"
routings="${5:-real}"
mkdir -p "$out"
tests="$bin/moetune_gpu_tests"; [ -x "$tests" ] || tests="$bin/tests/moetune_gpu_tests"
timeout 180 "$tests" --gtest_filter='*SmPartition*' --gtest_also_run_disabled_tests \
  2>&1 | tee "$out/partition.log" | grep -E "sm partition|OK \]|FAILED|Failure"
for mb in $mbs; do
  for routing in $routings; do
    C=(--config bench/configs/qwen3_30b_a3b.json --layers 8 --seq 4096 --micro-batch "$mb"
       --steps 5 --routing "$routing" --optimizer-in-backward)
    modes=("--no-overlap-optimizer" "--overlap-optimizer")
    for k in $sms; do modes+=("--overlap-optimizer --optimizer-sms $k"); done
    for mode in "${modes[@]}"; do
      echo "== moetune mb $mb $routing $mode" | tee -a "$out/bench.log"
      # shellcheck disable=SC2086
      timeout 300 "$bin/moetune" bench "${C[@]}" $mode 2>&1 | tee -a "$out/bench.log" \
        | grep '^{' | tee -a "$out/bench.jsonl"
    done
  done
done
