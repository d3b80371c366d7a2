#!/usr/bin/env bash
# Runs on the GPU machine from a folder holding the built binaries (moetune, moetune_gpu_tests):
# the GPU op tests, the Transformers parity fixtures through `moetune forward-backward
# --device cuda` (fp32: 1e-4; bf16: reported), and optionally the benchmark side by side.
#   tests/cuda/run_on_gpu.sh BIN_DIR OUT_DIR [bench micro-batches...]
set -uo pipefail
bin="$1"; out="$2"; shift 2
root="$(cd "$(dirname "$0")/../.." && pwd)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"

echo "== GPU op tests"
timeout 300 "$bin/moetune_gpu_tests" 2>&1 | tee "$out/gpu_tests.log" | grep -E "^\[  (PASSED|FAILED) |FAILED|Failure|error" | head -40

echo "== parity fixtures on cuda"
for fixture in "$root"/tests/fixtures/parity/*/; do
  name="$(basename "$fixture")"
  adamw="$(python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(','.join(f'{k}={v}' for k,v in d.items() if k in ('lr','beta1','beta2','eps','weight_decay')))" "$fixture/adamw.json")"
  for dtype in fp32 bf16; do
    tolerance=1e-4; [ "$dtype" = bf16 ] && tolerance=1
    if timeout 120 "$bin/moetune" forward-backward --model "$fixture" --batch "$fixture/batch.safetensors" \
         --out "/tmp/parity_${name}_$dtype.safetensors" --device cuda --dtype "$dtype" --adamw "$adamw" \
         >"/tmp/fb.log" 2>&1; then
      echo "$name $dtype: $(python3 "$root/tests/cuda/check_parity.py" "$fixture/expected.safetensors" \
           "/tmp/parity_${name}_$dtype.safetensors" "$tolerance" | tr '\n' ' ')"
    else
      echo "$name $dtype: forward-backward FAILED: $(tail -2 /tmp/fb.log | tr '\n' ' ')"
    fi
  done
done 2>&1 | tee "$out/parity.log"

config=/work/shared/data/qwen3/Qwen--Qwen3-30B-A3B_config.json
[ -f "$config" ] || config="$root/bench/configs/qwen3_30b_a3b.json"
for mb in "$@"; do
  echo "== bench micro-batch $mb"
  timeout 200 "$bin/moetune" bench --config "$config" --layers 8 --seq 4096 --micro-batch "$mb" --steps 5 \
    2>&1 | tee -a "$out/bench.jsonl"
  PYTHONUNBUFFERED=1 timeout 200 python3 "$root/bench/hf_baseline.py" --config "$config" --layers 8 --seq 4096 \
    --micro-batch "$mb" --steps 5 2>&1 | grep -v Warning | tail -3 | tee -a "$out/bench.jsonl"
done
