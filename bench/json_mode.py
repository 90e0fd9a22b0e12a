"""What JSON mode costs, and what it buys: the same prompts answered by SmolLM2-135M-Instruct
as free text, with response_format json_object and with a json_schema, through the
serving engine. Reports decode tokens/s and the share of answers that `json.loads` reads
(and, with the schema, that validate).

    .venv/bin/python bench/json_mode.py                 # 6 answers per mode, 96 tokens at most
    .venv/bin/python bench/json_mode.py --answers 12 --threads 1
"""

from __future__ import annotations

import argparse
import json
import time

PROMPTS = [
    "Give the name and age of Alice, who is 30, as JSON.",
    "Classify this support message as JSON: 'Someone stole my card, please block it now!'",
    "Return a JSON object with the city and country of Paris.",
]
TICKET = {"type": "object", "properties": {
    "intent": {"type": "string", "enum": ["card_arrival", "lost_or_stolen_card", "exchange_rate"]},
    "urgent": {"type": "boolean"}}, "required": ["intent", "urgent"], "additionalProperties": False}


def valid(text: str, schema: dict | None) -> bool:
    try:
        value = json.loads(text)
    except ValueError:
        return False
    if schema is None or schema == {"type": "object"}:
        return isinstance(value, dict)
    import jsonschema

    try:
        jsonschema.validate(value, schema)
    except jsonschema.ValidationError:
        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--answers", type=int, default=6, help="answers per mode (greedy, then seeds 1..)")
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()

    import torch

    from tunesmith.generate.engine import LocalEngine, SamplingParams
    from tunesmith.generate.json_mode import ANY_OBJECT

    if args.threads:
        torch.set_num_threads(args.threads)
    engine = LocalEngine.load(args.model)
    try:
        modes = [("free text", None), ("json_object", ANY_OBJECT), ("json_schema (ticket)", TICKET)]
        print(f"| mode | answers | tokens | wall s | tokens/s | parse (and validate) |\n|---|---:|---:|---:|---:|---:|")
        for name, schema in modes:
            tokens, ok, t0 = 0, 0, time.perf_counter()
            for i in range(args.answers):
                prompt = engine.render_chat([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}])
                temperature, seed = (0.0, None) if i < len(PROMPTS) else (0.8, i)
                text, _, n = engine.generate(prompt, engine.base_id,
                                             SamplingParams(args.max_tokens, temperature, 1.0, (), seed, schema))
                tokens += n
                ok += valid(text, schema if schema is not None else ANY_OBJECT)
            wall = time.perf_counter() - t0
            print(f"| {name} | {args.answers} | {tokens} | {wall:.1f} | {tokens / wall:.1f} | {ok}/{args.answers} |")
    finally:
        engine.close()


if __name__ == "__main__":
    main()
