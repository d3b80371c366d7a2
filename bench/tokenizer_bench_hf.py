#!/usr/bin/env python3
"""Tokenizer speed, moetune vs Hugging Face tokenizers, single-threaded, same texts.

Writes the bench corpus (GSM8K train question+answer, Alpaca demo records, ShareGPT and
Glaive conversations from ../shared/data) to a JSONL file, then for each tokenizer measures
HF `tokenizers` encode (one text at a time) and encode_batch (TOKENIZERS_PARALLELISM=false,
so one thread), and runs `moetune bench-tokenizer` on the same file. Best of --repeat passes.

Usage: python3 bench/tokenizer_bench_hf.py [--moetune build/moetune] [--repeat 3] [names...]
"""
import argparse
import json
import lzma
import os
import subprocess
import sys
import tempfile
import time

os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["RAYON_NUM_THREADS"] = "1"
from tokenizers import Tokenizer  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("MOETUNE_SHARED_DATA", os.path.join(ROOT, "..", "shared", "data"))
FOLDERS = {"qwen3": "qwen3", "llama3": "llama3", "mixtral": "mixtral", "gpt2": "gpt2/kv260-gptq"}


def corpus():
    texts = []
    with lzma.open(os.path.join(SHARED, "gsm8k", "train.jsonl.xz"), "rt", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            texts.append(row["question"] + "\n" + row["answer"])
    with open(os.path.join(SHARED, "alpaca", "alpaca_en_demo.json"), encoding="utf-8") as f:
        for row in json.load(f):
            texts.append("\n\n".join(x for x in (row["instruction"], row["input"], row["output"]) if x))
    with open(os.path.join(SHARED, "glaive-toolcall", "glaive_toolcall_en_demo.json"), encoding="utf-8") as f:
        for row in json.load(f):
            texts.append(row.get("tools", "") + "\n" + "\n".join(t["value"] for t in row["conversations"]))
    return texts


def folder_with_json(name, tmp):
    folder = os.path.join(SHARED, FOLDERS[name])
    if os.path.exists(os.path.join(folder, "tokenizer.json")):
        return folder
    out = os.path.join(tmp, name)
    os.makedirs(out, exist_ok=True)
    with lzma.open(os.path.join(folder, "tokenizer.json.xz"), "rb") as f, \
            open(os.path.join(out, "tokenizer.json"), "wb") as g:
        g.write(f.read())
    return out


def best_of(repeat, fn):
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--moetune", default=os.path.join(ROOT, "build", "moetune"))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("names", nargs="*", default=list(FOLDERS))
    args = parser.parse_args()
    texts = corpus()
    nbytes = sum(len(t.encode("utf-8")) for t in texts)
    with tempfile.TemporaryDirectory() as tmp:
        input_path = os.path.join(tmp, "bench.jsonl")
        with open(input_path, "w", encoding="utf-8") as f:
            for t in texts:
                f.write(json.dumps({"text": t}, ensure_ascii=False) + "\n")
        for name in args.names:
            folder = folder_with_json(name, tmp)
            tok = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
            tok.no_truncation()
            tok.no_padding()
            ntokens = sum(len(tok.encode(t, add_special_tokens=False).ids) for t in texts)  # warm-up
            single = best_of(args.repeat, lambda: [tok.encode(t, add_special_tokens=False) for t in texts])
            batch = best_of(args.repeat, lambda: tok.encode_batch(texts, add_special_tokens=False))
            ours = json.loads(subprocess.run(
                [args.moetune, "bench-tokenizer", "--tokenizer", folder, "--input", input_path,
                 "--repeat", str(args.repeat)], check=True, capture_output=True, text=True).stdout)
            if ours["tokens"] != ntokens:
                print(f"{name}: token counts differ: moetune {ours['tokens']} vs HF {ntokens}", file=sys.stderr)
            print(f"| {name} | {len(texts)} texts, {nbytes / 1e6:.2f} MB, {ntokens} tokens "
                  f"| {nbytes / single / 1e6:.2f} | {nbytes / batch / 1e6:.2f} "
                  f"| {ours['MB_per_s']:.2f} | {ours['MB_per_s'] / (nbytes / single / 1e6):.2f}x |", flush=True)


if __name__ == "__main__":
    main()
