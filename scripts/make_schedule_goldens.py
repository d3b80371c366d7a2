#!/usr/bin/env python3
"""Writes tests/data/schedule_goldens.json: learning rates from Transformers' own schedulers
(get_constant_schedule_with_warmup, get_linear_schedule_with_warmup,
get_cosine_schedule_with_warmup, get_cosine_with_min_lr_schedule_with_warmup) driven through
a torch optimizer, at every step of a few short runs. tests/test_schedule.cpp compares
moetune's schedules against them. Needs torch and transformers."""
import json
from pathlib import Path

import torch
from transformers import optimization as hf

BASE_LR = 2e-3
CASES = [
    {"type": "constant", "warmup_steps": 5, "total_steps": 30, "min_lr_ratio": 0.0},
    {"type": "constant", "warmup_steps": 0, "total_steps": 10, "min_lr_ratio": 0.0},
    {"type": "linear", "warmup_steps": 7, "total_steps": 40, "min_lr_ratio": 0.0},
    {"type": "linear", "warmup_steps": 0, "total_steps": 25, "min_lr_ratio": 0.0},
    {"type": "cosine", "warmup_steps": 10, "total_steps": 50, "min_lr_ratio": 0.0},
    {"type": "cosine", "warmup_steps": 0, "total_steps": 33, "min_lr_ratio": 0.0},
    {"type": "cosine", "warmup_steps": 4, "total_steps": 37, "min_lr_ratio": 0.1},
]


def make(case, optimizer):
    warmup, total = case["warmup_steps"], case["total_steps"]
    if case["type"] == "constant":
        return hf.get_constant_schedule_with_warmup(optimizer, warmup)
    if case["type"] == "linear":
        return hf.get_linear_schedule_with_warmup(optimizer, warmup, total)
    if case["min_lr_ratio"] > 0:
        return hf.get_cosine_with_min_lr_schedule_with_warmup(optimizer, warmup, total,
                                                               min_lr_rate=case["min_lr_ratio"])
    return hf.get_cosine_schedule_with_warmup(optimizer, warmup, total)


def main():
    out = []
    for case in CASES:
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=BASE_LR)
        scheduler = make(case, optimizer)
        lrs = []
        for _ in range(case["total_steps"]):
            lrs.append(optimizer.param_groups[0]["lr"])  # the lr of this update
            optimizer.step()
            scheduler.step()
        out.append(dict(case, base_lr=BASE_LR, lrs=lrs))
    path = Path(__file__).resolve().parent.parent / "tests" / "data" / "schedule_goldens.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
