#!/usr/bin/env python3
"""Compares two `moetune train` output folders (e.g. 1 GPU vs N GPUs data-parallel):
the logged training losses step by step and the final hf/ weights tensor by tensor.
Prints the largest relative differences; exits 1 when one exceeds --tolerance.

    python3 scripts/compare_runs.py /tmp/dp1 /tmp/dp2 --tolerance 1e-4
"""
import argparse
import json
import pathlib
import sys

import numpy as np
from safetensors.numpy import load_file


def losses(folder):
    rows = [json.loads(line) for line in open(folder / "metrics.jsonl") if line.strip()]
    return [row["loss"] for row in rows if not row.get("eval")]


def weights(folder):
    tensors = {}
    for file in sorted((folder / "hf").glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", type=pathlib.Path)
    parser.add_argument("b", type=pathlib.Path)
    parser.add_argument("--tolerance", type=float, default=1e-4)
    args = parser.parse_args()
    worst = 0.0
    la, lb = losses(args.a), losses(args.b)
    if len(la) != len(lb):
        sys.exit(f"{len(la)} vs {len(lb)} logged losses")
    for step, (x, y) in enumerate(zip(la, lb), 1):
        rel = abs(x - y) / max(abs(y), 1e-12)
        worst = max(worst, rel)
        print(f"step {step}: loss {x:.7f} vs {y:.7f} (rel {rel:.2e})")
    wa, wb = weights(args.a), weights(args.b)
    if wa.keys() != wb.keys():
        sys.exit("the hf/ folders hold different tensors")
    rels = []
    for name in sorted(wa):
        x, y = wa[name].astype(np.float64), wb[name].astype(np.float64)
        rel = float(np.max(np.abs(x - y)) / max(float(np.max(np.abs(y))), 1e-12))
        rels.append((rel, name))
    rels.sort(reverse=True)
    for rel, name in rels[:5]:
        print(f"weights {name}: max rel diff {rel:.2e}")
    worst = max(worst, rels[0][0] if rels else 0.0)
    print(f"worst relative difference {worst:.2e} (tolerance {args.tolerance:.0e})")
    sys.exit(0 if worst <= args.tolerance else 1)


if __name__ == "__main__":
    main()
