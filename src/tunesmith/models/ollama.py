"""An Ollama `Modelfile` whose TEMPLATE renders exactly what the model's chat template does.

Ollama does not run Jinja: its TEMPLATE is a Go template. Translating arbitrary Jinja is
not possible, so a template family is recognised by *rendering* the Jinja template on probe
conversations and comparing, string for string, with what the family's Go template gives
(simulated here in Python). Only when every probe matches is the TEMPLATE written;
otherwise the Modelfile says so, and the caller warns.

    python -c "from tunesmith.models.ollama import chatml_system_prompt; help(chatml_system_prompt)"
"""

from __future__ import annotations

from typing import Any

_PROBES: list[list[dict[str, str]]] = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}],
    [
        {"role": "user", "content": "First question"},
        {"role": "assistant", "content": "First answer"},
        {"role": "user", "content": "Second\nquestion"},
    ],
    [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "U1"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "U2"},
    ],
]

# Go template for ChatML, in Ollama's `.Messages` form. A final assistant message is left
# open (Ollama continues it); otherwise the assistant header is the generation prompt.
# Ollama passes system messages both in .Messages and joined in .System; older versions
# passed them in .System only, which the first block covers.
CHATML_GO_TEMPLATE = """{{- if and .System (ne (index .Messages 0).Role "system") }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 -}}
<|im_start|>{{ .Role }}
{{ .Content }}
{{- if or (ne .Role "assistant") (not $last) }}<|im_end|>
{{ end }}
{{- if and $last (ne .Role "assistant") }}<|im_start|>assistant
{{ end }}
{{- end }}"""

CHATML_END_OF_TURN = "<|im_end|>"


def _render(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool) -> str | None:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception:  # a template that rejects a probe is simply not this family
        return None


def _chatml(messages: list[dict[str, str]], default_system: str | None) -> str:
    """What CHATML_GO_TEMPLATE renders once Ollama has put the Modelfile's SYSTEM first."""
    if default_system is not None and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": default_system}, *messages]
    turns = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return turns + "<|im_start|>assistant\n"


def chatml_system_prompt(tokenizer: Any) -> tuple[bool, str | None]:
    """(is ChatML, the default system prompt the template inserts or None).

    ChatML here means: every probe, rendered with the generation prompt, equals
    `_chatml(probe, default_system)` exactly.
    """
    first = _render(tokenizer, _PROBES[0], add_generation_prompt=True)
    if first is None:
        return False, None
    default_system = None
    head = "<|im_start|>system\n"
    if first.startswith(head):
        default_system = first[len(head):].split(CHATML_END_OF_TURN, 1)[0]
    for probe in _PROBES:
        if _render(tokenizer, probe, add_generation_prompt=True) != _chatml(probe, default_system):
            return False, None
    return True, default_system


def _quote(text: str) -> str:
    if '"""' in text:
        raise ValueError("text contains triple quotes")
    return '"""' + text + '"""'


def build_modelfile(gguf_name: str, tokenizer: Any) -> tuple[str, str | None]:
    """(Modelfile text, warning or None) for the GGUF file `gguf_name` beside it."""
    lines = [
        "# Ollama Modelfile written by `tunesmith export`.",
        f"# Use it with: ollama create my-model -f Modelfile && ollama run my-model",
        f"FROM ./{gguf_name}",
    ]
    is_chatml, default_system = chatml_system_prompt(tokenizer)
    if not is_chatml:
        lines.append("# No TEMPLATE: the chat template is not one tunesmith can translate to Ollama's Go")
        lines.append("# template faithfully; write one by hand from tokenizer.chat_template in the GGUF.")
        warning = (
            "the chat template is not ChatML, so the Modelfile has no TEMPLATE; Ollama will guess one "
            "from the GGUF's metadata, check it before relying on it"
        )
        return "\n".join(lines) + "\n", warning
    lines.append(f"TEMPLATE {_quote(CHATML_GO_TEMPLATE)}")
    if default_system is not None:
        # The chat template inserts this system prompt when a conversation has none; Ollama
        # does the same with SYSTEM, so prompts match what the model was trained on.
        lines.append(f"SYSTEM {_quote(default_system)}")
    lines.append(f'PARAMETER stop "{CHATML_END_OF_TURN}"')
    return "\n".join(lines) + "\n", None
