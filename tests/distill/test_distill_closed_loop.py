"""The closed loop on the tiny model: a teacher adapter trained on a small task and served by
tunesmith's own server, prompts without answers distilled from it, a student adapter
trained on the distilled file, and `compare` measuring teacher and student on held-out
prompts. The student must reach the teacher's accuracy within MARGIN (10 points).

The task: a prompt is "topic:" plus four words drawn from one of two word groups; the
answer names the group ("wait" or "pass", single tokens of the tiny tokenizer). Held-out
prompts are new draws, so the answer has to generalise, not be remembered.
"""

from __future__ import annotations

import json
import random
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from tiny_model import save_learnable_tiny_model

MARGIN = 0.10
GROUPS = {"wait": ["card", "password", "capital", "France"], "pass": ["dog", "quick", "brown", "lazy"]}
# The teacher and the student train alike: LoRA r=16, every step over the whole file (48
# rows), lr 5e-3 after 10% warm-up, 100 steps.
# - Whole file: distill used to leave answers in arrival order, which concurrent requests make
#   timing-dependent. With 16-row batches that order chose what each step saw, and the
#   student's result depended on it (one distilled file, all 47 answers right, trained in 17
#   orders: 5 stayed <90% held-out, stuck answering "pass" or "wait" for everything).
#   distill now writes prompt order, which is reproducible but just one of those orders, not
#   a known good one; whole-file steps see every row whatever the order.
# - lr 5e-3, 100 steps: at 1e-2 the loss spikes and can fall back to that one-label plateau
#   (loss ~0.35) even with the whole file per step; with these settings 50 of 50 labelled
#   draws of the task reached >= 29/30 held-out, most of them by step 50.
TRAIN_STEPS = 100
TRAIN_BATCH = 48
LEARNING_RATE = 5e-3
WARMUP_RATIO = 0.1


def _draw(n: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.choice(sorted(GROUPS))
        rows.append(("topic: " + " ".join(rng.choice(GROUPS[label]) for _ in range(4)), label))
    return rows


def _write_chat(path: Path, rows: list[tuple[str, str]]) -> Path:
    with open(path, "w") as fh:
        for prompt, answer in rows:
            fh.write(json.dumps({"messages": [{"role": "user", "content": prompt},
                                              {"role": "assistant", "content": answer}]}) + "\n")
    return path



def _train(base: Path, data: Path, out: Path) -> Path:
    from tunesmith.train.config import TrainConfig
    from tunesmith.train.run import train

    cfg = TrainConfig(model=str(base), data=data, out=out, max_steps=TRAIN_STEPS, batch_size=TRAIN_BATCH,
                      precision="fp32", learning_rate=LEARNING_RATE, warmup_ratio=WARMUP_RATIO)
    return train(cfg, progress=False).out_dir


@contextmanager
def _serve(base: Path, adapters: list[tuple[str, Path]], home: Path) -> Iterator[str]:
    """`tunesmith serve`'s app and engine under uvicorn on a free loopback port."""
    import uvicorn

    from tunesmith.serve.app import create_app
    from tunesmith.generate.engine import LocalEngine
    from tunesmith.settings import Settings

    engine = LocalEngine.load(str(base), [(name, str(p)) for name, p in adapters])
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(engine, Settings(home=home, api_key=None)),
                                           log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert time.time() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
        engine.close()


def test_student_distilled_from_served_teacher_matches_it(tmp_path):
    from tunesmith.distill.run import distill
    from tunesmith.evaluate.comparison import FINE_TUNED, TEACHER, compare

    base = save_learnable_tiny_model(tmp_path / "base")
    teacher_run = _train(base, _write_chat(tmp_path / "teacher-train.jsonl", _draw(48, seed=1)), tmp_path / "teacher")
    unlabelled = tmp_path / "prompts.txt"
    unlabelled.write_text("".join(prompt + "\n" for prompt, _ in _draw(48, seed=2)))
    heldout = _write_chat(tmp_path / "heldout.jsonl", _draw(30, seed=3))

    with _serve(base, [("teacher", teacher_run)], tmp_path / "home") as url:
        distilled = tmp_path / "distilled.jsonl"
        result = distill(unlabelled, "teacher", distilled, teacher_base_url=url, model=base, max_tokens=8,
                         concurrency=4, progress=False, log=lambda m: None)
        assert result.failed == 0 and result.written + result.duplicates == 48 and result.report.ok
        assert result.tokens_in > 0 and result.tokens_out >= result.written
        rows = [json.loads(line) for line in distilled.read_text().splitlines()]
        assert all(r["messages"][0]["role"] == "user" and r["messages"][1]["role"] == "assistant" for r in rows)

        student_run = _train(base, distilled, tmp_path / "student")
        comparison = compare(base, distilled, heldout, adapter=student_run, teacher_model="teacher",
                             teacher_base_url=url, max_new_tokens=8, out=tmp_path / "compare", log=lambda m: None)

    by_name = {s.name: s for s in comparison.strategies}
    teacher, student = by_name[TEACHER], by_name[FINE_TUNED]
    assert teacher.main[0] == "accuracy"
    assert teacher.main[1] >= 0.9, f"the teacher did not learn the task: {teacher.main[1]:.2f}"
    assert student.main[1] >= teacher.main[1] - MARGIN, (
        f"student {student.main[1]:.2f} is more than {MARGIN:.2f} below the teacher {teacher.main[1]:.2f}")
    assert teacher.prompt_tokens > 0 and teacher.result.metrics["latency_s_per_example"] > 0
    saved = json.loads((tmp_path / "compare" / "compare.json").read_text())
    assert [s["name"] for s in saved["strategies"]][-1] == TEACHER and saved["teacher_model"] == "teacher"
    assert saved["verdict"].split(" ")[0] in ("zero-shot", "few-shot", "retrieval", "fine-tuned", "teacher")
    assert (tmp_path / "compare" / "teacher" / "predictions.jsonl").is_file()
