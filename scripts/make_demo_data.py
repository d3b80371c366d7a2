#!/usr/bin/env python3
"""Builds the CPU demo's files in recipes/demo/ (all committed; run again to rebuild them).

- tokenizer.json: a small byte-level BPE (Qwen-style: a regex pre-tokenizer that splits every
  digit on its own, then ByteLevel), trained with the `tokenizers` library on the demo's text;
  special tokens <|endoftext|>, <|im_start|>, <|im_end|>.
- tokenizer_config.json: bos/eos/pad tokens and a ChatML chat template whose assistant turns
  sit inside {% generation %} tags (so the loss can be restricted to the answers).
- config.json: a tiny Qwen3-MoE (random init in moetune).
- generation_config.json: eos token and greedy decoding.
- train.jsonl / eval.jsonl: multi-digit addition in chat format ({"messages": [...]}); the
  two sets share no question. Fixed seed, so the files are reproducible.

Usage: python3 scripts/make_demo_data.py [--out recipes/demo]
"""
import argparse
import json
import random
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

SEED = 1234
MAX_DIGITS = 2  # operands of 1 to MAX_DIGITS digits
TRAIN_EXAMPLES = 7000
EVAL_EXAMPLES = 200
VOCAB_SIZE = 384
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# Qwen2's pre-tokenizer pattern, except that numbers split into single digits (\p{N}).
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}"
    "{% endgeneration %}{{ '\\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

MODEL_CONFIG = {
    "architectures": ["Qwen3MoeForCausalLM"],
    "model_type": "qwen3_moe",
    "vocab_size": 0,  # set to the tokenizer's size rounded up to 32
    "hidden_size": 96,
    "intermediate_size": 192,
    "moe_intermediate_size": 96,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 24,
    "hidden_act": "silu",
    "max_position_embeddings": 128,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "tie_word_embeddings": True,
    "initializer_range": 0.02,
    "num_experts": 4,
    "num_experts_per_tok": 2,
    "norm_topk_prob": True,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "output_router_logits": False,
    "router_aux_loss_coef": 0.001,
    "use_cache": True,
    "bos_token_id": None,
    "eos_token_id": 2,
    "pad_token_id": 0,
    "torch_dtype": "float32",
}


def question_text(a, b):
    return f"{a}+{b}="


def make_examples(rng):
    """All distinct (a, b) pairs drawn at random; the first EVAL_EXAMPLES are held out."""
    seen = set()
    pairs = []
    while len(pairs) < TRAIN_EXAMPLES + EVAL_EXAMPLES:
        # Mix operand lengths so short sums are seen too.
        a = rng.randint(0, 10 ** rng.randint(1, MAX_DIGITS) - 1)
        b = rng.randint(0, 10 ** rng.randint(1, MAX_DIGITS) - 1)
        if (a, b) in seen:
            continue
        seen.add((a, b))
        pairs.append((a, b))
    def to_record(pair):
        a, b = pair
        return {"messages": [{"role": "user", "content": question_text(a, b)},
                             {"role": "assistant", "content": str(a + b)}]}
    return [to_record(p) for p in pairs[EVAL_EXAMPLES:]], [to_record(p) for p in pairs[:EVAL_EXAMPLES]]


def render_chat(messages):
    out = []
    for message in messages:
        out.append(f"<|im_start|>{message['role']}\n{message['content']}<|im_end|>\n")
    return "".join(out)


def build_tokenizer(texts):
    tokenizer = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "recipes" / "demo"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(SEED)

    train, held_out = make_examples(rng)
    for name, records in (("train.jsonl", train), ("eval.jsonl", held_out)):
        with open(out / name, "w") as f:
            for record in records:
                f.write(json.dumps(record) + "\n")

    # The tokenizer learns merges from the chat text plus a little prose for the roles.
    texts = [render_chat(r["messages"]) for r in train] + ["user assistant system"] * 50
    tokenizer = build_tokenizer(texts)
    assert tokenizer.get_vocab_size() <= VOCAB_SIZE, tokenizer.get_vocab_size()
    tokenizer.save(str(out / "tokenizer.json"))
    ids = {t: tokenizer.token_to_id(t) for t in SPECIAL_TOKENS}

    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": MODEL_CONFIG["max_position_embeddings"],
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "add_bos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
        "added_tokens_decoder": {
            str(ids[t]): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                          "single_word": False, "special": True} for t in SPECIAL_TOKENS},
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")

    config = dict(MODEL_CONFIG)
    config["vocab_size"] = (tokenizer.get_vocab_size() + 31) // 32 * 32
    config["eos_token_id"] = ids["<|im_end|>"]
    config["pad_token_id"] = ids["<|endoftext|>"]
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation_config = {"eos_token_id": ids["<|im_end|>"], "pad_token_id": ids["<|endoftext|>"],
                         "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(generation_config, indent=2) + "\n")

    sample = render_chat(held_out[0]["messages"])
    print(f"wrote {out}: {len(train)} train, {len(held_out)} held-out examples, "
          f"vocab {tokenizer.get_vocab_size()}; '{sample!r}' -> {len(tokenizer.encode(sample).ids)} tokens")


if __name__ == "__main__":
    main()
