#!/usr/bin/env python3
"""Transformers v5 baseline for `moetune bench`: the same training step, the same JSON line.

A random-init model of the config (cut to --layers), bf16 weights, sdpa attention,
experts_implementation="grouped_mm", use_cache=False, torch.optim.AdamW(fused=True, lr=1e-5,
weight_decay=0.01; its state follows the bf16 parameters), random token ids with
labels = input_ids. Step = forward + backward + optimizer.step + zero_grad(set_to_none).
Warm-up steps, then the median of --steps synchronised steps. peak_gib is
torch.cuda.max_memory_reserved (the most device memory the caching allocator held).
tflops uses DESIGN.md's formula (the same function as moetune's bench).

  python3 bench/hf_baseline.py --config CONFIG.json --layers 8 --seq 4096 --micro-batch 1
"""
import argparse
import json
import statistics
import time

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM


def flops_per_token(c, seq):
    hidden = c.hidden_size
    head_dim = getattr(c, "head_dim", None) or hidden // c.num_attention_heads
    q = c.num_attention_heads * head_dim
    kv = c.num_key_value_heads * head_dim
    matrices = 0
    mlp_only = set(getattr(c, "mlp_only_layers", []) or [])
    step = getattr(c, "decoder_sparse_step", 1) or 1
    experts = getattr(c, "num_experts", 0) or getattr(c, "num_local_experts", 0)
    for layer in range(c.num_hidden_layers):
        matrices += hidden * q * 2 + hidden * kv * 2
        if experts and layer not in mlp_only and (layer + 1) % step == 0:
            width = getattr(c, "moe_intermediate_size", None) or c.intermediate_size
            matrices += experts * hidden + c.num_experts_per_tok * 3 * hidden * width
        else:
            matrices += 3 * hidden * c.intermediate_size
    matrices += c.vocab_size * hidden
    return 6 * matrices + 6 * c.num_hidden_layers * seq * q


def use_balanced_routing(model):
    """Every expert gets the same number of slots: token n's choice j goes to expert (n*k + j) % E
    (the router's top-k weights kept). A forward hook on every *TopKRouter module."""
    def balanced(module, inputs, output):
        logits, scores, indices = output
        n, k = indices.shape
        slots = torch.arange(n * k, device=indices.device).view(n, k)
        return logits, scores, (slots % module.num_experts).to(indices.dtype)
    for module in model.modules():
        if type(module).__name__.endswith("TopKRouter"):
            module.register_forward_hook(balanced)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--layers", type=int, default=0)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--routing", choices=["real", "balanced"], default="real")
    parser.add_argument("--recompute", action="store_true", help="gradient checkpointing")
    args = parser.parse_args()

    config = AutoConfig.from_pretrained(args.config)
    if args.layers:
        config.num_hidden_layers = args.layers
    config.use_cache = False
    torch.manual_seed(0)
    device = torch.device("cuda")
    with device:
        model = AutoModelForCausalLM.from_config(
            config, dtype=torch.bfloat16, attn_implementation="sdpa", experts_implementation="grouped_mm"
        )
    model.train()
    if args.recompute:
        model.gradient_checkpointing_enable()
    if args.routing == "balanced":
        use_balanced_routing(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.01, fused=True)

    generator = torch.Generator(device="cpu").manual_seed(1234)
    ids = torch.randint(0, config.vocab_size, (args.micro_batch, args.seq), generator=generator).to(device)

    def step():
        out = model(input_ids=ids, labels=ids, use_cache=False)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        return out.loss.item()

    for _ in range(args.warmup):
        step()
    times = []
    loss = 0.0
    for _ in range(args.steps):
        start = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    tokens = args.micro_batch * args.seq
    tps = tokens / step_s
    print(json.dumps({
        "engine": "transformers", "transformers": transformers.__version__, "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(), "layers": config.num_hidden_layers, "seq": args.seq,
        "micro_batch": args.micro_batch, "routing": args.routing, "recompute": args.recompute,
        "tokens_per_step": tokens, "tps": round(tps, 1),
        "tflops": round(tps * flops_per_token(config, args.seq) / 1e12, 1),
        "peak_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2), "step_s": round(step_s, 4),
        "loss": round(loss, 4),
    }), flush=True)


if __name__ == "__main__":
    main()
