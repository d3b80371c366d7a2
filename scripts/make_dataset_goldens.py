#!/usr/bin/env python3
"""Goldens for the dataset loss-mask tests, made by Transformers (the reference).

Renders a few conversations with SmolLM3's chat template (it has {% generation %} tags)
and the Qwen3 tokenizer, through apply_chat_template(..., return_assistant_tokens_mask=True),
and writes tests/goldens/dataset/smollm3_qwen3_masks.jsonl: one line per conversation with
messages, input_ids and assistant_masks. The system messages use /system_override so the
template does not print today's date (the goldens stay fixed).

usage: scripts/make_dataset_goldens.py   (needs transformers, tokenizers; reads ../shared/data)
"""
import json
import lzma
import pathlib
import shutil
import tempfile

from transformers import AutoTokenizer

root = pathlib.Path(__file__).resolve().parent.parent
data = root.parent / "shared" / "data"
out = root / "tests" / "goldens" / "dataset" / "smollm3_qwen3_masks.jsonl"

system = {"role": "system", "content": "/system_override You answer briefly."}
conversations = [
    [system, {"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}],
    [system,
     {"role": "user", "content": "Name a prime."},
     {"role": "assistant", "content": "Seven is prime."},
     {"role": "user", "content": "And an even one?"},
     {"role": "assistant", "content": "\nTwo, the only even prime."}],
    [system,
     {"role": "user", "content": "Café au lait — ça va? 日本語も話せますか"},
     {"role": "assistant", "content": "Oui ! はい、少し話せます。 🙂"}],
    [system,
     {"role": "user", "content": "Weather in Paris?"},
     {"role": "assistant", "content": "<tool_call>\n{\"name\": \"weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>"},
     {"role": "tool", "content": "{\"sky\": \"clear\", \"temp\": 21}"},
     {"role": "assistant", "content": "Clear, 21 degrees."}],
]

with tempfile.TemporaryDirectory() as folder:
    folder = pathlib.Path(folder)
    with lzma.open(data / "qwen3" / "tokenizer.json.xz") as src, open(folder / "tokenizer.json", "wb") as dst:
        shutil.copyfileobj(src, dst)
    shutil.copy(data / "qwen3" / "tokenizer_config.json", folder / "tokenizer_config.json")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    template = (data / "smollm3" / "chat_template.jinja").read_text()
    with open(out, "w") as file:
        for messages in conversations:
            encoded = tokenizer.apply_chat_template(
                messages, chat_template=template, tokenize=True, return_dict=True,
                return_assistant_tokens_mask=True)
            file.write(json.dumps({"messages": messages, "input_ids": list(encoded["input_ids"]),
                                   "assistant_masks": list(encoded["assistant_masks"])},
                                  ensure_ascii=False) + "\n")
print("wrote", out)
