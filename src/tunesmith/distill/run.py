"""`tunesmith distill`: a teacher answers your prompts; the answers become a training file.

The output is chat JSONL in tunesmith's training format, one line per answer. During the
run each answer is appended and flushed as it arrives; when the run ends (finished, with
failures, or stopped by Ctrl-C) the file is rewritten in prompt-file order (by
`metadata.prompt_line`, then `n_index`; answers from earlier runs included), atomically,
so that the same prompts give the same file however the concurrent answers arrived.
Every line carries `metadata.distill_key`, a hash of what was asked (the request's
messages, system prompt included; the teacher model; temperature; max_tokens; the
answer's index under --n), so re-running the same command skips what is already
answered: a crash or Ctrl-C loses at most the requests in flight. A torn last line (a
crash mid-write) is cut off before resuming, never duplicated.

Beside the output: `<stem>.rejected.jsonl` holds answers the --filter dropped (kept so a
resume does not pay for them again; ordered like the output) and `<stem>.failed.jsonl`
the prompts that failed in the last run, with their error (re-run to retry them). The
API key is never written.

    tunesmith distill --prompts prompts.txt --teacher-model gpt-4o-mini --out train.jsonl
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, TextIO

from tunesmith.data.validate import print_report, validate_data
from tunesmith.distill.filters import AnswerFilter, build_filter
from tunesmith.distill.order import sort_by_prompt
from tunesmith.distill.prompts import Prompt, load_prompts
from tunesmith.errors import UsageError
from tunesmith.generate.remote import TeacherFailure, ask, build_client, gather_interruptible, run_coroutine
from tunesmith.models.registry import DEFAULT_MODEL, resolve_model


@dataclass
class Job:
    """One request: a prompt and the answer indices (under --n) it still lacks."""

    prompt: Prompt
    indices: list[int]
    keys: list[str]


@dataclass
class DistillResult:
    out: Path
    prompts: int = 0
    answers_wanted: int = 0
    already: int = 0
    """Answers found from an earlier run (in the output or the rejected file)."""
    duplicates: int = 0
    """Prompts that repeat an earlier prompt of the file exactly (asked once)."""
    written: int = 0
    dropped: int = 0
    failed: int = 0
    failed_prompts: list[dict[str, Any]] = field(default_factory=list)
    tokens_in: int = 0
    tokens_out: int = 0
    requests: int = 0
    retries: int = 0
    price_per_million: float | None = None
    filter: str | None = None
    elapsed_s: float = 0.0
    repaired_bytes: int = 0
    report: Any = None
    """The ValidationReport of the output file (None when it holds nothing)."""

    @property
    def cost(self) -> float | None:
        if self.price_per_million is None:
            return None
        return (self.tokens_in + self.tokens_out) * self.price_per_million / 1e6

    @property
    def ok(self) -> bool:
        return self.failed == 0 and (self.report is None or self.report.ok)


def sidecar(out: Path, kind: str) -> Path:
    """`train.jsonl` -> `train.failed.jsonl` (kind: failed or rejected)."""
    return out.parent / f"{out.stem}.{kind}.jsonl"


def request_key(messages: list[dict[str, Any]], teacher_model: str, temperature: float | None,
                max_tokens: int | None, n_index: int) -> str:
    """What identifies one answer: change any of these and it is asked again."""
    blob = json.dumps(
        {"messages": messages, "model": teacher_model, "temperature": temperature,
         "max_tokens": max_tokens, "n_index": n_index},
        sort_keys=True, ensure_ascii=False,
    )
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:32]


def _wire(prompt: Prompt) -> list[dict[str, Any]]:
    return [m.to_template() for m in prompt.messages]


# ----------------------------------------------------------------------------- resume


def repair_tail(path: Path) -> int:
    """Cut a torn last line off the file; returns the bytes removed.

    Torn: not JSON (a write cut short, with or without a later newline). A last line that
    is whole JSON but lacks its newline only gets the newline."""
    if not path.is_file():
        return 0
    with open(path, "rb+") as fh:
        data = fh.read()
        body = data[:-1] if data.endswith(b"\n") else data
        start = body.rfind(b"\n") + 1
        last = body[start:].strip()
        if not last:
            return 0
        try:
            json.loads(last)
        except ValueError:
            fh.truncate(start)
            return len(data) - start
        if not data.endswith(b"\n"):
            fh.write(b"\n")
    return 0


def done_keys(path: Path) -> set[str]:
    """The distill keys of the lines already in an output or rejected file."""
    keys: set[str] = set()
    if not path.is_file():
        return keys
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if not isinstance(obj, dict):
                continue
            # Output lines keep the key in their metadata, rejected lines at the top.
            meta = obj.get("metadata")
            key = meta.get("distill_key") if isinstance(meta, dict) else obj.get("distill_key")
            if isinstance(key, str):
                keys.add(key)
    return keys


def plan_jobs(prompts: Iterable[Prompt], teacher_model: str, temperature: float | None, max_tokens: int | None,
              n: int, done: set[str], result: DistillResult) -> list[Job]:
    jobs: list[Job] = []
    seen: set[str] = set()
    for prompt in prompts:
        wire = _wire(prompt)
        keys = [request_key(wire, teacher_model, temperature, max_tokens, i) for i in range(n)]
        if keys[0] in seen:
            result.duplicates += 1
            continue
        seen.add(keys[0])
        result.answers_wanted += n
        missing = [i for i in range(n) if keys[i] not in done]
        result.already += n - len(missing)
        if missing:
            jobs.append(Job(prompt, missing, [keys[i] for i in missing]))
    return jobs


# ----------------------------------------------------------------------------- distill


def distill(
    prompts: str | Path,
    teacher_model: str,
    out: str | Path,
    teacher_base_url: str | None = None,
    api_key: str | None = None,
    system: str | None = None,
    concurrency: int = 8,
    temperature: float = 0.0,
    max_tokens: int | None = None,
    n: int = 1,
    filter: str | None = None,
    price_per_million: float | None = None,
    format: str | None = None,
    input_column: str = "text",
    model: str | Path | None = DEFAULT_MODEL,
    max_retries: int = 5,
    timeout_s: float = 120.0,
    validate: bool = True,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> DistillResult:
    """Ask the teacher every prompt not answered yet; append the answers to `out`, then put
    it in prompt order.

    model: the student model whose chat template validates the output at the end."""
    _check_options(concurrency, temperature, max_tokens, n, max_retries, timeout_s, price_per_million)
    keep = build_filter(filter)
    out = Path(out)
    if out.is_dir():
        raise UsageError(f"--out '{out}' is a directory; give a .jsonl file to write")
    if validate:  # a missing student model fails now, not after the teacher was paid
        resolve_model(model)
    loaded = load_prompts(prompts, format, input_column, system)
    if n > 1 and temperature == 0:
        log(f"note: --n {n} at --temperature 0 gives the same answer {n} times on most servers")
    result = DistillResult(out=out, prompts=len(loaded), price_per_million=price_per_million, filter=filter)
    out.parent.mkdir(parents=True, exist_ok=True)
    rejected = sidecar(out, "rejected")
    result.repaired_bytes = repair_tail(out) + repair_tail(rejected)
    if result.repaired_bytes:
        log(f"cut a torn last line ({result.repaired_bytes} bytes) left by an interrupted run")
    done = done_keys(out) | done_keys(rejected)
    jobs = plan_jobs(loaded, teacher_model, temperature, max_tokens, n, done, result)
    log(f"{len(loaded)} prompt(s) from {prompts}: {result.answers_wanted} answer(s) wanted, "
        f"{result.already} already in {out}, {sum(len(j.indices) for j in jobs)} to ask {teacher_model}"
        + (f" ({result.duplicates} repeated prompt(s) asked once)" if result.duplicates else ""))
    failed_path = sidecar(out, "failed")
    failed_path.unlink(missing_ok=True)
    t0 = time.perf_counter()
    try:
        if jobs:
            client = build_client(teacher_base_url, api_key, timeout_s)
            settings = _Settings(teacher_model, temperature, max_tokens, max_retries, api_key, keep, filter)
            with open(out, "a", encoding="utf-8") as out_fh, open(rejected, "a", encoding="utf-8") as rej_fh, \
                    _Progress(result, progress, log) as bar:
                writer = _Writer(out_fh, rej_fh, failed_path, result, bar)
                run_coroutine(_run_all(client, jobs, settings, concurrency, writer))
    except KeyboardInterrupt:
        log(f"interrupted: {result.written} answer(s) of this run are saved in {out}; "
            "run the same command again to go on")
        raise
    finally:
        # Answers were appended as they arrived, an order concurrency makes timing-dependent;
        # prompt order makes the file (and a seeded training run on it) reproducible. Also
        # after Ctrl-C, and only once the files are closed: a rename under an open append
        # handle would lose what it writes later.
        _sort_outputs(out, rejected, log)
    result.elapsed_s = time.perf_counter() - t0
    if rejected.is_file() and rejected.stat().st_size == 0:
        rejected.unlink()
    if validate and out.is_file() and out.stat().st_size:
        result.report = validate_data(out, model=model, format="chat", estimate=False)
    return result


def _sort_outputs(out: Path, rejected: Path, log: Callable[[str], None]) -> None:
    """sort_by_prompt on both files, where a failure (a full disk) is a sentence, not a
    traceback that would hide why the run stopped: the files are whole either way."""
    for path in (out, rejected):
        try:
            sort_by_prompt(path)
        except OSError as exc:
            log(f"could not put {path} in prompt order ({exc}); it is whole, in arrival order, "
                "and the next run sorts it")


def _check_options(concurrency, temperature, max_tokens, n, max_retries, timeout_s, price_per_million) -> None:
    bad = []
    if concurrency < 1:
        bad.append(f"--concurrency must be at least 1, got {concurrency}")
    if not 0 <= temperature <= 2:
        bad.append(f"--temperature must be between 0 and 2, got {temperature}")
    if max_tokens is not None and max_tokens < 1:
        bad.append(f"--max-tokens must be at least 1, got {max_tokens}")
    if n < 1:
        bad.append(f"--n must be at least 1, got {n}")
    if max_retries < 0:
        bad.append(f"--max-retries must be 0 or more, got {max_retries}")
    if timeout_s <= 0:
        bad.append(f"--timeout-s must be positive, got {timeout_s}")
    if price_per_million is not None and price_per_million < 0:
        bad.append(f"--price-per-million must be 0 or more, got {price_per_million}")
    if bad:
        raise UsageError("; ".join(bad))


@dataclass(frozen=True)
class _Settings:
    teacher_model: str
    temperature: float
    max_tokens: int | None
    max_retries: int
    api_key: str | None
    keep: AnswerFilter | None
    filter: str | None


class _Writer:
    """Appends each answer as one flushed line; the event loop is single-threaded, so
    lines never interleave."""

    def __init__(self, out_fh: TextIO, rej_fh: TextIO, failed_path: Path, result: DistillResult, bar: "_Progress"):
        self.out_fh, self.rej_fh, self.failed_path, self.result, self.bar = out_fh, rej_fh, failed_path, result, bar

    def answered(self, job: Job, texts: list[str], s: _Settings) -> None:
        for index, key, text in zip(job.indices, job.keys, texts):
            meta = {"distill_key": key, "teacher_model": s.teacher_model, "prompt_line": job.prompt.line,
                    "n_index": index}
            if s.keep is not None and not s.keep(text):
                _append(self.rej_fh, {**meta, "filter": s.filter, "answer": text})
                self.result.dropped += 1
                continue
            messages = _wire(job.prompt) + [{"role": "assistant", "content": text}]
            _append(self.out_fh, {"messages": messages, "metadata": meta})
            self.result.written += 1
        self.bar.update()

    def failed(self, job: Job, error: str, attempts: int) -> None:
        row = {"prompt_line": job.prompt.line, "messages": _wire(job.prompt), "n_indices": job.indices,
               "error": error, "attempts": attempts}
        with open(self.failed_path, "a", encoding="utf-8") as fh:
            _append(fh, row)
        self.result.failed += len(job.indices)
        self.result.failed_prompts.append(row)
        self.bar.update()


def _append(fh: TextIO, obj: dict[str, Any]) -> None:
    fh.write(json.dumps(obj, ensure_ascii=False) + "\n")
    fh.flush()


async def _run_all(client: Any, jobs: list[Job], s: _Settings, concurrency: int, writer: _Writer) -> None:
    queue: asyncio.Queue[Job] = asyncio.Queue()
    for job in jobs:
        queue.put_nowait(job)

    async def worker() -> None:
        while not queue.empty():
            job = queue.get_nowait()
            try:
                reply = await ask(client, s.teacher_model, _wire(job.prompt), n=len(job.indices),
                                  temperature=s.temperature, max_tokens=s.max_tokens,
                                  max_retries=s.max_retries, secret=s.api_key)
            except TeacherFailure as exc:
                writer.result.requests += exc.attempts
                writer.result.retries += exc.attempts - 1
                writer.failed(job, str(exc), exc.attempts)
                continue
            r = writer.result
            r.requests += reply.attempts
            r.retries += reply.attempts - 1
            r.tokens_in += reply.prompt_tokens
            r.tokens_out += reply.completion_tokens
            writer.answered(job, reply.texts, s)

    try:
        await gather_interruptible(*(worker() for _ in range(min(concurrency, len(jobs)))))
    finally:
        await client.close()


# ----------------------------------------------------------------------------- progress and summary


class _Progress:
    """A rich bar on a terminal; elsewhere a log line about every 10% of the requests."""

    def __init__(self, result: DistillResult, enabled: bool, log: Callable[[str], None]):
        self.result, self.log = result, log
        self.total = result.answers_wanted - result.already
        self.bar = None
        self.last_tenth = 0
        self.t0 = time.perf_counter()
        if enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            console = Console(stderr=True)
            if console.is_terminal:
                self.bar = Progress(TextColumn("distilling"), BarColumn(), MofNCompleteColumn(),
                                    TextColumn("{task.fields[stats]}"), TimeRemainingColumn(), console=console)
                self.task = self.bar.add_task("distill", total=self.total, stats=self.stats())
        self.enabled = enabled

    def stats(self) -> str:
        r = self.result
        text = f"done {r.written} failed {r.failed}"
        if r.dropped:
            text += f" dropped {r.dropped}"
        text += f" | tokens in {r.tokens_in:,} out {r.tokens_out:,}"
        if r.cost is not None:
            text += f" | ${r.cost:,.4f}"
        return text

    def update(self) -> None:
        r = self.result
        finished = r.written + r.failed + r.dropped
        if self.bar is not None:
            self.bar.update(self.task, completed=finished, stats=self.stats())
        elif self.enabled and (finished * 10 // max(self.total, 1) > self.last_tenth or finished == self.total):
            self.last_tenth = finished * 10 // max(self.total, 1)
            rate = finished / max(time.perf_counter() - self.t0, 1e-9)
            self.log(f"  {finished}/{self.total} ({rate:.1f}/s): {self.stats()}")

    def __enter__(self) -> "_Progress":
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.stop()


def print_summary(result: DistillResult, console: Any) -> None:
    r = result
    console.print(
        f"{r.out}: {r.written} answer(s) written now, {r.already} from earlier runs, "
        f"{r.failed} failed" + (f", {r.dropped} dropped by --filter {r.filter}" if r.filter else ""),
        highlight=False, markup=False,
    )
    line = f"teacher: {r.requests} request(s) ({r.retries} retried), tokens in {r.tokens_in:,} out {r.tokens_out:,}"
    if r.cost is not None:
        line += f", cost ${r.cost:,.4f} at ${r.price_per_million:g}/1M tokens"
    console.print(line + f", {r.elapsed_s:.1f} s", highlight=False)
    if r.dropped:
        console.print(f"dropped answers are in {sidecar(r.out, 'rejected')}", highlight=False)
    if r.failed:
        console.print(f"[red]{r.failed} answer(s) failed[/red]; their prompts and errors are in "
                      f"{sidecar(r.out, 'failed')}; run the same command again to retry them", highlight=False)
        for row in r.failed_prompts[:5]:
            console.print(f"  prompt line {row['prompt_line']}: {row['error']}", markup=False, highlight=False)
    if r.report is not None:
        console.print()
        print_report(r.report, console)
    elif not r.out.is_file() or not r.out.stat().st_size:
        console.print(f"{r.out} holds no answers yet, so it was not validated", highlight=False)

