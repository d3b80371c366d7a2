#!/usr/bin/env python3
"""Writes the tokenizer goldens (tests/goldens/tokenizer/) with Hugging Face `tokenizers`
itself, for every tokenizer.json under ../shared/data (.xz ones decompressed to a temp dir).

  corpus.jsonl        one {"text": ...} per line: dataset samples + edge cases (shared)
  <name>.jsonl        per tokenizer: first line {"tokenizer": "<dir under shared/data>"}, then
                      one line per corpus text, then the tokenizer's own fuzz strings:
                      {"i": corpus index} or {"text": fuzz string},
                      "ids": encode(text, add_special_tokens=False),
                      "special": [prefix, suffix] so that encode(text, True) == prefix+ids+suffix
                                 (or "ids_special": the full list when it has no such shape),
                      "decoded": decode(ids) (omitted when equal to the text),
                      "decoded_skip": decode(encode(text, True), skip_special_tokens=True)
                                 (omitted when equal to "decoded"/the text).
Usage: python3 scripts/make_tokenizer_goldens.py [--shared ../shared/data] [--fuzz 300]
Truncation/padding stored in a tokenizer.json are switched off (Transformers does the same).
"""
import argparse
import json
import lzma
import os
import random
import tempfile
import unicodedata

from tokenizers import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "goldens", "tokenizer")

TOKENIZERS = {  # golden name -> folder under shared/data holding tokenizer.json(.xz)
    "qwen3": "qwen3",
    "qwen2.5": "qwen2.5",
    "llama3": "llama3",
    "mixtral": "mixtral",
    "llama2": "llama2",
    "phi-3-mini": "phi-3-mini",
    "gpt2": "gpt2/kv260-gptq",
}

MAX_SAMPLE_CHARS = 1200

METASPACE = "\u2581"
# Variants: a shared tokenizer with other components swapped in, to cover the layouts of
# models not in shared/data (Metaspace pre-tokenizers of Mistral v0.3/Llama-2-style files,
# added-token flags, other normalizers/pre-tokenizers/post-processors). The golden's header
# holds the patch; the test applies it to the base tokenizer.json the same way.
VARIANTS = {
    "mixtral-metaspace-first": ("mixtral", {
        "normalizer": None,
        "pre_tokenizer": {"type": "Metaspace", "replacement": METASPACE, "prepend_scheme": "first", "split": False},
        "decoder": {"type": "Metaspace", "replacement": METASPACE, "prepend_scheme": "first", "split": False},
    }, []),
    "phi3-metaspace-always-split": ("phi-3-mini", {
        "normalizer": None,
        "pre_tokenizer": {"type": "Metaspace", "replacement": METASPACE, "prepend_scheme": "always", "split": True},
        "decoder": {"type": "Metaspace", "replacement": METASPACE, "prepend_scheme": "always", "split": True},
    }, [{"content": "<|special_x|>", "lstrip": True, "rstrip": True, "special": True, "normalized": False}]),
    "llama3-added-flags-nfkc": ("llama3", {
        "normalizer": {"type": "NFKC"},
        "post_processor": {"type": "TemplateProcessing",
                           "single": [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}},
                                      {"Sequence": {"id": "A", "type_id": 0}},
                                      {"SpecialToken": {"id": "<|end_of_text|>", "type_id": 0}}],
                           "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                           "special_tokens": {
                               "<|begin_of_text|>": {"id": "<|begin_of_text|>", "ids": [128000], "tokens": ["<|begin_of_text|>"]},
                               "<|end_of_text|>": {"id": "<|end_of_text|>", "ids": [128001], "tokens": ["<|end_of_text|>"]}}},
    }, [{"content": "<mask>", "lstrip": True, "special": True, "normalized": False},
        {"content": "[R]", "rstrip": True, "special": False, "normalized": False},
        {"content": "hello", "single_word": True, "special": False, "normalized": True},
        {"content": "\uff46\uff55\uff4c\uff4c", "special": False, "normalized": True},
        {"content": "wide word", "single_word": True, "lstrip": True, "rstrip": True, "special": True, "normalized": True}]),
    "qwen3-digits-nfkd-roberta": ("qwen3", {
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "NFKD"}, {"type": "Strip", "strip_left": True, "strip_right": True},
            {"type": "Replace", "pattern": {"Regex": "\\s+"}, "content": " "}]},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {"type": "Split", "pattern": {"String": "."}, "behavior": "MergedWithPrevious", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}]},
        "post_processor": {"type": "RobertaProcessing", "sep": ["<|im_end|>", 151645], "cls": ["<|im_start|>", 151644],
                           "trim_offsets": True, "add_prefix_space": True},
    }, []),
    "gpt2-whitespace-split-bert": ("gpt2/kv260-gptq", {
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Whitespace"},
            {"type": "Split", "pattern": {"Regex": "[aeiou]+"}, "behavior": "MergedWithNext", "invert": False},
            {"type": "Split", "pattern": {"Regex": "[xyz]"}, "behavior": "Contiguous", "invert": True},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
        "post_processor": {"type": "BertProcessing", "sep": ["<|endoftext|>", 50256], "cls": ["<|endoftext|>", 50256]},
        "decoder": {"type": "Sequence", "decoders": [{"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
                                                       {"type": "Replace", "pattern": {"String": "e"}, "content": "E"}]},
    }, [{"content": "<sep>", "special": True, "normalized": False, "single_word": True}]),
}


def clip(text):
    return text[:MAX_SAMPLE_CHARS]


def dataset_samples(shared):
    samples = []
    rng = random.Random(1234)
    with open(os.path.join(shared, "gsm8k", "test.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    for row in rng.sample(rows, 12):
        samples.append(clip(row["question"] + "\n" + row["answer"]))
    with open(os.path.join(shared, "alpaca", "alpaca_en_demo.json"), encoding="utf-8") as f:
        rows = json.load(f)
    for row in rng.sample(rows, 12):
        samples.append(clip("\n\n".join(x for x in (row["instruction"], row["input"], row["output"]) if x)))
    with open(os.path.join(shared, "alpaca", "seed_tasks.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    for row in rng.sample(rows, 4):
        samples.append(clip(row["instruction"] + "\n" + row["instances"][0]["output"]))
    with open(os.path.join(shared, "sharegpt", "conversation.json"), encoding="utf-8") as f:
        for turn in json.load(f)["conversations"][:6]:
            samples.append(clip(turn["value"]))
    with open(os.path.join(shared, "glaive-toolcall", "glaive_toolcall_en_demo.json"), encoding="utf-8") as f:
        rows = json.load(f)
    for row in rng.sample(rows, 6):
        samples.append(clip(row.get("tools", "")))
        samples.append(clip("\n".join(t["value"] for t in row["conversations"])))
    for name in ("simple.json", "system.json", "tool_use.json"):
        with open(os.path.join(shared, "chat-contexts", name), encoding="utf-8") as f:
            samples.append(clip(f.read()))
    with open(os.path.join(shared, "llamafactory-demo", "reason_tool_use_demo_50.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    for row in rows[:3]:
        for message in row["messages"]:
            for part in message["content"]:
                samples.append(clip(part.get("value", "")))
    return [s for s in samples if s is not None]


EDGE_CASES = [
    "", " ", "  ", "   leading spaces", "trailing spaces   ", "\t", "\n", "\r\n", "\n\n\n",
    "a\r\nb\r\n\r\nc", "tabs\tand\t\tmore\ttabs", "mixed \t\n \r\n  whitespace   runs\n   \n",
    "Hello world", " Hello world", "Hello  world", "hello\u00a0world", "line\u2028sep\u2029para",
    "nel\u0085char", "ideographic\u3000space", "zero\u200bwidth\u200djoiner",
    "I'm, you're, he's, we'll, they'd, I've; I'M YOU'RE HE'S WE'LL", "don't 'quote' \"double\"",
    "中文测试：你好，世界！这是一个测试。", "日本語のテキスト、カタカナとひらがな。", "한국어 텍스트입니다 안녕하세요",
    "مرحبا بالعالم، هذا اختبار.", "नमस्ते दुनिया, यह एक परीक्षण है।", "Привет, мир! Ёжик в тумане.",
    "Ελληνικά γράμματα αβγ", "עברית שלום", "ไทย สวัสดีครับ",
    "emoji 😀😃😄 👍🏽 🇫🇷🇯🇵", "family 👨‍👩‍👧‍👦 and 🏳️‍🌈 and 👩🏽‍💻", "❤️ ✌️ ☺︎ keycap 1️⃣ #️⃣",
    "combining e\u0301 a\u0300 o\u0308 n\u0303 \u0041\u030a", "decomposed Åström vs A\u030astro\u0308m",
    "ﬁ ligature ﬀ Ⅻ ① ｆｕｌｌｗｉｄｔｈ ＡＢＣ １２３ ㌀", "Hangul jamo \u1100\u1161\u11a8 and 가\u11a8",
    "0123456789" * 5, "3.14159265358979323846264338327950288419716939937510",
    "1,234,567.89 and 1e-10 and 0x1F and 10^100", "12345678901234567890123456789012345678901234567890",
    "def f(x):\n    return x ** 2  # square\n\nclass A:\n\tpass\n",
    "for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; }\n",
    "<html><body><div class=\"x\">text</div></body></html>",
    "{\"key\": [1, 2, 3], \"nested\": {\"a\": null, \"b\": true}}",
    "https://example.com/path?query=1&b=two#frag user@example.org",
    "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>", "text<|endoftext|>more", "<s>", "</s>", "<s>[INST] Hi [/INST] Hello</s>",
    "Hello </s> world", "Hello</s>world", "  <s>  spaced  </s>  ", "<unk>",
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>",
    "<|user|>\nWhat is 2+2?<|end|>\n<|assistant|>\n4<|end|>", "<|system|> sys <|end|> <|user|>   x",
    "<think>\nreasoning\n</think>\n\nanswer", "<tool_call>\n{\"name\": \"f\"}\n</tool_call>",
    "<|im_start|><|im_end|><|im_start|>", "<|im_start|", "|im_start|>", "<<|im_end|>>",
    "a" * 3000, "x" * 1000 + "y" * 1000, "supercalifragilisticexpialidocious" * 40,
    "▁already▁has▁metaspace ▁", "<0x41> <0xFF> byte token names",
    "!!!???...,,,;;;:::", "---===+++***", "$$$ %%% ^^^ &&& @@@ ~~~ ```", "\\ backslash \\n literal",
    "Mixed CASE words With Capitals AND ALLCAPS", "snake_case_identifier and camelCaseIdentifier",
    "\u0000nul\u0001ctrl\u001fchars\u007f", "surrogate-free astral 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝟘𝟙𝟚 𠀀𠀁",
    "ſ long s 's 'ſ", "K Kelvin sign and Å angstrom sign",
]


def fuzz_strings(tok_json, count, seed):
    rng = random.Random(seed)
    specials = [t["content"] for t in tok_json.get("added_tokens", [])][:40]
    pools = [
        "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
        "0123456789",
        " \t\n\r",
        "      \u00a0\u0085\u2028\u3000\u2009\u200b\u200d\ufeff",
        "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~",
        "éèêëàâäôöûüçñÅåØøßÆæœ",
        "\u0300\u0301\u0302\u0303\u0308\u030a\u0327\u0345\u05b0\u064b\u093c\u0951",
        "中文字测试你好世界日本語のテキスト",
        "한국어텍스트가각\u1100\u1161\u11a8",
        "مرحبابالعالم",
        "नमस्तेदुनिया",
        "😀👍🏽👨\u200d👩\u200d👧🇫🇷❤️\ufe0f✌",
        "ﬁﬀⅫ①ｆＡ１㌀",
        "ſK",
    ]
    out = []
    for _ in range(count):
        parts = []
        for _ in range(rng.randint(0, 24)):
            r = rng.random()
            if r < 0.06 and specials:
                parts.append(rng.choice(specials))
            elif r < 0.12:
                parts.append("'" + rng.choice(["s", "t", "re", "ve", "m", "ll", "d", "S", "LL", "D"]))
            elif r < 0.2:
                # Any code point assigned in Python's Unicode (14.0, as PCRE2 10.42's tables):
                # characters assigned later are letters for tokenizers' Oniguruma but
                # unassigned for PCRE2 (a known, documented difference).
                cp = rng.randint(0x20, 0x2FFFF)
                while unicodedata.category(chr(cp)) in ("Cn", "Cs"):
                    cp = rng.randint(0x20, 0x2FFFF)
                parts.append(chr(cp))
            else:
                pool = rng.choice(pools)
                parts.append("".join(rng.choice(pool) for _ in range(rng.randint(1, 6))))
        out.append("".join(parts))
    return out


def apply_variant(tok_json, patch, extra_tokens):
    """The patched tokenizer.json (also what the C++ test does): top-level keys replaced,
    extra added tokens appended with the next free ids."""
    tok_json = dict(tok_json, **patch)
    next_id = max([*tok_json["model"]["vocab"].values(), *(t["id"] for t in tok_json["added_tokens"])]) + 1
    added = list(tok_json["added_tokens"])
    for token in extra_tokens:
        full = {"id": next_id, "content": token["content"], "single_word": False, "lstrip": False,
                "rstrip": False, "normalized": True, "special": False}
        full.update(token)
        added.append(full)
        next_id += 1
    tok_json["added_tokens"] = added
    return tok_json


def load_tokenizer_json(shared, folder, tmp):
    """Path of a loadable copy of the folder's tokenizer.json. Legacy "a b" merges that are not
    exactly two space-separated tokens (llama2's copy has 3: "   ", "     ", "▁  ") make
    tokenizers refuse the file; they are dropped here, as moetune's loader skips them (their
    merged tokens are not in the vocab, so they could never apply)."""
    src = os.path.join(shared, folder, "tokenizer.json")
    if os.path.exists(src):
        with open(src, encoding="utf-8") as f:
            tok_json = json.load(f)
    else:
        with lzma.open(src + ".xz", "rt", encoding="utf-8") as f:
            tok_json = json.load(f)
    merges = tok_json["model"].get("merges", [])
    kept = [m for m in merges if not isinstance(m, str) or m.count(" ") == 1]
    if len(kept) != len(merges):
        print(f"{folder}: dropping {len(merges) - len(kept)} malformed merges")
        tok_json["model"]["merges"] = kept
    dst = os.path.join(tmp, folder.replace("/", "_") + ".json")
    with open(dst, "w", encoding="utf-8") as f:
        json.dump(tok_json, f, ensure_ascii=False)
    return dst


def record(tok, text, key):
    plain = tok.encode(text, add_special_tokens=False).ids
    special = tok.encode(text, add_special_tokens=True).ids
    row = dict(key)
    row["ids"] = plain
    n = len(plain)
    prefix_len = next((k for k in range(len(special) - n + 1)
                       if special[k:k + n] == plain), None) if len(special) >= n else None
    if prefix_len is not None:
        row["special"] = [special[:prefix_len], special[prefix_len + n:]]
    else:
        row["ids_special"] = special
    decoded = tok.decode(plain, skip_special_tokens=False)
    if decoded != text:
        row["decoded"] = decoded
    decoded_skip = tok.decode(special, skip_special_tokens=True)
    if decoded_skip != decoded:
        row["decoded_skip"] = decoded_skip
    return row


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shared", default=os.path.join(ROOT, "..", "shared", "data"))
    parser.add_argument("--fuzz", type=int, default=300)
    args = parser.parse_args()
    os.makedirs(OUT, exist_ok=True)
    corpus = dataset_samples(args.shared) + EDGE_CASES
    with open(os.path.join(OUT, "corpus.jsonl"), "w", encoding="utf-8") as f:
        for text in corpus:
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    with tempfile.TemporaryDirectory() as tmp:
        for seed, (name, folder) in enumerate(TOKENIZERS.items()):
            path = load_tokenizer_json(args.shared, folder, tmp)
            tok = Tokenizer.from_file(path)
            tok.no_truncation()
            tok.no_padding()
            with open(path, encoding="utf-8") as f:
                tok_json = json.load(f)
            rows = [{"tokenizer": folder}]
            rows += [record(tok, text, {"i": i}) for i, text in enumerate(corpus)]
            rows += [record(tok, text, {"text": text})
                     for text in fuzz_strings(tok_json, args.fuzz, 1000 + seed)]
            out_path = os.path.join(OUT, name + ".jsonl")
            with open(out_path, "w", encoding="utf-8") as f:
                for row in rows:
                    f.write(json.dumps(row, ensure_ascii=False, separators=(",", ":")) + "\n")
            print(f"{out_path}: {len(rows) - 1} rows, {os.path.getsize(out_path)} bytes")
        edge_start = len(corpus) - len(EDGE_CASES)
        for seed, (name, (folder, patch, extra)) in enumerate(VARIANTS.items()):
            with open(load_tokenizer_json(args.shared, folder, tmp), encoding="utf-8") as f:
                tok_json = apply_variant(json.load(f), patch, extra)
            path = os.path.join(tmp, "variant.json")
            with open(path, "w", encoding="utf-8") as f:
                json.dump(tok_json, f, ensure_ascii=False)
            tok = Tokenizer.from_file(path)
            tok.no_truncation()
            tok.no_padding()
            rows = [{"tokenizer": folder, "patch": patch, "extra_added_tokens": extra}]
            rows += [record(tok, corpus[i], {"i": i}) for i in range(edge_start, len(corpus))]
            specials = [t["content"] for t in extra] + ["hello", "wide word", "[R] ", " <mask>", "1.5.9"]
            rows += [record(tok, text, {"text": text})
                     for text in fuzz_strings({"added_tokens": [{"content": c} for c in specials]},
                                              args.fuzz // 3, 2000 + seed)]
            out_path = os.path.join(OUT, name + ".jsonl")
            with open(out_path, "w", encoding="utf-8") as f:
                for row in rows:
                    f.write(json.dumps(row, ensure_ascii=False, separators=(",", ":")) + "\n")
            print(f"{out_path}: {len(rows) - 1} rows, {os.path.getsize(out_path)} bytes")


if __name__ == "__main__":
    main()
