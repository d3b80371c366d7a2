#!/usr/bin/env python3
"""Transformers v5 + FSDP2 baseline on N GPUs: bench/hf_baseline.py's step, sharded.

The setup NVIDIA NeMo AutoModel compared against ("native Transformers v5"): one process per
GPU under torchrun, the model built on the meta device (no memory), `fully_shard` (FSDP2,
torch.distributed.fsdp) on every decoder layer and then on the root, `to_empty` onto the GPU
and the weights initialised in place by Transformers' own `init_weights()` (normal(0,
initializer_range) for matrices, experts and router, ones for norms, RoPE buffers recomputed).

Numerics, as in bench/hf_baseline.py: bf16 parameters, so bf16 all-gathers, bf16 gradients
reduce-scattered in bf16 (no MixedPrecisionPolicy: the parameters already are bf16, which is
what the NeMo comparison ran: bf16 weights) and AdamW state in bf16 following the sharded
parameters; torch.optim.AdamW(fused=True, lr=1e-5, weight_decay=0.01); sdpa attention;
experts_implementation="grouped_mm"; use_cache=False. Step = forward + backward +
optimizer.step + zero_grad(set_to_none). Each rank draws its own random token ids (seed
1234 + rank: rank 0 sees hf_baseline.py's tokens), labels = input_ids. --routing balanced
hooks every router exactly as hf_baseline.py does (use_balanced_routing).

Measured: warm-up steps, then --steps steps; a step's time is the slowest rank's (all-reduce
MAX per step), step_s is their median. Per GPU: tps = micro_batch * seq / step_s, tflops =
tps * flops_per_token (hf_baseline.py's function, DESIGN.md's formula), peak_gib = the max
over ranks of torch.cuda.max_memory_reserved (peak_alloc_gib: of max_memory_allocated).
Rank 0 prints one JSON line: hf_baseline.py's fields plus "gpus" (world size), engine
"transformers+fsdp2".

NCCL_NVLS_ENABLE=0 (and TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1) are set
with setdefault before the process group starts: NVLink multicast stays off.

  torchrun --nproc-per-node 4 bench/hf_fsdp_baseline.py --config bench/configs/qwen3_30b_a3b.json \\
      --seq 4096 --micro-batch 1 --steps 5 [--layers L] [--routing balanced]

--device cpu (gloo, fp32 by default, tiny configs) exists only for the smoke test on machines
without a GPU; there the experts fall back to the eager implementation when grouped_mm fails
(torch builds without a CPU grouped_mm kernel), which the JSON line reports in "experts".
"""
import os

for _name, _value in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"), ("NVSHMEM_DISABLE_NVLS", "1")):
    os.environ.setdefault(_name, _value)

import argparse
import json
import statistics
import sys
import time

import torch
import torch.distributed as dist
import transformers
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from transformers import AutoConfig, AutoModelForCausalLM

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hf_baseline import flops_per_token, use_balanced_routing  # noqa: E402  (same numbers as one GPU)


def build_model(config, dtype, experts, mesh, recompute):
    """Meta-device model, FSDP2 per decoder layer then the root, materialised on mesh's device."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(
            config, dtype=dtype, attn_implementation="sdpa", experts_implementation=experts
        )
    if recompute:
        model.gradient_checkpointing_enable()
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.to_empty(device=mesh.device_type)
    # On cuda, DTensor's RNG tracker takes rank 0's seed and gives every shard its own slice of
    # one stream; on cpu it is not used, and this per-rank seed keeps the shards distinct.
    torch.manual_seed(dist.get_rank())
    model.init_weights()
    model.train()
    return model


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--layers", type=int, default=0)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (at least 1 is run)")
    parser.add_argument("--routing", choices=["real", "balanced"], default="real")
    parser.add_argument("--recompute", action="store_true", help="gradient checkpointing")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: smoke test only (gloo)")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="default: bf16 on cuda, fp32 on cpu")
    args = parser.parse_args()

    on_gpu = args.device == "cuda"
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if on_gpu else "fp32")]
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if on_gpu:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    mesh = init_device_mesh(device.type, (world,))

    config = AutoConfig.from_pretrained(args.config)
    if args.layers:
        config.num_hidden_layers = args.layers
    config.use_cache = False

    generator = torch.Generator(device="cpu").manual_seed(1234 + rank)
    ids = torch.randint(0, config.vocab_size, (args.micro_batch, args.seq), generator=generator).to(device)

    def make(experts):
        model = build_model(config, dtype, experts, mesh, args.recompute)
        if args.routing == "balanced":
            use_balanced_routing(model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.01, fused=True)
        return model, optimizer

    def step(model, optimizer):
        out = model(input_ids=ids, labels=ids, use_cache=False)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if on_gpu:
            torch.cuda.synchronize()
        return out.loss.item()

    experts = "grouped_mm"
    model, optimizer = make(experts)
    if on_gpu:
        step(model, optimizer)
    else:  # a CPU torch without a grouped_mm kernel: eager experts (every rank fails alike)
        try:
            step(model, optimizer)
        except (RuntimeError, NotImplementedError) as error:
            if rank == 0:
                print(f"grouped_mm failed on cpu ({type(error).__name__}: {error}); eager experts", file=sys.stderr)
            experts = "eager"
            del model, optimizer
            model, optimizer = make(experts)
            step(model, optimizer)
    for _ in range(args.warmup - 1):
        step(model, optimizer)

    times, losses = [], []
    for _ in range(args.steps):
        dist.barrier()
        start = time.perf_counter()
        losses.append(step(model, optimizer))
        times.append(time.perf_counter() - start)
    # (steps,) slowest rank per step; the last loss averaged over ranks; peaks maxed over ranks
    slowest = torch.tensor(times, dtype=torch.float64, device=device)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    loss = torch.tensor([losses[-1]], dtype=torch.float64, device=device)
    dist.all_reduce(loss, op=dist.ReduceOp.SUM)
    peaks = torch.tensor(
        [torch.cuda.max_memory_reserved(device), torch.cuda.max_memory_allocated(device)] if on_gpu else [0, 0],
        dtype=torch.float64, device=device,
    )
    dist.all_reduce(peaks, op=dist.ReduceOp.MAX)

    step_s = statistics.median(slowest.tolist())
    tokens = args.micro_batch * args.seq
    tps = tokens / step_s
    if rank == 0:
        print(json.dumps({
            "engine": "transformers+fsdp2", "transformers": transformers.__version__, "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(device) if on_gpu else "cpu", "gpus": world,
            "layers": config.num_hidden_layers, "seq": args.seq, "micro_batch": args.micro_batch,
            "routing": args.routing, "recompute": args.recompute, "experts": experts,
            "dtype": str(dtype).removeprefix("torch."),
            "tokens_per_step": tokens, "tps": round(tps, 1),
            "tflops": round(tps * flops_per_token(config, args.seq) / 1e12, 1),
            "peak_gib": round(peaks[0].item() / 2**30, 2) if on_gpu else None,
            "peak_alloc_gib": round(peaks[1].item() / 2**30, 2) if on_gpu else None,
            "step_s": round(step_s, 4), "loss": round(loss.item() / world, 4),
        }), flush=True)
    # Every rank's collectives (FSDP's asynchronous ones too) end, then the process leaves
    # without running torch's C++ teardown: on CPU (gloo) that teardown has aborted after the
    # result was printed ("terminate called without an active exception", twice in CI on a
    # loaded 2-core machine, with and without destroy_process_group after a barrier).
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
