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

Writes tests/goldens/chat/manifest.json, cases.jsonl.xz, expected.jsonl.xz and snippets.jsonl
(small templates over SNIPPET_VARS, for the semantics in between).
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
    for record in glaive[:150]:
        cases.append(sharegpt_to_messages(record["conversations"], record.get("tools")))
    sharegpt = json.loads((shared / "sharegpt" / "conversation.json").read_text())
    cases.append(sharegpt_to_messages(sharegpt["conversations"], None))
    with open(shared / "llamafactory-demo" / "reason_tool_use_demo_50.jsonl") as f:
        for line in list(f)[:25]:
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


# ---- snippets: small templates over a fixed context, for the semantics in between ---------------

SNIPPET_VARS = {
    "messages": [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi"}],
    "d": {"b": 2, "a": 1, "nested": {"k": [1, 2, {"z": None}]}},
    "items_list": [{"a": 3, "n": "x"}, {"a": 1, "n": "y"}, {"a": 2, "n": "x"}, {"n": "z"}],
    "text": "  Héllo, Wörld! 😀  ",
    "num": 7, "flt": 2.5, "nothing": None, "flag": True,
}

SNIPPETS = [
    # undefined and attribute/item lookup
    "{{ x }}|{{ x is defined }}|{{ x | default('dflt') }}|{{ x | length }}|{{ x | string }}|{{ x | list }}",
    "{{ x.y }}", "{{ x['y'] }}", "{{ x + 1 }}", "{{ 1 + x }}", "{{ x ~ 'a' }}", "{{ x | tojson }}", "{{ x < 1 }}",
    "{{ x == none }}|{{ x != 1 }}", "{{ x() }}", "{% for a in x %}{{ a }}{% endfor %}ok", "{{ 'a' in x }}",
    "{{ d.missing }}|{{ d.missing is defined }}", "{{ d.missing.deeper }}", "{{ d['missing']['deeper'] }}",
    "{{ nothing.x }}|{{ nothing['x'] }}", "{{ nothing.x.y }}", "{{ messages[5] }}|{{ messages[5] is defined }}",
    "{{ messages[5].role }}", "{{ 'abc'[10] }}|{{ 'abc'[-1] }}|{{ 'abc'[1:] }}", "{{ num.x }}|{{ num[0] }}",
    "{{ d.items is defined }}|{{ d.items is callable }}", "{{ d['keys'] is defined }}", "{{ messages.length }}|{{ messages['x'] }}",
    "{{ d.nested.k[2].z }}|{{ d.nested.k.1 }}|{{ d['nested']['k'][-1] }}",
    "{{ (x if false) is defined }}|{{ 'yes' if flag }}",
    # type errors and arithmetic
    "{{ 'a' + 1 }}", "{{ 1 + 'a' }}", "{{ [1] + 'a' }}", "{{ nothing + 1 }}", "{{ 1 / 0 }}", "{{ 1 // 0 }}",
    "{{ 1 % 0 }}", "{{ 1.0 / 0 }}", "{{ 'a' < 1 }}", "{{ 'x' in 1 }}", "{{ 1 in 'x' }}", "{{ -'x' }}",
    "{% for a in 5 %}{% endfor %}", "{% for a, b in [1] %}{% endfor %}", "{% for a, b in [(1, 2, 3)] %}{% endfor %}",
    "{% for a, b in ['xy'] %}{{ b }}{{ a }}{% endfor %}", "{{ [1, 2] * 2 }}|{{ 2 * 'ab' }}|{{ 'a' * 0 }}|{{ 'a' * -1 }}",
    "{{ -2 ** 2 }}|{{ 2 ** 3 ** 2 }}|{{ 2 ** 0.5 }}|{{ 10 ** 18 }}|{{ -7 // 2.0 }}|{{ -7 % 2.5 }}|{{ 7.5 // 2 }}",
    "{{ 1e308 * 10 }}|{{ -1e308 * 10 }}|{{ (1e308 * 10) | tojson }}|{{ 0.1 * 3 }}|{{ 1e16 }}|{{ 1.5e-7 }}|{{ 123456789012345678 }}",
    "{{ 1 == 1.0 }}|{{ true + true }}|{{ true * 3 }}|{{ 5 - true }}|{{ 3 / true }}|{{ [1, 2] == [1, 2] }}|{{ (1, 2) == [1, 2] }}",
    "{{ 1 < 2.5 }}|{{ 'B' < 'a' }}|{{ 'é' > 'z' }}|{{ [1, 'a'] < [1, 'b'] }}|{{ [] < [0] }}|{{ nothing == nothing }}",
    "{{ 1 < 2 > 1 }}|{{ 1 < 2 < 1 }}|{{ 1 == 1 == 1 }}|{{ not 1 == 2 }}|{{ not (1 and 0) }}|{{ 0 or nothing or 'z' }}",
    # sandbox
    "{{ [].append(1) }}", "{% set l = [1] %}{{ l.append }}|{{ l.append is defined }}", "{{ {}.update({}) }}",
    "{{ ''.__class__ }}|{{ ''.__class__ is defined }}", "{{ [1].pop() }}", "{{ range(100001) | length }}",
    "{{ range(5) | list }}|{{ range(2, 10, 3) | list }}|{{ range(5, 0, -2) | list }}|{{ range(0) | list }}",
    "{{ d.pop('a') }}", "{{ messages.__len__ }}", "{{ d._private }}",
    # macros, caller, scoping
    "{% macro m(a, b=2) %}{{ a }}{{ b }}{% endmacro %}{{ m(1, 2, 3) }}",
    "{% macro m(a, b=2) %}{{ a }}{{ b }}{% endmacro %}{{ m(1, c=3) }}",
    "{% macro m(a, b=2) %}{{ a }}-{{ b }}{% endmacro %}{{ m(1) }}|{{ m(b=5, a=4) }}|{{ m() }}|{{ m(a=1, b=none) }}",
    "{% macro m(a, b=a * 2) %}{{ a }}-{{ b }}{% endmacro %}{{ m(3) }}",
    "{% macro m() %}{{ varargs }}{{ kwargs }}{% endmacro %}{{ m(1, 2, k=3) }}",
    "{% macro m() %}[{{ caller(1, 2) }}]{% endmacro %}{% call(a, b) m() %}{{ a + b }}{% endcall %}",
    "{% macro m(x) %}{{ caller() }}{{ x }}{% endmacro %}{% call m('!') %}body{% endcall %}",
    "{% macro r(n) %}{{ n }}{% if n > 0 %}{{ r(n - 1) }}{% endif %}{% endmacro %}{{ r(4) }}",
    "{% set x = 1 %}{% macro m() %}{{ x }}{% endmacro %}{% set x = 2 %}{{ m() }}",
    "{% set x = 1 %}{% for i in [1, 2] %}{% set x = x + i %}{{ x }}{% endfor %}|{{ x }}",
    "{% if true %}{% set y = 5 %}{% endif %}{{ y }}",
    "{% set a, b = 1, 2 %}{{ a }}{{ b }}|{% set c, = [9] %}{{ c }}",
    "{% set ns = namespace(a=1) %}{% for i in range(3) %}{% set ns.a = ns.a * 2 %}{% endfor %}{{ ns.a }}|{{ ns }}",
    "{% set ns = namespace({'x': 1}, y=2) %}{{ ns.x }}{{ ns.y }}{{ ns.z }}|{{ ns['x'] }}",
    "{% set d2 = {} %}{% set d2.x = 1 %}", "{% set x %}a{{ 1 }}b{% endset %}[{{ x }}]",
    "{% set x | upper %}abc{% endset %}{{ x }}", "{% with %}{% set w = 1 %}{{ w }}{% endwith %}{{ w }}",
    "{% for i in range(3) %}{% for j in range(3) %}{% if j == 1 %}{% break %}{% endif %}{{ i }}{{ j }} {% endfor %}{% endfor %}",
    "{% for m in messages %}{{ loop.index }}{{ loop.previtem }}|{{ loop.nextitem }}{% endfor %}",
    "{% for i in [1, 2, 3] if i != 2 %}{{ loop.index }}/{{ loop.length }}:{{ i }} {% endfor %}",
    "{% for i in [] %}x{% else %}empty{% endfor %}|{% for i in [0] if i %}x{% else %}filtered{% endfor %}",
    "{% for k, v in d.items() %}{{ k }}={{ v }};{% endfor %}|{% for k in d %}{{ k }}{% endfor %}",
    "{% for c in 'héllo' %}{{ c }}.{% endfor %}", "{{ loop }}|{{ loop is defined }}",
    "{% for a in [1, 2] %}{% for b in [3] %}{{ loop.index }}{{ loop.length }}{% endfor %}{{ loop.last }}{% endfor %}",
    # syntax errors (line numbers)
    "line1\n{% if %}", "{% for %}", "{{ 1 + }}", "a\n{% endfor %}", "{% if x %}\nopen", "{{ x | nofilter }}",
    "{{ x is notest }}", "{% unknown %}", "{{ 'unterminated }}", "{{ (1, 2 }}", "{% set 1 = 2 %}", "{# open",
    "{% for x in y %}{% endif %}", "{{ x }", "{% macro m(a=1, b) %}{% endmacro %}", "{{ }}", "{% break %}",
    # whitespace control
    "a  \n  {% if true %}\n  b\n  {% endif %}\n  c", "{{- ' x ' -}}  y  {{- ' z ' }}", "  {#- c -#}  y",
    "x\n    {%+ if true %}y{% endif %}", "{% raw -%}  a {{ b }}  {%- endraw %}|", "a\n", "a\r\nb\rc\n\n",
    "{% if true %}  \n{% endif %}z", "{{ 'a' }}\n{{ 'b' }}\n", "  {% if true %}x{% endif %}  \n  y",
    "{% if true -%}\n\n  x  \n{%- endif %}", "{%- if true +%}\n y{% endif %}", "t {# c #}\n u", "  {# c #}\n  v",
    "{{ 'a' -}}\n\n{{- 'b' }}", "{% raw %}{% endraw %}{% raw %}\n x{% endraw %}",
    "{% for i in [1, 2] %}\n  {{ i }}\n{% endfor %}",
    # literals, strings, repr
    "{{ '\\u00e9\\x41\\n\\t|\\d|\\q|\\'|\"' }}|{{ 'a' 'b' \"c\" }}|{{ \"it's\" }}",
    "{{ ['a\\'b', 'a\"b', 'a\\'\"b', '\\x00', '\\u200b', 'é', '\\n', '\\\\', '\\x7f', '\\xa0'] }}",
    "{{ {1: 'a', none: 2, true: 3, 1.5: [], (1, 2): ()} }}|{{ (1,) }}|{{ () }}|{{ [1.0, -0.5, 1e-10, 1e22] }}",
    "{{ messages[0] }}|{{ d }}|{{ items_list[3] }}|{{ [nothing, flag, num, flt] }}",
    "{{ 'héllo'[1:3] }}|{{ '😀x' | length }}|{{ 'ß' | upper }}|{{ 'ÀÉ' | lower }}|{{ 'abc'[::-1] }}|{{ 'abcdef'[-2:0:-2] }}",
    "{{ 'x'.center(6, '*') }}|{{ '{:>5}|{:<4}|{:^5}'.format('a', 'b', 'c') }}|{{ '{:.2f}|{:5d}|{!r}'.format(3.14159, 42, 'q') }}",
    "{{ '%5.1f|%-4s|%03d|%x|%r|%%' % (3.14159, 'a', 7, 255, 'q') }}|{{ '%s' % 'solo' }}|{{ '%s and %s' % [1, 2] }}",
    "{{ 'a\\tb  c\\n'.split() }}|{{ '  a  '.strip() }}|{{ '\\u00a0x\\u3000'.strip() }}|{{ 'aXbXc'.split('X', 1) }}|{{ 'abc'.startswith(('x', 'a')) }}",
    "{{ ',a,,b,'.split(',') }}|{{ 'a b c'.rsplit(None, 1) }}|{{ 'xxaxx'.strip('x') }}|{{ 'ab'.split('') }}",
    "{{ 'Hello World'.swapcase() }}|{{ 'hello'.capitalize() }}|{{ \"they're bill's\".title() }}|{{ 'x1y2'.isalnum() }}|{{ '12'.isdigit() }}|{{ ''.isdigit() }}",
    "{{ 'abcabc'.find('c') }}|{{ 'abcabc'.rfind('c') }}|{{ 'héllo'.find('l') }}|{{ 'abc'.index('z') }}",
    "{{ 'a-b'.replace('-', '') }}|{{ 'aaa'.replace('a', 'b', 2) }}|{{ 'ab'.replace('', '.') }}|{{ 'a'.zfill(3) }}|{{ '-5'.zfill(4) }}",
    "{{ 'a=b=c'.partition('=') }}|{{ 'a=b=c'.rpartition('=') }}|{{ 'prefix-x'.removeprefix('prefix-') }}",
    "{{ text.strip() }}|{{ text | trim }}|{{ text | upper }}|{{ text | title }}|{{ text | length }}|{{ text[2:7] }}",
    "{{ 'l1\\nl2\\r\\nl3\\n'.splitlines() }}|{{ 'l1\\nl2'.splitlines(true) }}|{{ 'a,b'.split(',') | join('+') }}",
    # tojson
    "{{ d | tojson }}|{{ d | tojson(indent=2) }}|{{ d | tojson(indent='\\t', sort_keys=true) }}",
    "{{ d | tojson(separators=(',', ':')) }}|{{ {1: 2, none: 3} | tojson }}|{{ (1, 'a') | tojson }}|{{ 'é\\u2028<>&\\'' | tojson }}",
    "{{ ['😀', '\\x1f\\x7f'] | tojson(ensure_ascii=true) }}|{{ [] | tojson(indent=2) }}|{{ {} | tojson(indent=2) }}|{{ [[]] | tojson(indent=0) }}",
    "{{ 3.0 | tojson }}|{{ 1e100 | tojson }}|{{ -0.0 | tojson }}|{{ nothing | tojson }}|{{ flag | tojson }}|{{ 'x' | tojson(2) }}",
    # tests with arguments
    "{{ 9 is divisibleby(3) }}|{{ 9 is divisibleby 4 }}|{{ nothing is sameas none }}|{{ 3 is equalto 3 }}|{{ 3 is eq(4) }}",
    "{{ num is odd }}|{{ flt is odd }}|{{ 'x' is odd }}", "{{ messages is sequence }}|{{ d is sequence }}|{{ num is sequence }}|{{ x is iterable }}|{{ x is callable }}",
    "{{ true is number }}|{{ true is integer }}|{{ 1.0 is integer }}|{{ 'lower' is lower }}|{{ 'Mixed' is upper }}|{{ 'a' is in 'abc' }}",
    "{{ 'upper' is filter }}|{{ 'nope' is filter }}|{{ 'odd' is test }}|{{ range is callable }}|{{ d is mapping }}|{{ nothing is mapping }}",
    # filters
    "{{ ['a', 'b'] | map('upper') | list }}|{{ [x, 'b'] | map('default', 'z') | list }}|{{ [1, 2, 3, 4] | select('odd') | list }}|{{ [1, none, 2] | reject('none') | list }}",
    "{{ items_list | selectattr('a') | map(attribute='n') | list }}|{{ items_list | selectattr('a', 'gt', 1) | list | length }}|{{ items_list | rejectattr('a', 'defined') | list }}",
    "{{ items_list | map(attribute='a', default=0) | list }}|{{ items_list | map(attribute='a') | list }}|{{ items_list[:3] | sum(attribute='a') }}|{{ items_list[:3] | sort(attribute='a') | map(attribute='a') | join }}",
    "{{ items_list | unique(attribute='n') | list | length }}|{{ d | dictsort(by='value') }}|{{ [1, 2, 3] | batch(2, 'x') | list }}|{{ d | first }}|{{ 'abc' | list }}",
    "{{ [1, 2] | join }}|{{ items_list | join(', ', attribute='n') }}|{{ d | attr('b') }}|{{ [1, 'a'] | string }}|{{ nothing | default(1) }}|{{ nothing | d(1, true) }}",
    "{{ d | length }}|{{ 'abc' | count }}|{{ (1, 2) | reverse | list }}|{{ 'x' | abs }}", "{{ '0x1A' | int(0, 16) }}|{{ '1A' | int(0, 16) }}|{{ '  7 ' | int }}|{{ '1e3' | float }}|{{ '1_000' | int }}|{{ 'nan' | float }}|{{ true | int }}",
    "{{ -2.5 | round }}|{{ 1.23456 | round(3) }}|{{ 2.675 | round(2) }}|{{ 15 | round(-1) }}|{{ 1.5 | round(0, 'floor') }}|{{ nothing | trim }}|{{ 5 | upper }}",
    "{{ 'aaa' | replace('a', 'b', 2) }}|{{ 'x\\ny' | indent('> ') }}|{{ 'x\\ny' | indent(first=true, width=1) }}|{{ 'one two three four' | truncate(9) }}|{{ 'one two three four' | truncate(9, true) }}",
    "{{ 'a b,c' | wordcount }}|{{ '%(a)s' | format(a=1) }}|{{ 'x' | center(5) }}|{{ 5 | escape }}|{{ [1, 'a'] | pprint }}|{{ d | items | list }}",
    "{{ [3, 1, 2] | sort | join(',') }}|{{ ['b', 'a'] | max }}|{{ [] | max }}|{{ ['B', 'a'] | min }}|{{ [1, 2] | last }}|{{ {} | first }}",
    # dict/list methods
    "{{ d.items() | list }}|{{ d.get('a') }}|{{ d.get('q') }}|{{ d.get('q', 'dv') }}|{{ d.keys() | list }}|{{ d.values() | list | length }}|{{ d.copy() }}",
    "{{ [1, 2, 1].count(1) }}|{{ [1, 2].index(2) }}|{{ [1, 2].index(5) }}",
    # globals
    "{{ raise_exception('custom failure') }}", "line1\nline2 {{ raise_exception('Line ' ~ 2) }}", "{{ raise_exception(42) }}",
    "{{ strftime_now('%Y-%m-%d %H:%M:%S %A %B %j %p %a %b %y %d') }}|{{ strftime_now('') }}|{{ strftime_now('%%') }}",
    "{{ namespace(a=1).a }}|{{ dict(a=1, b=[2]) }}|{{ dict({'x': 1}, y=2) }}",
    "{% if messages %}has{% endif %}|{% if [] %}no{% else %}empty{% endif %}|{% if '' or 0 or 0.0 or {} or none %}t{% else %}f{% endif %}",
    "{{ nothing | string }}|{{ flag | string }}|{{ 1.0 | string }}|{{ none }}|{{ true }}|{{ 10 / 2 }}|{{ 10 // 2 }}",
    "{{ bos_token }}|{{ eos_token }}|{{ add_generation_prompt }}|{{ tools }}|{{ documents }}|{{ tools is none }}",
    # generation inside loops and conditionals
    "{% for m in messages %}<{{ m.role }}>{% if m.role == 'assistant' %}{% generation %}{{ m.content }}!{% endgeneration %}{% endif %}{% endfor %}{% generation %}tail{% endgeneration %}",
    "{% generation %}{% set g = 1 %}{{ g }}{% endgeneration %}{{ g }}",
]


def template_line(error):
    """The template line Jinja's rewritten traceback points at, if any."""
    import traceback
    lines = [f.lineno for f in traceback.extract_tb(error.__traceback__) if f.filename == "<template>"]
    return lines[-1] if lines else None


def build_snippets():
    rows = []
    for template in SNIPPETS:
        variables = dict(SNIPPET_VARS)
        messages = variables.pop("messages")
        row = {"template": template}
        try:
            rendered, _ = ctu.render_jinja_template(conversations=[messages], chat_template=template,
                                                    bos_token="<s>", eos_token="</s>", **variables)
            row["text"] = rendered[0]
            if "generation" in template:
                compiled = ctu._compile_jinja_template(template)
                text, spans = ctu._render_with_assistant_indices(compiled, messages, None, None, False,
                                                                 bos_token="<s>", eos_token="</s>", **variables)
                row["spans"] = [[len(text[:b].encode()), len(text[:e].encode())] for b, e in spans]
        except Exception as e:  # noqa: BLE001 - errors are goldens too
            row["error"] = str(e)
            row["error_type"] = type(e).__name__
            row["line"] = getattr(e, "lineno", None) or template_line(e)
        rows.append(row)
    return rows


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
    snippets = build_snippets()
    manifest["snippet_variables"] = SNIPPET_VARS
    with open(OUT / "snippets.jsonl", "w") as f:
        for row in snippets:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"snippets.jsonl: {len(snippets)} snippets, {sum('error' in r for r in snippets)} errors")
    (OUT / "manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
    for fname, rows in [("cases.jsonl.xz", cases), ("expected.jsonl.xz", expected)]:
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
        (OUT / fname).write_bytes(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME))
        print(f"{fname}: {len(rows)} rows, {len(data)} bytes -> {(OUT / fname).stat().st_size} bytes xz")


if __name__ == "__main__":
    main()
