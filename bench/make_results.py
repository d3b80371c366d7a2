#!/usr/bin/env python3
"""Builds bench/results/latest.json from the JSON lines of one side-by-side run.

Lines of several GPUs (bench/hf_fsdp_baseline.py, engine "transformers+fsdp2") carry "gpus";
their entries keep it (tps, tflops and peak_gib are then per GPU). One-GPU lines have none.

  python3 bench/make_results.py BENCH.jsonl DATE > bench/results/latest.json
"""
import json
import sys

runs, gpu = [], None
for line in open(sys.argv[1]):
    line = line.strip()
    if not line.startswith("{"):
        continue
    r = json.loads(line)
    gpu = gpu or r.get("gpu")
    entry = {k: r[k] for k in ("engine", "layers", "seq", "micro_batch", "routing", "tps", "tflops", "peak_gib", "step_s")}
    entry["recompute"] = r.get("recompute", False)
    for optional in ("gpus", "expert_parallel", "zero_stage", "overlap_comm", "optimizer_in_backward",
                     "fused_expert_update", "plan_gib", "peak_alloc_gib", "phases_s", "overlap_optimizer",
                     "grad_arena_gib", "side_stream_s", "ops_ms", "grouped_gemm_tflops", "ep_chunks"):
        if optional in r:
            entry[optional] = r[optional]
    runs.append(entry)
print(json.dumps({"gpu": gpu, "date": sys.argv[2], "runs": runs}, indent=1))
