"""score_model and label_model against a scripted OpenAI-compatible endpoint on loopback: what the
judge is sent (structured outputs, sampling params) and how each answer becomes a score. The tiny
random model behind `tunesmith serve` rarely finishes a number, so tests/serve covers the real
server and this covers the answers it cannot be made to give."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tunesmith.graders.judge import Endpoint
from tunesmith.graders.run import run_grader
from tunesmith.graders.types import parse_grader


class ScriptedJudge:
    """An HTTP server answering /v1/chat/completions with the next scripted message content."""

    def __init__(self):
        self.answers: list[str] = []
        self.requests: list[dict] = []
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                judge.requests.append(body)
                reply = {"id": "c1", "object": "chat.completion", "created": 0, "model": body["model"],
                         "choices": [{"index": 0, "finish_reason": "stop",
                                      "message": {"role": "assistant", "content": judge.answers.pop(0)}}],
                         "usage": {"prompt_tokens": 11, "completion_tokens": 5, "total_tokens": 16}}
                data = json.dumps(reply).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.endpoint = Endpoint(f"http://127.0.0.1:{self.server.server_address[1]}/v1", "k")


@pytest.fixture
def judge():
    j = ScriptedJudge()
    yield j
    j.server.shutdown()


SCORE = {"type": "score_model", "name": "judge", "model": "big", "range": [0, 10],
         "sampling_params": {"temperature": 0.5, "max_completions_tokens": 20, "seed": 3},
         "input": [{"role": "system", "content": "Score 0-10."},
                   {"role": "user", "content": [{"type": "input_text", "text": "Q: {{item.q}} A: {{sample.output_text}}"}]}]}


@pytest.mark.parametrize(("answer", "reward", "flag"), [
    ('{"result": 7}', 7.0, None),
    ('{"result": 2.5}', 2.5, None),
    ('{"result": 11}', 0.0, "model_grader_parse_error"),
    ('{"result": "high"}', 0.0, "model_grader_parse_error"),
    ("seven", 0.0, "model_grader_parse_error"),
])
def test_score_model_turns_the_judges_answer_into_a_score(judge, answer, reward, flag):
    judge.answers.append(answer)
    result = run_grader(parse_grader(SCORE), "Paris", {"q": "capital of France?"}, judge.endpoint)
    assert result.reward == reward
    assert (flag in result.errors) if flag else not result.error
    sent = judge.requests[0]
    assert sent["messages"] == [{"role": "system", "content": "Score 0-10."},
                                {"role": "user", "content": "Q: capital of France? A: Paris"}]
    assert sent["response_format"]["type"] == "json_schema"
    assert sent["response_format"]["json_schema"]["schema"]["properties"]["result"] == {"type": "number"}
    assert (sent["temperature"], sent["max_completion_tokens"], sent["seed"]) == (0.5, 20, 3)
    assert result.token_usage == {"big": {"prompt_tokens": 11, "completion_tokens": 5, "total_tokens": 16}}


def test_label_model_passes_on_a_passing_label(judge):
    grader = parse_grader({"type": "label_model", "name": "tone", "model": "big", "labels": ["polite", "rude", "neutral"],
                           "passing_labels": ["polite", "neutral"],
                           "input": [{"role": "user", "content": "Tone of: {{sample.output_text}}"}]})
    judge.answers += ['{"result": "neutral"}', '{"result": "rude"}', '{"result": "angry"}']
    rewards = [run_grader(grader, "ok.", {}, judge.endpoint) for _ in range(3)]
    assert [r.reward for r in rewards] == [1.0, 0.0, 0.0]
    assert "not one of" in rewards[2].errors["model_grader_parse_details"]
    assert judge.requests[0]["response_format"]["json_schema"]["schema"]["properties"]["result"]["enum"] == \
        ["polite", "rude", "neutral"]
    assert judge.requests[0]["temperature"] == 0


def test_multi_over_two_judges_counts_tokens_per_model(judge):
    grader = parse_grader({"type": "multi", "name": "m", "calculate_output": "(a + b) / 20",
                           "graders": {"a": {**SCORE, "name": "a"}, "b": {**SCORE, "name": "b"}}})
    judge.answers += ['{"result": 4}', '{"result": 6}']
    result = run_grader(grader, "Paris", {"q": "?"}, judge.endpoint)
    assert result.reward == 0.5 and result.sub_rewards == {"a": 4.0, "b": 6.0}
    assert result.token_usage["big"]["total_tokens"] == 32
    assert result.to_openai()["metadata"]["token_usage"] == 32
