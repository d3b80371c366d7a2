#!/usr/bin/env python3
"""Builds bench/results/latest.json from the JSON lines of one side-by-side run.

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
    if "phases_s" in r:
        entry["phases_s"] = r["phases_s"]
    runs.append(entry)
print(json.dumps({"gpu": gpu, "date": sys.argv[2], "runs": runs}, indent=1))
