"""The Berkeley Function Calling Leaderboard's live_simple and live_multiple categories (the
PyPI wheel `bfcl-eval`, Apache-2.0) as OpenAI fine-tuning lines with tools and assistant
tool_calls: a training file and a held-out file (every fifth row, by id). Only these two
categories are ever written: BFCL's others stay an unseen test.

    pip download --no-deps bfcl-eval -d /tmp/bfcl
    .venv/bin/python bench/bfcl_data.py /tmp/bfcl/bfcl_eval-*.whl --out data/bfcl
    tunesmith eval --data data/bfcl/heldout.jsonl --metric tool_call --max-new-tokens 96
    tunesmith train --data data/bfcl/train.jsonl ...

BFCL's answers list the acceptable values of each argument; the first is written ("" and
None, the argument left out or at its default, are left out). Lines whose answer still does
not validate against its own parameters (BFCL's 'dontcare' for an enum, ...) are skipped. Function names with a dot (`uber.ride`) become
`uber_ride`, as BFCL itself renames them for OpenAI's API, and BFCL's own types (`dict`,
`float`, `tuple`, `any`) become JSON Schema's.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import zipfile
from pathlib import Path
from typing import Any, Iterator

CATEGORIES = ("live_simple", "live_multiple")
"""The training side; never any other category."""
TYPES = {"dict": "object", "float": "number", "tuple": "array"}


def schema(node: Any) -> Any:
    """BFCL's parameter schema as JSON Schema."""
    if isinstance(node, list):
        return [schema(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key == "type":
            if value == "any":
                continue
            out[key] = TYPES.get(value, value)
        elif key in ("properties",):
            out[key] = {k: schema(v) for k, v in value.items()}
        elif key == "optional":
            continue
        else:
            out[key] = schema(value)
    return out


def _values(params: dict[str, list[Any]]) -> dict[str, Any]:
    """Each argument's first acceptable value, nested objects too; "" (may be left out) and
    None (the parameter's null default) are left out."""
    out = {}
    for key, options in params.items():
        chosen = next((v for v in options if v not in ("", None)), None) if isinstance(options, list) else options
        if chosen is None:
            continue
        out[key] = _values(chosen) if isinstance(chosen, dict) else chosen
    return out


def valid(obj: dict[str, Any]) -> bool:
    """Whether every call's arguments validate against its function's parameters (BFCL has a
    few answers that do not, e.g. a required argument left out); those lines are skipped."""
    import jsonschema

    params = {t["function"]["name"]: t["function"]["parameters"] for t in obj["tools"]}
    try:
        for call in obj["messages"][-1]["tool_calls"]:
            jsonschema.validate(json.loads(call["function"]["arguments"]), params[call["function"]["name"]])
    except (jsonschema.ValidationError, jsonschema.SchemaError, KeyError):
        return False
    return True


def line(row: dict[str, Any], answer: dict[str, Any]) -> dict[str, Any]:
    tools = [{"type": "function", "function": {"name": f["name"].replace(".", "_"), "description": f.get(
        "description", ""), "parameters": schema(f["parameters"])}} for f in row["function"]]
    calls = []
    for i, truth in enumerate(answer["ground_truth"]):
        (name, params), = truth.items()
        arguments = _values(params)
        calls.append({"id": f"call_{i}", "type": "function",
                      "function": {"name": name.replace(".", "_"), "arguments": json.dumps(arguments)}})
    messages = list(row["question"][0]) + [{"role": "assistant", "content": None, "tool_calls": calls}]
    return {"tools": tools, "messages": messages}


def read(wheel: Path, category: str) -> Iterator[tuple[str, dict[str, Any]]]:
    with zipfile.ZipFile(wheel) as z:
        rows = z.read(f"bfcl_eval/data/BFCL_v4_{category}.json").decode().splitlines()
        answers = z.read(f"bfcl_eval/data/possible_answer/BFCL_v4_{category}.json").decode().splitlines()
    by_id = {a["id"]: a for a in map(json.loads, filter(None, answers))}
    for row in map(json.loads, filter(None, rows)):
        yield row["id"], line(row, by_id[row["id"]])


def heldout(row_id: str) -> bool:
    return int(hashlib.sha256(row_id.encode()).hexdigest(), 16) % 5 == 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("wheel", type=Path, help="the bfcl-eval wheel (pip download --no-deps bfcl-eval)")
    parser.add_argument("--out", type=Path, default=Path("data/bfcl"))
    parser.add_argument("--max-functions", type=int, default=None,
                        help="keep only lines offering at most this many functions (1: the short, one-function "
                             "lines, a task that trains in minutes here)")
    args = parser.parse_args()
    if not args.wheel.is_file():
        parser.error(f"{args.wheel} is not a file; get the wheel with: pip download --no-deps bfcl-eval -d /tmp/bfcl")
    args.out.mkdir(parents=True, exist_ok=True)
    counts = {"train": 0, "heldout": 0, "skipped": 0}
    with open(args.out / "train.jsonl", "w") as train, open(args.out / "heldout.jsonl", "w") as held:
        for category in CATEGORIES:
            for row_id, obj in read(args.wheel, category):
                if not valid(obj):
                    counts["skipped"] += 1
                    continue
                if args.max_functions is not None and len(obj.get("tools", [])) > args.max_functions:
                    continue
                side = "heldout" if heldout(row_id) else "train"
                (held if side == "heldout" else train).write(json.dumps(obj, ensure_ascii=False) + "\n")
                counts[side] += 1
    print(f"wrote {counts['train']} training and {counts['heldout']} held-out lines to {args.out} "
          f"({counts['skipped']} skipped: their answers do not validate against their own parameters)")


if __name__ == "__main__":
    main()
