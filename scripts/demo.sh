#!/usr/bin/env bash
# The demo (the README's first command): installs the build dependencies, builds the moetune
# command (CPU only, no tests), trains the tiny MoE of recipes/demo.yaml on multi-digit
# addition (random init -> a model that adds), then asks the trained model held-out
# questions through `moetune generate` and prints its answers next to the expected ones.
#   ./scripts/demo.sh [OUTPUT_DIR]        (default: out/demo)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:-$root/out/demo}"
started=$(date +%s)

"$root/scripts/setup.sh"
build="$root/build-demo"
echo "== building moetune (CPU) in $build"
cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=Release -DMOETUNE_CUDA=OFF -DMOETUNE_TESTS=OFF >/dev/null
cmake --build "$build" --target moetune -j "$(nproc)" | grep -E "error|warning|Built target moetune" || true
moetune="$build/moetune"
[ -x "$moetune" ] || { echo "demo: the build failed" >&2; exit 1; }
built=$(date +%s)

echo "== training (recipes/demo.yaml -> $out)"
rm -rf "$out"
"$moetune" train "$root/recipes/demo.yaml" --output-dir "$out"
trained=$(date +%s)

# First and last logged training loss.
first_loss=$(grep -v '"eval":true' "$out/metrics.jsonl" | head -1 | sed -E 's/.*"loss":([^,}]*).*/\1/')
last_loss=$(grep -v '"eval":true' "$out/metrics.jsonl" | tail -1 | sed -E 's/.*"loss":([^,}]*).*/\1/')

echo "== held-out questions (moetune generate --chat on $out/hf)"
asked=0
correct=0
printf '%-12s %-10s %-10s\n' "prompt" "answer" "expected"
while IFS= read -r line && [ "$asked" -lt 12 ]; do
  question=$(sed -E 's/.*"role": "user", "content": "([^"]*)".*/\1/' <<<"$line")
  expected=$(sed -E 's/.*"role": "assistant", "content": "([^"]*)".*/\1/' <<<"$line")
  answer=$("$moetune" generate --model "$out/hf" --chat --prompt "$question" --max-new-tokens 8)
  mark="wrong"
  if [ "$answer" = "$expected" ]; then mark="ok"; correct=$((correct + 1)); fi
  printf '%-12s %-10s %-10s %s\n' "$question" "$answer" "$expected" "$mark"
  asked=$((asked + 1))
done <"$root/recipes/demo/eval.jsonl"

finished=$(date +%s)
echo "== summary"
echo "loss: $first_loss (first logged) -> $last_loss (last logged)"
echo "held-out answers correct: $correct / $asked"
echo "time: build $((built - started))s, training $((trained - built))s, total $((finished - started))s"
echo "outputs: $out/hf (HF folder), $out/metrics.jsonl, $out/loss.svg, $out/checkpoints/"
