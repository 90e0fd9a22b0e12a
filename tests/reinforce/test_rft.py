"""Reinforcement fine-tuning (`tunesmith train --method reinforcement`) on the tiny model:
GRPO's advantages and loss, packed answers, the real CLI with python and multi graders,
the same score from graders.run as training logged, resume giving the identical
continuation, and the sentences for bad settings."""

from __future__ import annotations

import json
import math
import random
import shutil
import subprocess
import sys

import pytest

from tunesmith.reinforce import grpo
from tunesmith.reinforce.run import train_rft
from tunesmith.train.config import TrainConfig

TUNESMITH = [sys.executable, "-c", "from tunesmith.cli import main; main()"]
WORDS = ["card", "password", "France", "dog", "quick", "lazy"]
LENGTH_GRADER = {"type": "python", "name": "length",
                 "source": "def grade(sample, item):\n    return min(len(sample['output_text']), 40) / 40\n"}
LABEL_GRADER = {"type": "string_check", "name": "label", "input": "{{sample.output_text}}",
                "reference": "{{item.letter}}", "operation": "ilike"}


def write_prompts(path, n=8, seed=0):
    rng = random.Random(seed)
    rows = [{"messages": [{"role": "user", "content": f"say {rng.choice(WORDS)} {i}"}], "letter": rng.choice("aeiou"),
             "id": i} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_grader(path, grader):
    path.write_text(json.dumps(grader))
    return path


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_advantages_are_rewards_against_their_group():
    adv, flat = grpo.group_advantages([1.0, 0.0, 0.5, 0.5, 2.0, 0.0], 2)
    assert adv[0] == pytest.approx(1.0, abs=1e-3) and adv[1] == pytest.approx(-1.0, abs=1e-3)
    assert adv[2:4] == [0.0, 0.0]  # a group whose answers all scored the same teaches nothing
    assert adv[4] == pytest.approx(1.0, abs=1e-3)
    assert flat == pytest.approx(1 / 3)


def test_token_loss_is_minus_the_advantage_with_ratio_one_and_kl_is_zero_at_the_reference():
    import torch

    batch = {"targets": torch.tensor([[-100, 5, 6, -100], [-100, 7, -100, -100]]),
             "sequence": torch.tensor([[0, 0, 0, 0], [1, 1, 1, 1]]), "advantages": torch.tensor([0.5, -2.0])}
    logps = torch.tensor([-1.0, -2.0, -0.5], requires_grad=True)
    loss, kl = grpo.grpo_token_loss(logps, batch, None, logps.detach(), 0.2, 0.1)
    assert loss.tolist() == pytest.approx([-0.5, -0.5, 2.0]) and kl.tolist() == [0.0, 0.0, 0.0]
    loss.sum().backward()
    assert logps.grad.tolist() == pytest.approx([-0.5, -0.5, 2.0])  # the policy gradient: -A per token
    # Off-policy, a ratio beyond 1 + eps stops the gradient of a positive advantage.
    old = torch.tensor([-1.5, -2.0, -0.5])
    loss, _ = grpo.grpo_token_loss(logps.detach().requires_grad_(), batch, old, None, 0.2, 0.0)
    assert loss[0].item() == pytest.approx(-0.5 * 1.2)


def test_packed_answers_have_the_log_probs_of_padded_ones(tiny_model_dir):
    import torch

    from tunesmith.models.registry import resolve_model
    from tunesmith.train.model import build_model

    cfg = TrainConfig(data="x.jsonl", method="reinforcement", grader="g.json", packing=True)
    model = build_model(resolve_model(str(tiny_model_dir)), cfg, torch.float32)
    prompt = list(range(3, 15))
    samples = [grpo.Sample(0, 1, prompt, [20 + k, 30, 40 + k][: 1 + k], "", "stop", advantage=1.0) for k in range(3)]
    packed = grpo.collate_samples(samples, True, 0)
    assert packed["shared_prefix"] > 0  # the group's prompt is computed once
    padded = grpo.collate_samples(samples, False, 0)
    with torch.no_grad():
        a = grpo.policy_logps(model, packed, torch.float32)
        model.set_attn_implementation("sdpa")
        b = grpo.policy_logps(model, padded, torch.float32)
    assert a.shape == (6,) and torch.allclose(a, b, atol=1e-5)
    keep = packed["targets"] != -100
    assert packed["sequence"][keep].tolist() == [0, 1, 1, 2, 2, 2]


def test_cli_trains_against_python_and_multi_graders_and_logs_what_graders_run_gives(tiny_model_dir, tmp_path):
    from tunesmith.graders.run import run_grader
    from tunesmith.graders.types import parse_grader

    grader = {"type": "multi", "name": "both", "graders": {"length": LENGTH_GRADER, "label": LABEL_GRADER},
              "calculate_output": "0.5 * length + 0.5 * label"}
    out = tmp_path / "run"
    proc = subprocess.run(
        [*TUNESMITH, "train", "--method", "reinforcement", "--model", str(tiny_model_dir),
         "--data", str(write_prompts(tmp_path / "p.jsonl")), "--grader", str(write_grader(tmp_path / "g.json", grader)),
         "--batch-size", "2", "--group-size", "3", "--max-steps", "2", "--max-completion-tokens", "12",
         "--val-split", "0.25", "--kl-coef", "0.05", "--out", str(out)],
        capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = rows(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2]
    for m in metrics:
        assert 0.0 <= m["reward_mean"] <= 1.0 and m["reward_std"] >= 0.0 and 0.0 <= m["zero_variance_groups"] <= 1.0
        assert m["kl"] is not None and m["kl"] >= 0.0 and m["grader_errors"] == 0
        assert 1 <= m["completion_tokens"] <= 12 and m["samples_per_s"] > 0
    assert metrics[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # the adapter starts at zero: policy = reference
    assert metrics[-1]["valid_reward"] is not None and metrics[0]["valid_reward"] is None
    samples = rows(out / "samples.jsonl")
    assert len(samples) == 2 * 2 * 3
    for s in samples[:3] + samples[-3:]:
        item = next(r for r in rows(tmp_path / "p.jsonl") if s["line"] == r["id"] + 1)
        assert run_grader(parse_grader(grader), s["text"], item).reward == s["reward"]
    step1 = [s["reward"] for s in samples if s["step"] == 1]
    assert metrics[0]["reward_mean"] == pytest.approx(sum(step1) / len(step1))
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "finished" and run["config"]["group_size"] == 3
    assert run["resolved"]["grader"]["type"] == "multi"
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    from tunesmith.evaluate.report import build_report

    html = build_report(out).read_text()
    assert "held-out reward" in html and "training reward" in html  # the report plots the reward curves


def test_resume_from_a_checkpoint_continues_identically(tiny_model_dir, tmp_path):
    """Four steps in one go, and two then a resume of the same run: the same answers, rewards,
    losses and final adapter (sampling seeds derive from the seed and the step)."""
    from safetensors.torch import load_file

    data = write_prompts(tmp_path / "p.jsonl", n=8)
    grader = write_grader(tmp_path / "g.json", LENGTH_GRADER)
    common = dict(method="reinforcement", model=str(tiny_model_dir), data=data, grader=grader, batch_size=2,
                  group_size=3, max_steps=4, max_completion_tokens=10, save_every_steps=2, precision="fp32",
                  learning_rate=5e-3, policy_updates=2)
    full = train_rft(TrainConfig(**common, out=tmp_path / "full"), progress=False)
    part = tmp_path / "part"
    shutil.copytree(full.out_dir, part)
    shutil.rmtree(part / "checkpoints" / "step-000004")
    shutil.rmtree(part / "adapter")
    resumed = train_rft(TrainConfig(**common, out=part, resume=part), progress=False)
    assert resumed.steps == 4
    a, b = rows(full.out_dir / "metrics.jsonl"), rows(part / "metrics.jsonl")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for x, y in zip(a[2:], b[2:]):
        assert x["reward_mean"] == y["reward_mean"] and x["train_loss"] == pytest.approx(y["train_loss"], abs=1e-6)
    assert [s["text"] for s in rows(full.out_dir / "samples.jsonl")] == [s["text"] for s in rows(part / "samples.jsonl")]
    wa = load_file(str(full.adapter_dir / "adapter_model.safetensors"))
    wb = load_file(str(resumed.adapter_dir / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys() and all((wa[k] - wb[k]).abs().max() < 1e-6 for k in wa)
    assert any(wa[k].abs().max() > 0 for k in wa if "lora_B" in k)  # it did train


def test_with_an_init_adapter_the_kl_reference_is_that_adapter_frozen(tiny_model_dir, tmp_path):
    """SFT then RFT: with --init-adapter the KL penalty anchors the policy where RL started
    (the init adapter, a frozen second peft adapter), not at the bare base the SFT moved
    away from. Step 1's kl is 0 while the same answers' KL to the base is clearly not; the
    engine samples from the trained adapter, not the reference; checkpoints and the
    published adapter hold only the trained adapter."""
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunesmith.generate.engine import LocalEngine
    from tunesmith.generate.requests import SamplingParams
    from tunesmith.reinforce.run import sample_seed
    from tunesmith.train.inputs import load_training_items
    from tiny_model import make_adapter

    init = make_adapter(tiny_model_dir, tmp_path / "sft", seed=5, scale=2.0)  # LoRA B non-zero: not the base
    cfg = TrainConfig(method="reinforcement", model=str(tiny_model_dir), data=write_prompts(tmp_path / "p.jsonl"),
                      grader=write_grader(tmp_path / "g.json", LENGTH_GRADER), init_adapter=init, kl_coef=0.1,
                      batch_size=2, group_size=3, max_steps=2, max_completion_tokens=8, save_every_steps=1,
                      val_split=0.0, precision="fp32", learning_rate=1e-2, out=tmp_path / "run")
    result = train_rft(cfg, progress=False)
    run = json.loads((result.out_dir / "run.json").read_text())
    assert run["resolved"]["reference"] == f"init adapter {init} (frozen)"
    metrics = rows(result.out_dir / "metrics.jsonl")
    assert metrics[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # policy == reference at the start
    assert metrics[1]["kl"] > 1e-5  # the trained adapter moved; the reference did not

    # Regenerate each step's answers with its seeds: step 1's come from the init adapter,
    # step 2's from the adapter after step 1 (checkpoint 1), which answers otherwise.
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    prompt_ids = {p.line: p.prompt_ids for p in load_training_items(tok, cfg.data, cfg)[0]}
    logged = rows(result.out_dir / "samples.jsonl")
    engine = LocalEngine.load(str(tiny_model_dir), [("init", init), ("step1", result.out_dir / "checkpoints" /
                                                     "step-000001")], precision="fp32")
    try:
        answers = {}
        for step, adapter in ((1, "init"), (2, "step1"), (2, "init")):
            lines = [s["line"] for s in logged if s["step"] == step]
            answers[step, adapter] = engine.generate_batch(
                [prompt_ids[n] for n in lines], adapter, SamplingParams(8, 1.0),
                seeds=[sample_seed(cfg.seed, step - 1, k) for k in range(len(lines))])
    finally:
        engine.close()
    for step, adapter in ((1, "init"), (2, "step1")):
        assert [c.text for c in answers[step, adapter]] == [s["text"] for s in logged if s["step"] == step]
    assert [c.text for c in answers[2, "step1"]] != [c.text for c in answers[2, "init"]]

    # The anchor before this change: the same step-1 answers against the base (adapter off).
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), str(init))
    step1 = [grpo.Sample(0, s["line"], prompt_ids[s["line"]], list(c.token_ids), c.text, c.finish_reason)
             for s, c in zip([s for s in logged if s["step"] == 1], answers[1, "init"])]
    batch = grpo.collate_samples(step1, False, tok.pad_token_id)
    with torch.no_grad():
        policy = grpo.policy_logps(model, batch, torch.float32)
        with model.disable_adapter():
            base = grpo.policy_logps(model, batch, torch.float32)
    _, kl_to_base = grpo.grpo_token_loss(policy, batch, None, base, 0.2, 0.1)
    # 0.025 per token here, what step 1 logged with the base as the reference; now 0.0
    assert kl_to_base.mean().item() > 0.01, kl_to_base.mean().item()

    init_keys = load_file(str(init / "adapter_model.safetensors")).keys()
    for saved in [result.adapter_dir, *(result.out_dir / "checkpoints").glob("step-*")]:
        weights = load_file(str(saved / "adapter_model.safetensors"))
        assert weights.keys() == init_keys and not any("reference" in k for k in weights)
        assert not (saved / "reference").exists()  # peft writes other adapters into subfolders
    trained = load_file(str(result.adapter_dir / "adapter_model.safetensors"))
    assert any((trained[k] - v).abs().max() > 0 for k, v in load_file(str(init / "adapter_model.safetensors")).items())

    # Resumed from checkpoint 1, the reference is the init adapter again (not the checkpoint):
    # step 2 and the final adapter come out as in the uninterrupted run.
    part = tmp_path / "part"
    shutil.copytree(result.out_dir, part)
    shutil.rmtree(part / "checkpoints" / "step-000002")
    shutil.rmtree(part / "adapter")
    resumed = train_rft(cfg.model_copy(update={"out": part, "resume": part}), progress=False)
    again = rows(part / "metrics.jsonl")[1]
    assert again["kl"] == pytest.approx(metrics[1]["kl"], abs=1e-7)
    assert again["train_loss"] == pytest.approx(metrics[1]["train_loss"], abs=1e-6)
    final = load_file(str(resumed.adapter_dir / "adapter_model.safetensors"))
    assert all((final[k] - trained[k]).abs().max() < 1e-6 for k in trained)


def test_grpo_moves_probability_towards_what_the_grader_rewards(tiny_model_dir, tmp_path):
    """The direction of learning, measured without sampling noise: rewarding answers that
    contain a "q" must raise the policy's probability of starting its answer with a token
    that holds one, over the training prompts, against the same model with the adapter off."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    grader = {"type": "string_check", "name": "has_q", "input": "{{sample.output_text}}", "reference": "q",
              "operation": "ilike"}
    data = write_prompts(tmp_path / "p.jsonl", n=8)
    result = train_rft(TrainConfig(method="reinforcement", model=str(tiny_model_dir), data=data,
                                   grader=write_grader(tmp_path / "g.json", grader), batch_size=4, group_size=8,
                                   max_steps=16, max_completion_tokens=8, precision="fp32", learning_rate=1e-2,
                                   val_split=0.0, out=tmp_path / "run"), progress=False)
    metrics = rows(result.out_dir / "metrics.jsonl")
    assert sum(m["zero_variance_groups"] < 1 for m in metrics) >= 4  # the reward told answers apart

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    with_q = torch.tensor(["q" in tok.decode([i]).lower() for i in range(len(tok))])
    assert 0 < int(with_q.sum()) < len(tok) // 10
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), str(result.adapter_dir))
    prompts = [tok(tok.apply_chat_template(r["messages"], add_generation_prompt=True, tokenize=False),
                   add_special_tokens=False)["input_ids"] for r in rows(data)]

    def mass() -> float:
        total = 0.0
        with torch.no_grad():
            for ids in prompts:
                probs = model(torch.tensor([ids])).logits[0, -1].float().softmax(-1)
                total += float(probs[: len(with_q)][with_q].sum())
        return total / len(prompts)

    trained = mass()
    with model.disable_adapter():
        base = mass()
    # 16 steps took it from 0.98% to 1.50%; a sign error in the loss would lower it.
    assert trained > 1.25 * base, (base, trained)


def test_bad_settings_are_one_sentence_each(tiny_model_dir, tmp_path):
    from tunesmith.data.prompts import read_prompt_rows
    from tunesmith.errors import ConfigError
    from tunesmith.graders.files import load_grader
    from tunesmith.graders.types import GraderError
    from tunesmith.train.config import build_config

    data = write_prompts(tmp_path / "p.jsonl")
    proc = subprocess.run([*TUNESMITH, "train", "--model", str(tiny_model_dir), "--data", str(data),
                           "--method", "reinforcement"], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "needs --grader" in proc.stderr and "Traceback" not in proc.stderr
    with pytest.raises(ConfigError, match="'group_size' applies to --method reinforcement only"):
        build_config({"data": str(data), "group_size": 3})
    with pytest.raises(ConfigError, match="'group_size' must be at least 2"):
        build_config({"data": str(data), "method": "reinforcement", "grader": "g.json", "group_size": 1})
    bad = write_grader(tmp_path / "bad.json", {**LABEL_GRADER, "operation": "contains"})
    with pytest.raises(GraderError) as err:
        load_grader(bad)
    assert err.value.param == "grader.operation" and str(bad) in str(err.value)
    answered = tmp_path / "answered.jsonl"
    answered.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                                 {"role": "assistant", "content": "x"}]}) + "\n" + "[1]\n")
    rows_, problems = read_prompt_rows(answered)
    assert rows_ == [] and [(p.line, p.code) for p in problems] == [(1, "ends_with_answer"), (2, "not_an_object")]
    assert "ends where the model answers" in problems[0].message


def test_sigterm_saves_the_last_finished_step_and_resume_finishes_the_run(tiny_model_dir, tmp_path):
    import signal
    import time

    out = tmp_path / "run"
    args = ["train", "--method", "reinforcement", "--model", str(tiny_model_dir),
            "--data", str(write_prompts(tmp_path / "p.jsonl", n=24)),
            "--grader", str(write_grader(tmp_path / "g.json", LENGTH_GRADER)), "--batch-size", "1",
            "--group-size", "2", "--max-completion-tokens", "8", "--out", str(out)]
    proc = subprocess.Popen([*TUNESMITH, *args], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not ((out / "metrics.jsonl").is_file() and rows(out / "metrics.jsonl")):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stderr = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130, stderr[-2000:]
    last_line = stderr.strip().splitlines()[-1]
    assert "stopped by SIGTERM" in last_line and f"tunesmith train --resume {out}" in last_line
    saved = sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert saved, "no checkpoint was saved"
    done = subprocess.run([*TUNESMITH, "train", "--resume", str(out)], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    assert [r["step"] for r in rows(out / "metrics.jsonl")] == list(range(1, 25))
    assert sorted({s["step"] for s in rows(out / "samples.jsonl")}) == list(range(1, 25))
    assert len(rows(out / "samples.jsonl")) == 24 * 2


@pytest.mark.parametrize(("flag", "value", "says"), [
    ("--group-size", "100000", "'group_size' must be at most 64"),
    ("--max-completion-tokens", "1000000000", "'max_completion_tokens' must be at most 4096"),
    ("--eval-samples", "17", "'eval_samples' must be at most 16"),
    ("--temperature", "nan", "'temperature' must be a finite number"),
    ("--kl-coef", "inf", "'kl_coef' must be a finite number"),
])
def test_reinforcement_settings_are_bounded_as_in_the_jobs_api(tiny_model_dir, tmp_path, flag, value, says):
    """The jobs API bounded these; `tunesmith train` took any value (hours of sampling, or an
    allocation that cannot succeed, or NaN rewards)."""
    from tunesmith.errors import ConfigError
    from pydantic import ValidationError

    from tunesmith.serve.jobs_protocol import ReinforcementHyperparameters
    from tunesmith.train.config import RL_BOUNDS, build_config

    data = write_prompts(tmp_path / "p.jsonl")
    grader = write_grader(tmp_path / "g.json", LABEL_GRADER)
    key = flag.removeprefix("--").replace("-", "_")
    with pytest.raises(ConfigError, match=says):
        build_config({"data": str(data), "method": "reinforcement", "grader": str(grader), key: float(value)})
    high = RL_BOUNDS[key][1]  # the most both take
    build_config({"data": str(data), "method": "reinforcement", "grader": str(grader), key: high})
    ReinforcementHyperparameters(**{key: high})
    with pytest.raises(ValidationError):
        ReinforcementHyperparameters(**{key: high * 2})
    if flag == "--group-size":  # once through the real CLI: a sentence and a non-zero exit, no traceback
        proc = subprocess.run([*TUNESMITH, "train", "--model", str(tiny_model_dir), "--data", str(data), "--method",
                               "reinforcement", "--grader", str(grader), flag, value],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode != 0 and says in proc.stderr and "Traceback" not in proc.stderr
