"""The engine in its own process (what `tunesmith serve` runs by default): the same answers
as the engine in this process, errors that keep their kind across the pipe, cancelled
requests forgotten on both sides, and a killed engine process failing its open requests
instead of leaving them waiting."""

from __future__ import annotations

import os
import signal
import threading

import pytest

from tunesmith.errors import UsageError
from tunesmith.generate.constraints import Constraint, ConstraintError
from tunesmith.generate.engine import AdapterConflictError, SamplingParams, UnknownModelError
from tunesmith.generate.process import ProcessEngine
from tunesmith.generate.requests import EngineOverloaded, EngineStopped, Event

from generate_helpers import wait_until_idle

GREEDY = SamplingParams(max_tokens=12, temperature=0.0)
LONG = SamplingParams(max_tokens=400, temperature=1.0, seed=1, constraint=Constraint.regex("[ab ]{400,}"))
"""A row that runs to max_tokens (a random model would end free text at any step)."""


@pytest.fixture(scope="module")
def process_engine(tiny_model_dir, adapter_dirs):
    eng = ProcessEngine(str(tiny_model_dir), [("alpha", adapter_dirs["alpha"])])
    yield eng
    eng.close()


class Answer:
    """One submitted request's events, gathered from the reader thread."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.last: Event | None = None
        self.ended = threading.Event()
        self.started = threading.Event()

    def __call__(self, ev: Event) -> None:
        self.parts.append(ev.text)
        self.started.set()
        if ev.finish_reason:
            self.last = ev
            self.ended.set()

    def wait(self, timeout_s: float = 60.0) -> tuple[str, str, int]:
        assert self.ended.wait(timeout_s), "the request never ended"
        return "".join(self.parts), self.last.finish_reason, self.last.completion_tokens


def ask(eng, ids, model, params=GREEDY, group=None) -> tuple[str, str, int]:
    answer = Answer()
    eng.submit(ids, model, params, answer, group=group)
    return answer.wait()


def test_the_engine_process_answers_as_the_engine_in_this_process(process_engine, engine):
    assert process_engine.pid != os.getpid()
    assert [c.id for c in process_engine.models()] == [engine.base_id, "alpha"]
    assert (process_engine.max_context, process_engine.message_tokens) == (engine.max_context, engine.message_tokens)
    messages = [{"role": "system", "content": "Answer with the label."}, {"role": "user", "content": "Where is my card?"}]
    ids = process_engine.render_chat(messages)
    assert ids == engine.render_chat(messages) and process_engine.encode("a b") == engine.encode("a b")
    steps = process_engine.stats()["steps"]
    for model in (engine.base_id, "alpha"):
        assert ask(process_engine, ids, model) == engine.generate(ids, model, GREEDY)
    # Rows of one request (one group) and of another, at once: each still gets its own answer.
    group = object()
    answers = [Answer() for _ in range(3)]
    for a, model in zip(answers, ("alpha", "alpha", engine.base_id)):
        process_engine.submit(ids, model, GREEDY, a, group=group if model == "alpha" else None)
    assert [a.wait() for a in answers] == [engine.generate(ids, m, GREEDY) for m in ("alpha", "alpha", engine.base_id)]
    assert process_engine.stats()["steps"] > steps


def test_errors_keep_their_kind_across_the_process(process_engine, engine, adapter_dirs, tmp_path):
    ids = process_engine.render_chat([{"role": "user", "content": "hi"}])
    with pytest.raises(UnknownModelError, match="available: .*alpha"):
        process_engine.submit(ids, "nope", GREEDY, Answer())
    with pytest.raises(UsageError, match="empty"):
        process_engine.submit([], "alpha", GREEDY, Answer())
    with pytest.raises(ConstraintError) as bad:
        process_engine.compile(Constraint.json_schema({"type": "bogus"}))
    assert bad.value.code == "unsupported_schema" and "bogus" in str(bad.value)
    missing = tmp_path / "no-such-adapter"
    with pytest.raises(UsageError) as here:
        engine.add_adapter("ghost", missing)
    with pytest.raises(type(here.value), match=str(here.value)[:40].replace("(", r"\(")):
        process_engine.add_adapter("ghost", missing)
    with pytest.raises(AdapterConflictError):
        process_engine.add_adapter("alpha", adapter_dirs["beta"])

    card = process_engine.add_adapter("beta", adapter_dirs["beta"])
    assert card.parent == engine.base_id and "beta" in [c.id for c in process_engine.models()]
    assert ask(process_engine, ids, "beta") == engine.generate(ids, "beta", GREEDY)
    process_engine.remove_adapter("beta")
    assert "beta" not in [c.id for c in process_engine.models()]
    with pytest.raises(UnknownModelError):
        process_engine.submit(ids, "beta", GREEDY, Answer())
    with pytest.raises(UnknownModelError):
        process_engine.remove_adapter("beta")


def test_cancelled_rows_are_forgotten_and_a_killed_engine_fails_its_requests(tiny_model_dir):
    eng = ProcessEngine(str(tiny_model_dir), max_batch_rows=1, max_waiting_rows=1)
    try:
        ids = eng.render_chat([{"role": "user", "content": "Tell me a long story."}])
        first, second = Answer(), Answer()
        handles = [eng.submit(ids, eng.base_id, LONG, first), eng.submit(ids, eng.base_id, LONG, second)]
        with pytest.raises(EngineOverloaded):  # one row running, one waiting: the bound
            eng.submit(ids, eng.base_id, LONG, Answer())
        assert first.started.wait(60) and eng.stats()["running"] == 1
        for h in handles:
            h.cancel()
        stats = wait_until_idle(eng)
        assert stats["running"] == stats["waiting"] == 0 and stats["cancelled"] == 2
        assert not first.ended.is_set() and not second.ended.is_set()  # cancelled: no event follows
        for _ in range(3):  # cancelled rows no longer count against the bound, here or there
            assert ask(eng, ids, eng.base_id, GREEDY)[1] in ("stop", "length")

        open_request = Answer()
        eng.submit(ids, eng.base_id, LONG, open_request)
        os.kill(eng.pid, signal.SIGKILL)
        assert open_request.wait(30)[1] == "error"
        with pytest.raises(EngineStopped, match="exited"):
            eng.submit(ids, eng.base_id, GREEDY, Answer())
        with pytest.raises(EngineStopped):
            eng.stats()
    finally:
        eng.close()


def test_a_stopped_engine_is_a_503_for_clients():
    from tunesmith.serve.errors import error_from_tunesmith

    error = error_from_tunesmith(EngineStopped("the engine process exited (code -9); restart the server"))
    assert (error.status, error.code) == (503, "engine_unavailable") and "restart" in error.message
