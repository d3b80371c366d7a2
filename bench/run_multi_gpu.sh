#!/usr/bin/env bash
# Multi-GPU benchmark, moetune and Transformers v5 + FSDP2 in the same call (per-GPU numbers):
#   bench/run_multi_gpu.sh BIN_DIR OUT_DIR GPUS LAYERS MICRO_BATCH [moetune bench flags...]
# Runs moetune with expert parallelism over all GPUs (ZeRO 1 for the replicated parameters)
# and bench/hf_fsdp_baseline.py, each with real and balanced routing (ROUTINGS="real" for one); appends the JSON lines
# to OUT_DIR/bench_multi.jsonl (rank 0's line) and logs to OUT_DIR/bench_multi.log.
set -uo pipefail
bin="$(cd "$1" && pwd)"; out="$2"; gpus="$3"; layers="$4"; mb="$5"; shift 5
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0
C=(--config bench/configs/qwen3_30b_a3b.json --layers "$layers" --seq 4096 --micro-batch "$mb" --steps 5)
for routing in ${ROUTINGS:-real balanced}; do
  timeout 300 "$bin/moetune" launch --nproc-per-node "$gpus" -- bench "${C[@]}" --routing "$routing" \
    --expert-parallel "$gpus" --zero-stage 1 "$@" 2>&1 | tee -a "$out/bench_multi.log" \
    | grep '^\[rank 0\] {' | sed 's/^\[rank 0\] //' | tee -a "$out/bench_multi.jsonl"
  PYTHONUNBUFFERED=1 timeout 300 torchrun --standalone --nproc-per-node "$gpus" bench/hf_fsdp_baseline.py \
    "${C[@]}" --routing "$routing" 2>&1 | tee -a "$out/bench_multi.log" | grep '^{' | tee -a "$out/bench_multi.jsonl"
done
