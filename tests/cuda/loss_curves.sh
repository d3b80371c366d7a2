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

python3 - "$out" "$steps" "${runs[@]}" <<'PY'
import json, sys
out, steps, names = sys.argv[1], int(sys.argv[2]), sys.argv[3:]

def curve(name):
    losses = {}
    for line in open(f"{out}/{name}/metrics.jsonl"):
        row = json.loads(line)
        if not row.get("eval") and "loss" in row:
            losses[row["step"]] = row["loss"]
    return [losses[s] for s in sorted(losses)]

def smooth(values, window=20):
    return [sum(values[max(0, i - window + 1):i + 1]) / len(values[max(0, i - window + 1):i + 1])
            for i in range(len(values))]

curves = {name: curve(name) for name in names}
for name, values in curves.items():
    assert len(values) == steps, f"{name} logged {len(values)} of {steps} steps"
ok = True
def check(name, against, bound):
    global ok
    a, b = smooth(curves[name]), smooth(curves[against])
    diff = max(abs(x - y) / max(abs(y), 1e-6) for x, y in zip(a, b))
    good = diff <= bound
    ok &= good
    print(f"{name:10s} vs {against:10s} loss first {curves[name][0]:.4f} final "
          f"{curves[name][-1]:.4f} / {curves[against][-1]:.4f}  max rel diff of 20-step means "
          f"{diff:.4f}  bound {bound}  {'ok' if good else 'OFF'}")
check("cuda_bf16", "cpu_fp32", 0.10)
for name in names[2:]:
    check(name, "cuda_bf16", 0.05)

with open(f"{out}/loss_curves.csv", "w") as f:
    f.write("step," + ",".join(names) + "\n")
    for i in range(steps):
        f.write(f"{i + 1}," + ",".join(f"{curves[n][i]:.5f}" for n in names) + "\n")

# SVG: raw losses, faint, and 20-step means, solid; one colour per run.
W, H, L, R, T, B = 760, 420, 60, 150, 30, 45
lo = min(min(v) for v in curves.values()); hi = max(max(v) for v in curves.values())
lo, hi = max(0.0, lo - 0.2), hi + 0.2
x = lambda i: L + (W - L - R) * i / (steps - 1)
y = lambda v: T + (H - T - B) * (hi - v) / (hi - lo)
colours = ["#222222", "#d62728", "#1f77b4", "#2ca02c"]
svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
       f'<rect width="{W}" height="{H}" fill="white"/>',
       f'<text x="{L}" y="18">Training loss, GSM8K, small Qwen3-MoE ({steps} steps; solid: 20-step mean)</text>']
for k in range(6):
    v = lo + (hi - lo) * k / 5
    svg.append(f'<line x1="{L}" x2="{W - R}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#eee"/>')
    svg.append(f'<text x="{L - 8}" y="{y(v) + 4:.1f}" text-anchor="end">{v:.1f}</text>')
for k in range(5):
    s = round(1 + (steps - 1) * k / 4)
    svg.append(f'<text x="{x(s - 1):.1f}" y="{H - B + 18}" text-anchor="middle">{s}</text>')
svg.append(f'<text x="{(L + W - R) / 2}" y="{H - 8}" text-anchor="middle">step</text>')
for c, name in zip(colours, names):
    raw = " ".join(f"{x(i):.1f},{y(v):.1f}" for i, v in enumerate(curves[name]))
    mean = " ".join(f"{x(i):.1f},{y(v):.1f}" for i, v in enumerate(smooth(curves[name])))
    svg.append(f'<polyline points="{raw}" fill="none" stroke="{c}" stroke-opacity="0.25"/>')
    svg.append(f'<polyline points="{mean}" fill="none" stroke="{c}" stroke-width="1.8"/>')
for k, (c, name) in enumerate(zip(colours, names)):
    svg.append(f'<line x1="{W - R + 12}" x2="{W - R + 34}" y1="{T + 10 + 18 * k}" y2="{T + 10 + 18 * k}" stroke="{c}" stroke-width="2"/>')
    svg.append(f'<text x="{W - R + 40}" y="{T + 14 + 18 * k}">{name}</text>')
svg.append("</svg>")
open(f"{out}/loss_curves.svg", "w").write("\n".join(svg) + "\n")
print(f"wrote {out}/loss_curves.csv and {out}/loss_curves.svg")
sys.exit(0 if ok else 1)
PY
