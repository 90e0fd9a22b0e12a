"""Helpers for the engine tests (imported by name, like tests/evaluate's helpers): waiting
for the engine to go idle, a JSON schema with every kind of constraint structured outputs
hold, and a check that a (cut) answer starts a match of a constraint."""

from __future__ import annotations

import time

TICKET = {
    "type": "object",
    "properties": {
        "intent": {"type": "string", "enum": ["card_arrival", "lost_or_stolen_card", "refund"]},
        "confidence": {"type": "number"},
        "count": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 3},
        "refund": {"type": ["boolean", "null"]},
        "customer": {"$ref": "#/$defs/customer"},
    },
    "required": ["intent", "confidence", "count", "tags", "refund", "customer"],
    "additionalProperties": False,
    "$defs": {"customer": {"type": "object", "properties": {"name": {"type": "string"}, "vip": {"type": "boolean"}},
                           "required": ["name"], "additionalProperties": False}},
}


def wait_until_idle(engine, timeout_s: float = 20.0) -> dict:
    deadline = time.time() + timeout_s
    while True:
        stats = engine.stats()
        if (stats["running"] == 0 and stats["waiting"] == 0) or time.time() > deadline:
            return stats
        time.sleep(0.05)


def starts_a_match(tokenizer, constraint, text: str) -> bool:
    """Is `text` the start of (or all of) an answer `constraint` allows? (llguidance reads it
    afresh, so a cut answer can be checked as well as a whole one.)"""
    import llguidance
    import llguidance.hf

    matcher = llguidance.LLMatcher(llguidance.hf.from_tokenizer(tokenizer), constraint.grammar(), log_level=0)
    return matcher.consume_tokens(tokenizer(text, add_special_tokens=False)["input_ids"]) and not matcher.is_error()
