"""What structured outputs cost, and what they buy: the same prompts answered by
SmolLM2-135M-Instruct as free text, with response_format json_object, with a json_schema and
held to a choice of labels, through the serving engine (llguidance's mask in the batched
step). Reports decode tokens/s and the share of answers that parse (and validate).

Then one hostile schema beside free text: a free-text answer's tokens/s alone, beside
another free-text row, and beside a row held to a 1,000-value enum or a 10-deep schema.

    .venv/bin/python bench/json_mode.py                 # 6 answers per mode, 96 tokens at most
    .venv/bin/python bench/json_mode.py --answers 12 --threads 1
    .venv/bin/python bench/json_mode.py --hostile-only --repeats 5
"""

from __future__ import annotations

import argparse
import json
import threading
import time

PROMPTS = [
    "Give the name and age of Alice, who is 30, as JSON.",
    "Classify this support message as JSON: 'Someone stole my card, please block it now!'",
    "Return a JSON object with the city and country of Paris.",
]
TICKET = {"type": "object", "properties": {
    "intent": {"type": "string", "enum": ["card_arrival", "lost_or_stolen_card", "exchange_rate"]},
    "urgent": {"type": "boolean"}}, "required": ["intent", "urgent"], "additionalProperties": False}
LABELS = ["card_arrival", "lost_or_stolen_card", "exchange_rate"]
ENUM_1000 = {"type": "object", "properties": {"label": {"enum": [f"label_{i:04d}" for i in range(1000)]}},
             "required": ["label"], "additionalProperties": False}


def deep(levels: int) -> dict:
    schema: dict = {"type": "string"}
    for i in range(levels):
        schema = {"type": "object", "properties": {f"k{i}": schema}, "required": [f"k{i}"],
                  "additionalProperties": False}
    return schema


def valid(text: str, kind: str, spec) -> bool:
    if kind == "choice":
        return text in spec
    try:
        value = json.loads(text)
    except ValueError:
        return False
    if spec is None or spec == {"type": "object"}:
        return isinstance(value, dict)
    import jsonschema

    try:
        jsonschema.validate(value, spec)
    except jsonschema.ValidationError:
        return False
    return True


def modes(args: argparse.Namespace, engine, Constraint, SamplingParams) -> None:
    table = [("free text", None, "json", None), ("json_object", Constraint.json_schema({"type": "object"}), "json",
             {"type": "object"}), ("json_schema (ticket)", Constraint.json_schema(TICKET), "json", TICKET),
             ("choice (3 labels)", Constraint.choice(LABELS), "choice", LABELS)]
    print("| mode | answers | tokens | wall s | tokens/s | parse (and validate) |\n|---|---:|---:|---:|---:|---:|")
    for name, constraint, kind, spec in table:
        if constraint is not None:
            engine.compile(constraint)  # once per request in serve; not what is timed here
        tokens, ok, t0 = 0, 0, time.perf_counter()
        for i in range(args.answers):
            prompt = engine.render_chat([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}])
            temperature, seed = (0.0, None) if i < len(PROMPTS) else (0.8, i)
            text, _, n = engine.generate(prompt, engine.base_id,
                                         SamplingParams(args.max_tokens, temperature, 1.0, (), seed, constraint))
            tokens += n
            ok += valid(text, kind, spec)
        wall = time.perf_counter() - t0
        print(f"| {name} | {args.answers} | {tokens} | {wall:.1f} | {tokens / wall:.1f} | {ok}/{args.answers} |",
              flush=True)


def free_row_speed(engine, SamplingParams, beside=None, max_tokens: int = 64) -> tuple[float, int]:
    """tokens/s of one free-text answer of exactly max_tokens tokens (no stop), decoded
    alone or beside another row with `beside` params, which is submitted again whenever it
    ends, so the batch holds two rows for the whole answer (a free-text neighbour may end
    its turn after a few tokens; a held one cannot), and cancelled when the free one ends."""
    prompt = engine.render_chat([{"role": "user", "content": "Tell me a long story about a dragon."}])
    free = SamplingParams(max_tokens, 1.0, 1.0, (), 7)
    done = threading.Event()
    other_ended = threading.Event()
    others: list = []
    keeper = None
    if beside is not None:
        # A free neighbour is asked for a story too (it may still end early, then it is prefilled
        # again, which a held row with minItems 20 never needs); a held one is asked for JSON.
        ask = prompt if beside.constraint is None else engine.render_chat(
            [{"role": "user", "content": "Answer in JSON about the dragon."}])

        def on_other(ev) -> None:
            if ev.finish_reason:
                other_ended.set()

        def keep_beside() -> None:  # outside the engine thread: submit again while the free row runs
            while not done.is_set():
                other_ended.clear()
                others.append(engine.submit(ask, engine.base_id, beside, on_other))
                while not (other_ended.wait(0.01) or done.is_set()):
                    pass

        keeper = threading.Thread(target=keep_beside, daemon=True)
        keeper.start()
        while not others:
            time.sleep(0.001)
    t0 = time.perf_counter()
    result = {}

    def on_event(ev) -> None:
        if ev.finish_reason:
            result["n"], result["t"] = ev.completion_tokens, time.perf_counter() - t0
            done.set()

    engine.submit(prompt, engine.base_id, free, on_event)
    done.wait()
    if keeper is not None:
        keeper.join()
        for handle in others:
            handle.cancel()
    return result["n"] / result["t"], len(others)


def hostile(args: argparse.Namespace, engine, Constraint, SamplingParams) -> None:
    long = 10 * args.max_tokens  # the other row outlives the free one
    rows = [("alone", None), ("beside a free-text row", SamplingParams(long, 1.0, 1.0, (), 3))]
    engine.compile(Constraint.json_schema({"type": "object"}))  # the grammar library's first use, not timed
    # Arrays of at least 20, so the held row is still generating when the free one ends.
    for name, schema in (("1,000-value enum", ENUM_1000), ("10-deep schema", deep(9))):
        constraint = Constraint.json_schema({"type": "array", "items": schema, "minItems": 20})
        t0 = time.perf_counter()
        engine.compile(constraint)
        print(f"compile {name}: {(time.perf_counter() - t0) * 1000:.0f} ms")
        rows.append((f"beside a row held to a {name}", SamplingParams(long, 1.0, 1.0, (), 3, constraint)))
    print(f"\n| free-text row (64 tokens, sampled; best of {args.repeats}) | tokens/s | vs alone "
          "| vs beside a free-text row | neighbour's answers started |\n|---|---:|---:|---:|---:|")
    alone = free_beside = None
    for name, beside in rows:
        speed, started = max(free_row_speed(engine, SamplingParams, beside) for _ in range(args.repeats))
        if beside is None:
            alone = speed
        if name == "beside a free-text row":
            free_beside = speed
        vs_alone = f"{speed / alone:.2f}x" if beside is not None else ""
        ratio = f"{speed / free_beside:.2f}x" if free_beside and beside is not None else ""
        print(f"| {name} | {speed:.1f} | {vs_alone} | {ratio} | {started if beside is not None else ''} |",
              flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--answers", type=int, default=6, help="answers per mode (greedy, then seeds 1..)")
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--hostile-only", action="store_true", help="skip the modes' table")
    parser.add_argument("--repeats", type=int, default=3, help="free-text answers per neighbour (the best is kept)")
    args = parser.parse_args()

    import torch

    from tunesmith.generate.constraints import Constraint
    from tunesmith.generate.engine import LocalEngine, SamplingParams

    if args.threads:
        torch.set_num_threads(args.threads)
    engine = LocalEngine.load(args.model)
    try:
        if not args.hostile_only:
            modes(args, engine, Constraint, SamplingParams)
        hostile(args, engine, Constraint, SamplingParams)
    finally:
        engine.close()


if __name__ == "__main__":
    main()
