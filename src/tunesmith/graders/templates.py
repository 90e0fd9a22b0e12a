"""Templates in grader fields, as OpenAI resolves them: `{{item.x}}` reads the dataset row,
`{{sample.output_text}}` the model's answer, `{{sample.output_json.x}}` a field of the answer
read as JSON. Paths go as deep as the data (`{{item.meta.tags.0}}`); a value that is not a
string is written as JSON. A field that is not there is a `TemplateError` naming it.

    python -c "from tunesmith.graders.templates import render, build_sample; \
print(render('{{item.a}} / {{sample.output_text}}', build_sample('hi'), {'a': 1}))"
"""

from __future__ import annotations

import json
import re
from typing import Any

from tunesmith.errors import DataError

TEMPLATE = re.compile(r"\{\{([^{}]*)\}\}")
"""`{{ path }}`; the spaces are stripped in code. (A pattern that matched them, with a lazy
group between two runs of spaces, backtracked in cubic time on an unclosed `{{` and spaces: 4,000 of
them took 81 s.) A match never crosses a brace, so scanning any text is linear."""
SAMPLE_FIELDS = ("output_text", "output_json")
"""What the `sample` namespace holds for a text answer."""


class TemplateError(DataError):
    """A template names a field the sample or item does not have."""


def build_sample(output_text: str) -> dict[str, Any]:
    """The `sample` namespace for an answer: its text, and its JSON when it parses (else None)."""
    try:
        output_json = json.loads(output_text)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser goes
        output_json = None
    return {"output_text": output_text, "output_json": output_json}


def template_paths(text: str) -> list[str]:
    """Every `{{...}}` path in `text`, in order."""
    return [m.group(1).strip() for m in TEMPLATE.finditer(text)]


def check_template(text: str) -> str | None:
    """A sentence for the first path that can never resolve (wrong namespace or sample field), or None."""
    for path in template_paths(text):
        head, _, rest = path.partition(".")
        if head == "sample" and rest.split(".")[0] not in SAMPLE_FIELDS:
            return f"{{{{{path}}}}}: the sample has {', '.join(SAMPLE_FIELDS)}"
        if head not in ("item", "sample") or not rest:
            return f"{{{{{path}}}}}: a template reads item.<field> or sample.<field>"
    return None


def lookup(path: str, sample: dict[str, Any], item: Any) -> Any:
    """The value at a dotted path such as item.answer or sample.output_json.label."""
    head, _, rest = path.partition(".")
    if head not in ("item", "sample") or not rest:
        raise TemplateError(f"template {{{{{path}}}}}: a template reads item.<field> or sample.<field>")
    value: Any = sample if head == "sample" else item
    walked = head
    for key in rest.split("."):
        if isinstance(value, dict) and key in value:
            value = value[key]
        elif isinstance(value, list) and _is_index(key) and int(key) < len(value):
            value = value[int(key)]
        else:
            have = f"; it has {', '.join(map(str, value))}" if isinstance(value, dict) and value else ""
            what = "is not JSON" if walked == "sample.output_json" and value is None else f"has no field '{key}'{have}"
            raise TemplateError(f"template {{{{{path}}}}}: {walked} {what}")
        walked += f".{key}"
    return value


def _is_index(key: str) -> bool:
    """Whether a path part indexes a list: ASCII digits that int() takes ('²' is a digit to
    isdigit, and 5,000 digits are over int()'s limit)."""
    return key.isascii() and key.isdigit() and len(key) <= 18


def render(text: str, sample: dict[str, Any], item: Any) -> str:
    """`text` with every template replaced by its value."""
    def value(match: re.Match) -> str:
        found = lookup(match.group(1).strip(), sample, item)
        try:
            return found if isinstance(found, str) else json.dumps(found, ensure_ascii=False)
        except (ValueError, RecursionError):  # NaN is JSON here, so only a value nested too deep
            raise TemplateError(f"template {{{{{match.group(1).strip()}}}}}: the value is nested too deep to "
                                "write as text") from None

    return TEMPLATE.sub(value, text)
