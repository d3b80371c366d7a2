#!/usr/bin/env python3
"""Goldens for moetune's chat template interpreter, rendered by Transformers itself.

Renders every chat template found in ../shared/data (Qwen3 x2, Qwen3-Coder, Qwen2.5, Llama 3,
Phi-3, the mistral.rs Mistral templates, SmolLM3, GPT-OSS) plus the public templates kept in
tests/goldens/chat/templates (Llama-2-chat, Mixtral-Instruct, Gemma-it as published in their HF
tokenizer_config.json; generation.jinja and features.jinja written for these tests) over the
conversations of shared/data/chat-contexts, glaive-toolcall, sharegpt, llamafactory-demo and a
few hand-written edge cases, each with add_generation_prompt false and true (and enable_thinking
variants). Where the folder has a tokenizer.json the tokenizer is loaded and
apply_chat_template(tokenize=False) renders; otherwise render_jinja_template (what
apply_chat_template calls) does. Errors are recorded as {"error", "error_type"}. Templates with
{% generation %} also record the generation spans (byte offsets) via
_render_with_assistant_indices. strftime_now is pinned to FIXED_DATE (tests set
MOETUNE_FIXED_DATE to the same value).

Writes tests/goldens/chat/manifest.json, cases.jsonl.xz and expected.jsonl.xz.
Usage: python3 scripts/make_chat_goldens.py [--shared-data DIR]
"""
import argparse
import datetime as dt
import json
import lzma
import os
import shutil
import tempfile
from pathlib import Path

import transformers
from transformers.utils import chat_template_utils as ctu

FIXED_DATE = dt.datetime(2025, 3, 7, 9, 5, 3)


class FixedDatetime(dt.datetime):
    @classmethod
    def now(cls, tz=None):
        return FIXED_DATE


ctu.datetime = FixedDatetime  # strftime_now calls datetime.now() through this module global

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "tests" / "goldens" / "chat"
SPECIAL_KEYS = ["bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"]


def special_tokens_from_config(config):
    out = {}
    for key in SPECIAL_KEYS:
        v = config.get(key)
        if isinstance(v, dict):
            v = v.get("content")
        if isinstance(v, str):
            out[key] = v
    extra = config.get("extra_special_tokens")
    if isinstance(extra, dict):
        for k, v in extra.items():
            v = v.get("content") if isinstance(v, dict) else v
            if isinstance(v, str):
                out[k] = v
    return out


def template_specs(shared):
    """(name, template file relative to its root, root ('shared'|'goldens'), config, how)."""
    specs = [
        ("qwen3", "qwen3/tokenizer_config.json", "shared", "qwen3/tokenizer_config.json"),
        ("qwen3-ort", "qwen3/onnxruntime-extensions/tokenizer_config.json", "shared",
         "qwen3/onnxruntime-extensions/tokenizer_config.json"),
        ("qwen3-coder", "qwen3/Qwen-Qwen3-Coder-30B-A3B-Instruct.jinja", "shared", "qwen3/tokenizer_config.json"),
        ("qwen2.5", "qwen2.5/tokenizer_config.json", "shared", "qwen2.5/tokenizer_config.json"),
        ("llama3", "llama3/tokenizer_config.json", "shared", "llama3/tokenizer_config.json"),
        ("phi3", "phi-3-mini/tokenizer_config.json", "shared", "phi-3-mini/tokenizer_config.json"),
        ("mistral-rs", "mixtral/mistral.rs-chat-templates/mistral.json", "shared", "mixtral/tokenizer_config.json"),
        ("mistral-nemo-tools", "mixtral/mistral.rs-chat-templates/mistral_nemo_tool_call.jinja", "shared",
         "mixtral/tokenizer_config.json"),
        ("mistral-small-tools", "mixtral/mistral.rs-chat-templates/mistral_small_tool_call.jinja", "shared",
         "mixtral/tokenizer_config.json"),
        ("smollm3", "smollm3/chat_template.jinja", "shared", "smollm3/tokenizer_config.json"),
        ("gpt-oss", "gpt-oss/chat_template.jinja", "shared", "gpt-oss/tokenizer_config.json"),
        ("llama2-chat", "templates/llama2-chat.jinja", "goldens", "llama2/tokenizer_config.json"),
        ("mixtral-instruct", "templates/mixtral-instruct.jinja", "goldens", "mixtral/tokenizer_config.json"),
        ("gemma-it", "templates/gemma-it.jinja", "goldens", None),
        ("generation", "templates/generation.jinja", "goldens", "smollm3/tokenizer_config.json"),
        ("features", "templates/features.jinja", "goldens", "qwen3/tokenizer_config.json"),
    ]
    out = []
    for name, rel, root, config in specs:
        base = shared if root == "shared" else OUT
        if not (base / rel).exists():
            print(f"skip {name}: {rel} not found")
            continue
        out.append((name, rel, root, config))
    return out


def load_template(path):
    if path.suffix == ".json":
        return json.loads(path.read_text())["chat_template"]
    return path.read_text()


def load_tokenizer(shared, config_rel):
    """An HF tokenizer for a folder that has tokenizer.json(.xz), else None."""
    folder = (shared / config_rel).parent
    src = folder / "tokenizer.json.xz"
    if not src.exists():
        return None
    tmp = Path(tempfile.mkdtemp())
    with lzma.open(src) as f:
        (tmp / "tokenizer.json").write_bytes(f.read())
    for name in ["tokenizer_config.json", "special_tokens_map.json"]:
        if (folder / name).exists():
            shutil.copy(folder / name, tmp / name)
    try:
        return transformers.AutoTokenizer.from_pretrained(str(tmp))
    except Exception as e:  # noqa: BLE001 - fall back to render_jinja_template
        print(f"  (tokenizer for {folder} not loadable: {e}; using render_jinja_template)")
        return None
    finally:
        shutil.rmtree(tmp)


# ---- conversations ------------------------------------------------------------------------------


def sharegpt_to_messages(conv, tools_json):
    roles = {"human": "user", "gpt": "assistant", "system": "system"}
    messages = []
    for turn in conv:
        frm, value = turn["from"], turn["value"]
        if frm == "function_call":
            call = json.loads(value)
            messages.append({"role": "assistant", "content": "", "tool_calls": [
                {"type": "function", "function": {"name": call["name"], "arguments": call["arguments"]}}]})
        elif frm == "observation":
            messages.append({"role": "tool", "content": value})
        else:
            messages.append({"role": roles[frm], "content": value})
    case = {"messages": messages}
    if tools_json:
        tools = json.loads(tools_json)
        if tools:
            case["tools"] = [{"type": "function", "function": t} for t in tools]
    return case


def llamafactory_to_messages(record):
    messages = []
    for m in record["messages"]:
        out = {"role": m["role"]}
        texts = [p["value"] for p in m["content"] if p["type"] == "text"]
        reasoning = [p["value"] for p in m["content"] if p["type"] == "reasoning"]
        calls = [json.loads(p["value"]) for p in m["content"] if p["type"] == "tool_call"]
        out["content"] = "\n".join(texts)
        if reasoning:
            out["reasoning_content"] = "\n".join(reasoning)
        if calls:
            out["tool_calls"] = [{"type": "function", "function": c} for c in calls]
        messages.append(out)
    case = {"messages": messages}
    if record.get("tools"):
        case["tools"] = json.loads(record["tools"])
    return case


def handwritten_cases():
    weather = {"type": "function", "function": {
        "name": "get_weather", "description": "Météo actuelle — «current weather» in a city ☀️",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "description": "City name, e.g. \"Zürich\""},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "default": "celsius"},
            "days": {"type": "integer", "description": "Forecast days", "default": 1},
            "threshold": {"type": "number", "default": 0.5},
            "tags": {"type": "array", "items": {"type": "string"}},
            "verbose": {"type": "boolean", "nullable": True}},
            "required": ["city"]}}}
    cases = [
        {"messages": [{"role": "user", "content": "Hi!"}]},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"},
                      {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]},
        {"messages": [{"role": "user", "content": "Weather in Zürich? 你好 😀 tab\there \\back \"q\" 'a'"},
                      {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function",
                       "function": {"name": "get_weather",
                                    "arguments": {"city": "Zürich", "days": 3, "threshold": 0.25,
                                                  "tags": ["a", "ü"], "verbose": None, "ok": True}}}]},
                      {"role": "tool", "content": "{\"temp\": 21.5}", "name": "get_weather"},
                      {"role": "tool", "content": "second result"},
                      {"role": "assistant", "content": "It is 21.5 °C."}],
         "tools": [weather]},
        {"messages": [{"role": "user", "content": "Think first."},
                      {"role": "assistant", "content": "<think>\nLet me think.\n</think>\n\nThe answer is 4."},
                      {"role": "user", "content": "And then?"},
                      {"role": "assistant", "content": "Five.", "reasoning_content": "Counting up."}]},
        {"messages": [{"role": "user", "content": "Think first."},
                      {"role": "assistant", "content": "<think>\nhmm\n</think>\n\nFour."}],
         "enable_thinking": False},
        {"messages": [{"role": "user", "content": "q"}], "enable_thinking": True},
        {"messages": [{"role": "user", "content": "q"}], "enable_thinking": False},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "Describe"},
                                                   {"type": "image", "url": "x.png"}]},
                      {"role": "assistant", "content": "A cat."}]},
        {"messages": [{"role": "user", "content": "one"}, {"role": "user", "content": "two"}]},
        {"messages": [{"role": "system", "content": "Sys /no_think"}, {"role": "user", "content": "x"}],
         "xml_tools": [weather["function"]], "python_tools": [{"name": "py", "args": [1, 2.5]}]},
        {"messages": [{"role": "system", "content": "/system_override Custom!"}, {"role": "user", "content": "x"}]},
        {"messages": [{"role": "developer", "content": "Dev instructions"},
                      {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Thinking...", "channel": "analysis"},
                      {"role": "assistant", "content": "Final answer", "channel": "final"},
                      {"role": "user", "content": "More"}],
         "builtin_tools": ["browser", "python"], "model_identity": "You are Test.", "reasoning_effort": "high"},
        {"messages": [{"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "calling", "tool_calls": [
                          {"name": "get_weather", "arguments": {"city": "Paris"}}]},
                      {"role": "tool", "content": {"temp": 20, "sky": "clear"}}],
         "tools": [weather], "auto_drop_analysis": False},
        {"messages": [{"role": "tool", "content": "orphan"}]},
        {"messages": [{"role": "assistant", "content": "  padded  "}, {"role": "user", "content": "  u  "}]},
        {"messages": [{"role": "user", "content": "x" * 3000}]},
    ]
    return cases


def build_cases(shared):
    cases = []
    for name in ["simple", "system", "tool_use"]:
        d = json.loads((shared / "chat-contexts" / f"{name}.json").read_text())
        cases.append(d)
    glaive = json.loads((shared / "glaive-toolcall" / "glaive_toolcall_en_demo.json").read_text())
    for record in glaive[:70]:
        cases.append(sharegpt_to_messages(record["conversations"], record.get("tools")))
    sharegpt = json.loads((shared / "sharegpt" / "conversation.json").read_text())
    cases.append(sharegpt_to_messages(sharegpt["conversations"], None))
    with open(shared / "llamafactory-demo" / "reason_tool_use_demo_50.jsonl") as f:
        for line in list(f)[:12]:
            cases.append(llamafactory_to_messages(json.loads(line)))
    cases += handwritten_cases()
    # add_generation_prompt both ways for every conversation.
    out = []
    for case in cases:
        for agp in (False, True):
            c = dict(case)
            c["add_generation_prompt"] = agp
            out.append(c)
    return out


# ---- rendering ----------------------------------------------------------------------------------


def render_case(template, tokenizer, special, case):
    kwargs = dict(case)
    messages = kwargs.pop("messages")
    tools = kwargs.pop("tools", None)
    agp = kwargs.pop("add_generation_prompt", False)
    if tokenizer is not None:
        return tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=agp, tokenize=False,
                                             **kwargs)
    rendered, _ = ctu.render_jinja_template(conversations=[messages], tools=tools, chat_template=template,
                                            add_generation_prompt=agp, **{**special, **kwargs})
    return rendered[0]


def generation_spans(template, special, case, text):
    kwargs = dict(case)
    messages = kwargs.pop("messages")
    tools = kwargs.pop("tools", None)
    agp = kwargs.pop("add_generation_prompt", False)
    compiled = ctu._compile_jinja_template(template)
    rendered, spans = ctu._render_with_assistant_indices(compiled, messages, tools, None, agp,
                                                         **{**special, **kwargs})
    assert rendered == text, "generate() and render() disagree"
    return [[len(text[:b].encode()), len(text[:e].encode())] for b, e in spans]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shared-data", default=str(REPO.parent / "shared" / "data"))
    args = parser.parse_args()
    shared = Path(args.shared_data).resolve()
    cases = build_cases(shared)
    manifest = {"fixed_date": FIXED_DATE.strftime("%Y-%m-%d %H:%M:%S"), "transformers": transformers.__version__,
                "templates": []}
    expected = []
    for name, rel, root, config_rel in template_specs(shared):
        path = (shared if root == "shared" else OUT) / rel
        template = load_template(path)
        config = json.loads((shared / config_rel).read_text()) if config_rel else {}
        tokenizer = load_tokenizer(shared, config_rel) if config_rel and root == "shared" and rel == config_rel else None
        special = dict(tokenizer.special_tokens_map) if tokenizer is not None else special_tokens_from_config(config)
        has_generation = "generation" in template and "endgeneration" in template
        manifest["templates"].append({"name": name, "template": rel, "root": root, "config": config_rel,
                                      "special_tokens": special,
                                      "rendered_by": "apply_chat_template" if tokenizer else "render_jinja_template",
                                      "generation": has_generation})
        n_err = 0
        for i, case in enumerate(cases):
            row = {"template": name, "case": i}
            try:
                text = render_case(template, tokenizer, special, case)
                row["text"] = text
                if has_generation:
                    row["spans"] = generation_spans(template, special, case, text)
            except Exception as e:  # noqa: BLE001 - errors are goldens too
                row["error"] = str(e)
                row["error_type"] = type(e).__name__
                n_err += 1
            expected.append(row)
        print(f"{name}: {len(cases)} cases, {n_err} errors ({manifest['templates'][-1]['rendered_by']})")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
    for fname, rows in [("cases.jsonl.xz", cases), ("expected.jsonl.xz", expected)]:
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
        (OUT / fname).write_bytes(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME))
        print(f"{fname}: {len(rows)} rows, {len(data)} bytes -> {(OUT / fname).stat().st_size} bytes xz")


if __name__ == "__main__":
    main()
