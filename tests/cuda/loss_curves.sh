#!/usr/bin/env bash
# Loss curves of a real fine-tune on GPUs against the fp32 CPU reference (issues #6 and #7):
# tests/cuda/loss_curve/recipe.yaml (small Qwen3-MoE, GSM8K worked answers, Llama 2
# tokenizer), STEPS steps (default 200), the same data order in every run:
#   cpu_fp32       the reference (OpenBLAS threads: CPU_THREADS, default 8)
#   cuda_bf16      one GPU, bf16 weights, fp32 master weights and optimizer state
#   dp2_bf16       2 GPUs, data parallel, ZeRO 1           (when N >= 2)
#   ep2_bf16       2 GPUs, expert parallel (4 experts each) (when N >= 2)
# Checks: cuda_bf16's 20-step mean loss within 10% of the CPU's at every step, and the
# multi-GPU runs' within 5% of cuda_bf16's (bf16 rounding only: same data, same
# model). Writes OUT/loss_curves.csv and OUT/loss_curves.svg (all curves; the SVG goes to
# docs/img/ for docs/BENCHMARKS.md).
#   tests/cuda/loss_curves.sh BIN_DIR OUT_DIR [N_GPUS] [STEPS] [SHARED_DATA_DIR]
# SHARED_DATA_DIR defaults to ../shared/data beside the repository.
set -euo pipefail
bin="$(cd "$1" && pwd)"; out="$2"; n="${3:-1}"; steps="${4:-200}"
root="$(cd "$(dirname "$0")/../.." && pwd)"
data="${5:-$root/../shared/data}"
mkdir -p "$out"; out="$(cd "$out" && pwd)"
export NCCL_NVLS_ENABLE=0

# The recipe folder: recipe, config, tokenizer, dataset.
work="$out/recipe"
mkdir -p "$work/tokenizer"
cp "$root"/tests/cuda/loss_curve/{recipe.yaml,config.json} "$work/"
xz -dc "$data/llama2/tokenizer.json.xz" > "$work/tokenizer/tokenizer.json"
cp "$data"/llama2/{tokenizer_config.json,special_tokens_map.json} "$work/tokenizer/"
cp "$data/gsm8k/test.jsonl" "$work/gsm8k.jsonl"

common=(--training.max_steps="$steps" --training.eval_every=$((steps / 2)))
train() {  # name, launcher args (or -), overrides...
  local name="$1" nproc="$2"; shift 2
  local start=$SECONDS cmd=("$bin/moetune")
  [ "$nproc" != 1 ] && cmd+=(launch --nproc-per-node "$nproc" --)
  echo "== $name"
  "${cmd[@]}" train "$work/recipe.yaml" "${common[@]}" -o "$out/$name" "$@" > "$out/$name.log" 2>&1 \
    || { echo "$name FAILED:"; tail -20 "$out/$name.log"; exit 1; }
  echo "   $((SECONDS - start)) s; $(grep -E "eval at step" "$out/$name.log" | tail -1)"
}

if [ ! -f "$out/cpu_fp32/metrics.jsonl" ]; then
  OPENBLAS_NUM_THREADS="${CPU_THREADS:-8}" train cpu_fp32 1 --parallel.device=cpu --model.dtype=fp32
fi
train cuda_bf16 1 --parallel.device=cuda --model.dtype=bf16
runs=(cpu_fp32 cuda_bf16)
if [ "$n" -ge 2 ]; then
  train dp2_bf16 2 --parallel.device=cuda --model.dtype=bf16 --parallel.zero_stage=1
  train ep2_bf16 2 --parallel.device=cuda --model.dtype=bf16 --parallel.expert_parallel=2
  runs+=(dp2_bf16 ep2_bf16)
fi

# cuda_bf16 against the CPU, the multi-GPU runs against cuda_bf16 (tests/cuda/curves.py).
checks=(cuda_bf16,cpu_fp32,mean,0.10)
for name in "${runs[@]:2}"; do checks+=("$name,cuda_bf16,mean,0.05"); done
status=0
python3 "$root/tests/cuda/curves.py" check "$out" "$steps" "${checks[@]}" || status=1
python3 "$root/tests/cuda/curves.py" plot "$out" "$steps" \
  "Training loss, GSM8K, small Qwen3-MoE" "${runs[@]}"
exit $status
