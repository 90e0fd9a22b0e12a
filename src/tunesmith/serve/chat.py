"""Terminal chat with a model or adapter, the engine in this process (no server needed).

    tunesmith chat --model smollm2-135m-instruct
    echo "What is the capital of France?" | tunesmith chat --model smollm2-135m-instruct

Commands at the prompt: /system TEXT (set the system message), /reset (forget the
conversation), /exit. With stdin not a terminal, the whole input is one question: the
answer is printed and the command exits.
"""

from __future__ import annotations

import queue
from typing import Any, Callable, TextIO

from tunesmith.errors import UsageError
from tunesmith.generate.engine import Engine, Event, SamplingParams

HELP = "commands: /system TEXT, /reset, /exit (Ctrl-D also exits; Ctrl-C stops an answer)"


def answer(engine: Engine, model: str, messages: list[dict[str, Any]], params_for: Callable[[int], SamplingParams],
           write: Callable[[str], None]) -> str:
    """Stream one assistant answer to `write`; returns its full text."""
    prompt = engine.render_chat(messages)
    room = engine.max_context - len(prompt)
    if room <= 0:
        raise UsageError(
            f"the conversation is {len(prompt)} tokens, more than the model's context of "
            f"{engine.max_context}; use /reset"
        )
    events: queue.Queue[Event] = queue.Queue()
    handle = engine.submit(prompt, model, params_for(room), events.put)
    parts = []
    try:
        while True:
            ev = events.get()
            if ev.text:
                parts.append(ev.text)
                write(ev.text)
            if ev.finish_reason == "error":
                raise UsageError("generation failed; see the log above")
            if ev.finish_reason:
                return "".join(parts)
    finally:
        handle.cancel()  # Ctrl-C mid-answer: free the row


def run_chat(engine: Engine, model: str, stdin: TextIO, stdout: TextIO, interactive: bool,
             temperature: float = 0.7, max_tokens: int | None = None, seed: int | None = None) -> None:
    """The chat loop; with interactive=False, answer all of stdin once and return.

    max_tokens caps each answer (default: whatever room the context leaves).
    """

    def params_for(room: int) -> SamplingParams:
        limit = min(room, max_tokens) if max_tokens else room
        return SamplingParams(max_tokens=limit, temperature=temperature, top_p=0.95 if temperature else 1.0, seed=seed)

    def write(text: str) -> None:
        stdout.write(text)
        stdout.flush()

    if not interactive:
        question = stdin.read().strip()
        if not question:
            raise UsageError("no question on standard input; pipe one in (echo 'question' | tunesmith chat)")
        answer(engine, model, [{"role": "user", "content": question}], params_for, write)
        write("\n")
        return

    system: str | None = None
    history: list[dict[str, Any]] = []
    write(f"chatting with {model}; {HELP}\n")
    while True:
        write("\nyou> ")
        line = stdin.readline()
        if not line:  # Ctrl-D
            write("\n")
            return
        line = line.strip()
        if not line:
            continue
        if line == "/exit":
            return
        if line == "/reset":
            history = []
            write("(conversation cleared)\n")
            continue
        if line.startswith("/system"):
            system = line[len("/system"):].strip() or None
            write(f"(system message {'set' if system else 'cleared'})\n")
            continue
        if line.startswith("/"):
            write(f"unknown command {line.split()[0]}; {HELP}\n")
            continue
        history.append({"role": "user", "content": line})
        messages = ([{"role": "system", "content": system}] if system else []) + history
        write("assistant> ")
        try:
            reply = answer(engine, model, messages, params_for, write)
        except KeyboardInterrupt:
            write("\n(stopped)\n")
            history.pop()
            continue
        except UsageError as exc:
            write(f"\nerror: {exc}\n")
            history.pop()
            continue
        write("\n")
        history.append({"role": "assistant", "content": reply})
