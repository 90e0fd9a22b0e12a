"""`tunesmith compare`: should I fine-tune? Prompting, retrieval and an adapter, measured.

On the same held-out examples: the base model zero-shot (a system prompt, plus the valid
labels for label tasks), few-shot (k fixed training examples as earlier chat turns),
retrieval few-shot (the k training examples nearest to each test input by BM25), the
fine-tuned adapter (given; `flows.compare` trains one on demand), and optionally a
teacher: any OpenAI-compatible endpoint asked each test example's own prompt, as
`tunesmith distill` asks it. For each: the metric, prompt tokens per request, latency per
request and the cost of a million requests.

    tunesmith compare --train train.csv --test test.csv --adapter runs/first --shots 5
    tunesmith compare --train distilled.jsonl --test test.jsonl --adapter runs/student \
        --teacher-model gpt-4o-mini --teacher-base-url https://api.openai.com/v1
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from tunesmith.data.example import Example, Message, split_example
from tunesmith.errors import UsageError
from tunesmith.evaluate.evaluation import (
    EvalResult,
    answer_format,
    evaluate_loaded,
    format_score,
    load_examples,
    run_system_prompt,
    with_system,
    write_eval,
)
from tunesmith.evaluate.metrics import pick_metric, score
from tunesmith.evaluate.retrieval import BM25
from tunesmith.generate.constraints import Constraint
from tunesmith.generate.remote import TeacherFailure, ask, build_client, gather_interruptible, run_coroutine
from tunesmith.models.inference import LoadedModel, check_weights, load_for_inference
from tunesmith.runs import COMPARE_FILE

DEFAULT_SYSTEM = "You are a precise assistant. Reply with the answer only, without explanation."
ZERO_SHOT, FEW_SHOT, RETRIEVAL, FINE_TUNED = "zero-shot", "few-shot", "retrieval few-shot", "fine-tuned"
TEACHER = "teacher"


@dataclass
class Strategy:
    name: str
    result: EvalResult
    price_per_million: float

    @property
    def main(self) -> tuple[str, float]:
        name = self.result.metrics["main_metric"]
        return name, self.result.metrics["scores"][name]

    @property
    def prompt_tokens(self) -> float:
        return self.result.metrics["prompt_tokens_per_example"]

    @property
    def tokens(self) -> float:
        return self.prompt_tokens + self.result.metrics["completion_tokens_per_example"]

    @property
    def cost_per_million_requests(self) -> float:
        # 1e6 requests x tokens/request x price/1e6 tokens
        return self.tokens * self.price_per_million

    def row(self) -> dict[str, Any]:
        m = self.result.metrics
        return {
            "name": self.name,
            "scores": m["scores"],
            "prompt_tokens_per_request": self.prompt_tokens,
            "completion_tokens_per_request": m["completion_tokens_per_example"],
            "latency_s_per_request": m["latency_s_per_example"],
            "cost_per_million_requests": self.cost_per_million_requests,
            "folder": _slug(self.name),
        }


@dataclass
class Comparison:
    strategies: list[Strategy]
    info: dict[str, Any]
    verdict: str
    out: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {**self.info, "strategies": [s.row() for s in self.strategies], "verdict": self.verdict}


def _slug(name: str) -> str:
    return name.replace(" ", "-")


# ----------------------------------------------------------------------------- prompts


def base_system(system: str | None, labels: Sequence[str] | None) -> str:
    text = system or DEFAULT_SYSTEM
    if labels:
        text += "\nAnswer with exactly one of these labels and nothing else: " + ", ".join(labels) + "."
    return text


def _turns(example: Example) -> list[Message]:
    """An example as plain chat turns without its system prompt: the shots of a prompt."""
    prompt, answer = split_example(example)
    return [m for m in prompt if m.role != "system"] + [Message("assistant", answer)]


def pick_shots(train: Sequence[Example], k: int, seed: int = 0) -> list[Example]:
    """k training examples, fixed by seed, with distinct answers where there are enough."""
    rng = random.Random(seed)
    pool = list(train)
    rng.shuffle(pool)
    chosen: list[Example] = []
    seen: set[str] = set()
    for ex in pool:
        answer = split_example(ex)[1]
        if answer not in seen:
            chosen.append(ex)
            seen.add(answer)
        if len(chosen) == k:
            return chosen
    rest = [ex for ex in pool if ex not in chosen]
    return chosen + rest[: k - len(chosen)]


def prompting_prompts(
    kind: str, test: Sequence[Example], train: Sequence[Example], shots: int, system: str
) -> list[list[Message]]:
    """The prompt of every test example under one prompting strategy."""
    prompts = []
    fixed = [m for ex in pick_shots(train, shots) for m in _turns(ex)] if kind == FEW_SHOT else []
    index = BM25([_query(split_example(ex)[0]) for ex in train]) if kind == RETRIEVAL else None
    for ex in test:
        convo = [m for m in split_example(ex)[0] if m.role != "system"]
        if index is not None:
            nearest = index.top_k(_query(convo), shots)
            # Nearest last: the most similar example sits right before the question.
            fixed = [m for i in reversed(nearest) for m in _turns(train[i])]
        prompts.append([Message("system", system)] + fixed + convo)
    return prompts


def _query(prompt: Sequence[Message]) -> str:
    users = [m.content for m in prompt if m.role == "user"]
    return users[-1] if users else ""


# ----------------------------------------------------------------------------- compare


def check_options(shots: int, weights: str = "fp32") -> None:
    """What compare refuses before any work (and before flows.compare trains an adapter)."""
    if shots < 1:
        raise UsageError(f"--shots must be at least 1, got {shots}")
    check_weights(weights)


def compare(
    model: str | Path | None,
    train: str | Path,
    test: str | Path,
    adapter: str | Path | None = None,
    shots: int = 5,
    price_per_million: float = 0.10,
    metric: str = "auto",
    out: str | Path | None = None,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    precision: str = "auto",
    format: str | None = None,
    input_column: str = "text",
    output_column: str | None = None,
    system: str | None = None,
    limit: int | None = None,
    teacher_model: str | None = None,
    teacher_base_url: str | None = None,
    teacher_api_key: str | None = None,
    teacher_price_per_million: float | None = None,
    constraint: Constraint | None = None,
    weights: str = "fp32",
    log: Callable[[str], None] = print,
) -> Comparison:
    """Measure the strategies on `test`; write compare.json and one folder each to `out`.

    teacher_model: also ask this model at teacher_base_url (OpenAI-compatible) each test
    example's own prompt (with `system` when given), priced at teacher_price_per_million
    (default: price_per_million). constraint: every strategy's answers are held to it (a
    JSON Schema or a choice; the teacher is asked for it in the request). weights: how the
    base's linear layers are stored (models.inference.WEIGHTS), for every local strategy."""
    check_options(shots, weights)
    out = Path(out) if out is not None else None
    train_ex = load_examples(train, format, input_column, output_column)
    test_ex = load_examples(test, format, input_column, output_column, limit=limit)
    references = [split_example(ex)[1] for ex in test_ex]
    kind = pick_metric(references) if metric == "auto" else metric
    labels = None
    if kind == "label":
        labels = sorted({split_example(ex)[1].strip() for ex in list(train_ex) + list(test_ex)})
    system_prompt = base_system(system, labels)

    def measure(name: str, loaded: LoadedModel, examples: Sequence[Example],
                prompts: Sequence[Sequence[Message]] | None, with_loss: bool) -> Strategy:
        # Every local strategy is scored with the same metric, token budget, batch, precision
        # and constraint: only the model and the prompts differ, or the comparison is unfair.
        result = evaluate_loaded(
            loaded, examples, prompts, kind, labels, max_new_tokens, batch_size, precision, with_loss=with_loss,
            constraint=constraint, log=log,
        )
        return Strategy(name, result, price_per_million)

    base = load_for_inference(model, None, weights=weights)
    strategies = []
    for name in (ZERO_SHOT, FEW_SHOT, RETRIEVAL):
        log(f"{name}: base model, {shots if name != ZERO_SHOT else 0} examples in the prompt")
        prompts = prompting_prompts(name, test_ex, train_ex, shots, system_prompt)
        strategies.append(measure(name, base, test_ex, prompts, with_loss=False))
    if adapter is not None:
        log(f"{FINE_TUNED}: adapter {adapter}")
        tuned = load_for_inference(model, adapter, weights=weights, merge=True)
        tuned_system = system if system is not None else run_system_prompt(adapter)
        tuned_ex = [with_system(ex, tuned_system) for ex in test_ex] if tuned_system else list(test_ex)
        strategies.append(measure(FINE_TUNED, tuned, tuned_ex, None, with_loss=True))
    if teacher_model is not None:
        log(f"{TEACHER}: {teacher_model} at {teacher_base_url or 'the OpenAI API'}")
        result = teacher_result(test_ex, teacher_model, teacher_base_url, teacher_api_key, kind, labels,
                                system, max_new_tokens, constraint=constraint)
        price = teacher_price_per_million if teacher_price_per_million is not None else price_per_million
        strategies.append(Strategy(TEACHER, result, price))
    for strategy in strategies:
        strategy.result.metrics["data"] = str(test)
    main_name = strategies[0].main[0]
    info = {
        "model": base.name,
        "adapter": str(adapter) if adapter is not None else None,
        "train": str(train),
        "test": str(test),
        "n_examples": len(test_ex),
        "shots": shots,
        "metric": kind,
        "main_metric": main_name,
        "price_per_million": price_per_million,
        "teacher_model": teacher_model,
        **answer_format(constraint),
    }
    comparison = Comparison(strategies, info, verdict(strategies))
    if out is not None:
        write_comparison(out, comparison)
    return comparison


def teacher_result(
    test_ex: Sequence[Example], teacher_model: str, base_url: str | None, api_key: str | None, kind: str,
    labels: Sequence[str] | None, system: str | None, max_new_tokens: int, concurrency: int = 8,
    constraint: Constraint | None = None,
) -> EvalResult:
    """Score a remote teacher like a local strategy: the same prompts as distillation sends,
    its reported token usage, and wall time per request with `concurrency` in flight
    (amortised, as the local strategies' batched latency is)."""
    import asyncio
    import time

    split = [split_example(with_system(ex, system) if system else ex) for ex in test_ex]
    wires = [[m.to_template() for m in prompt] for prompt, _ in split]

    async def run_all() -> list[Any]:
        client = build_client(base_url, api_key, timeout_s=120.0)
        gate = asyncio.Semaphore(concurrency)

        async def one(wire: list[dict[str, Any]]) -> Any:
            async with gate:
                return await ask(client, teacher_model, wire, temperature=0.0, max_tokens=max_new_tokens,
                                 secret=api_key, fields=constraint.request_fields() if constraint else None)

        try:
            return await gather_interruptible(*(one(w) for w in wires))
        finally:
            await client.close()

    t0 = time.perf_counter()
    try:
        replies = run_coroutine(run_all())
    except TeacherFailure as exc:
        raise UsageError(f"the teacher {teacher_model!r} failed on the test set: {exc}; "
                         "check --teacher-model, --teacher-base-url and --teacher-api-key") from None
    wall_s = time.perf_counter() - t0
    references = [ref for _, ref in split]
    predictions = [r.texts[0] for r in replies]
    scores = score(references, predictions, kind, labels)
    n = len(test_ex)
    rows = [{
        "line": ex.line, "input": _query(prompt), "reference": ref, "prediction": r.texts[0],
        "correct": bool(scores.correct[i]), "score": round(scores.per_example[i], 4), "loss": None,
        "prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens,
    } for i, (ex, (prompt, ref), r) in enumerate(zip(test_ex, split, replies))]
    metrics: dict[str, Any] = {
        "model": teacher_model, "adapter": None, "base_url": base_url, "metric": scores.metric,
        "main_metric": scores.main[0], "n_examples": n, "scores": scores.summary, "loss": None, "perplexity": None,
        "latency_s_per_example": wall_s / n if n else 0.0,
        "latency_s_per_request_alone": sum(r.latency_s for r in replies) / n if n else 0.0,
        "prompt_tokens_per_example": sum(r.prompt_tokens for r in replies) / n if n else 0.0,
        "completion_tokens_per_example": sum(r.completion_tokens for r in replies) / n if n else 0.0,
        "generation_s": wall_s, "max_new_tokens": max_new_tokens, "concurrency": concurrency,
    }
    metrics.update(scores.extra)
    return EvalResult(metrics, rows)


def verdict(strategies: Sequence[Strategy]) -> str:
    """One plain sentence: which strategy wins and by how much."""
    metric = strategies[0].main[0]
    ranked = sorted(strategies, key=lambda s: (-s.main[1], s.tokens))
    best = ranked[0]
    if len(ranked) == 1:
        return f"Only {best.name} was measured: {metric} {format_score(metric, best.main[1])}."
    second = ranked[1]
    gap = best.main[1] - second.main[1]
    tokens = f"{best.prompt_tokens:.0f} vs {second.prompt_tokens:.0f} prompt tokens per request"
    if gap <= 1e-9:
        return (
            f"{best.name} and {second.name} tie on {metric} ({format_score(metric, best.main[1])}); "
            f"{best.name} is the cheaper at {tokens}."
        )
    return (
        f"{best.name} wins on this data: {metric} {format_score(metric, best.main[1])} against "
        f"{format_score(metric, second.main[1])} for {second.name}, the runner-up "
        f"({100 * gap:+.1f} points), at {tokens}."
    )


def write_comparison(out: Path, comparison: Comparison) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for s in comparison.strategies:
        write_eval(out / _slug(s.name), s.result)
    (out / COMPARE_FILE).write_text(json.dumps(comparison.to_dict(), indent=2, ensure_ascii=False) + "\n")
    comparison.out = out


def print_comparison(comparison: Comparison) -> None:
    from rich.console import Console
    from rich.table import Table

    info = comparison.info
    metric = info["main_metric"]
    table = Table(
        "strategy", metric, "prompt tokens/request", "latency/request",
        f"cost of 1M requests (${info['price_per_million']:g}/1M tokens)",
        title=f"{info['n_examples']} test examples, {info['shots']} shots",
    )
    for s in comparison.strategies:
        table.add_row(
            s.name, format_score(metric, s.main[1]), f"{s.prompt_tokens:.0f}",
            f"{1000 * s.result.metrics['latency_s_per_example']:.0f} ms", f"${s.cost_per_million_requests:,.2f}",
        )
    console = Console()
    console.print(table)
    console.print(comparison.verdict)
