"""Preference tuning (`tunesmith train --method dpo`) on the tiny model: the loss and its
first step, packing and gradient accumulation, learning a preferred style, resume,
--init-adapter, and the sentences for the wrong kind of data."""

from __future__ import annotations

import json
import math
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tunesmith.data.example import Message, PreferenceExample
from tunesmith.data.render import IGNORE_INDEX
from tunesmith.errors import UsageError
from tunesmith.train import preference as pref
from tunesmith.train.config import TrainConfig
from tunesmith.train.run import train

from in_process import run_tunesmith
from tiny_model import save_learnable_tiny_model

TUNESMITH = [sys.executable, "-c", "from tunesmith.cli import main; main()"]
TOPICS = ["label", "answer", "question", "json", "positive", "negative", "neutral", "true"]
WORDS = ["card", "password", "France", "capital", "dog", "quick", "brown", "lazy"]


def style_pairs(n: int, seed: int) -> list[dict]:
    """Pairs that differ only in style: the chosen answer starts with "wait", the rejected one
    with "pass" (both single tokens of the tiny tokenizer), the rest is the same word."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        word = rng.choice(WORDS)
        rows.append({"prompt": "topic: " + " ".join(rng.choice(TOPICS) for _ in range(3)),
                     "chosen": f"wait {word}", "rejected": f"pass {word}"})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("dpo") / "pairs.jsonl", style_pairs(24, seed=1))


def _pairs(tok, n=8, seed=5):
    prefs = [PreferenceExample(prompt=(Message("user", r["prompt"]),), chosen=(Message("assistant", r["chosen"], True),),
                               rejected=(Message("assistant", r["rejected"], True),), line=i + 1)
             for i, r in enumerate(style_pairs(n, seed))]
    return pref.render_pairs(tok, prefs, 512, "test")[0]


def test_pairs_are_rendered_as_sft_renders_answers(tiny_tokenizer):
    """Prompt tokens (an earlier assistant turn included) carry no label; each answer and its
    end-of-turn token do; both sequences begin with the same prompt tokens."""
    p = PreferenceExample(
        prompt=(Message("user", "first question"), Message("assistant", "an earlier answer", train=True),
                Message("user", "and now?")),
        chosen=(Message("assistant", "wait card", train=True),),
        rejected=(Message("assistant", "pass dog", train=True),), line=1)
    (pair,), stats = pref.render_pairs(tiny_tokenizer, [p], 512, "test")

    def trained_text(t):
        return tiny_tokenizer.decode([i for i, lab in zip(t.input_ids, t.labels) if lab != IGNORE_INDEX])

    assert trained_text(pair.chosen) == "wait card<|im_end|>"
    assert trained_text(pair.rejected) == "pass dog<|im_end|>"
    n_prompt = pair.chosen.labels.index(next(lab for lab in pair.chosen.labels if lab != IGNORE_INDEX))
    assert pair.chosen.input_ids[:n_prompt] == pair.rejected.input_ids[:n_prompt]
    assert "an earlier answer" in tiny_tokenizer.decode(pair.chosen.input_ids[:n_prompt])
    assert stats.examples == 1 and stats.tokens == len(pair.chosen) + len(pair.rejected)
    assert stats.trained_tokens == pair.chosen.n_trained + pair.rejected.n_trained


def test_dpo_loss_is_the_sigmoid_loss_of_reward_differences():
    import torch

    policy = torch.tensor([[-10.0, -12.0], [-5.0, -4.0]], dtype=torch.float64)
    reference = torch.tensor([[-11.0, -11.0], [-5.0, -4.0]], dtype=torch.float64)
    losses, rewards = pref.dpo_loss(policy, reference, beta=0.5)
    # pair 0: chosen gained 1 nat, rejected lost 1: reward 0.5 vs -0.5
    assert rewards.tolist() == [[0.5, -0.5], [0.0, 0.0]]
    assert losses[0].item() == pytest.approx(-math.log(1 / (1 + math.exp(-1.0))), abs=1e-12)
    assert losses[1].item() == pytest.approx(math.log(2), abs=1e-12)  # policy == reference
    assert pref.reward_metrics(pref._reward_sums(rewards), 2) == {
        "rewards_chosen": 0.25, "rewards_rejected": -0.25, "reward_margin": 0.5, "reward_accuracy": 0.5}


def test_packed_sequence_logps_equal_unpacked(tiny_model_dir, tiny_tokenizer):
    """Chosen and rejected of several pairs in one padding-free row give the same per-sequence
    log-prob sums as padded rows and as each sequence alone through the plain model."""
    import torch
    import torch.nn.functional as F

    from tunesmith.models.registry import resolve_model
    from tunesmith.train.model import build_model, trainable_parameters

    pairs = _pairs(tiny_tokenizer, n=6)
    cfg = TrainConfig(data="x.jsonl", model=str(tiny_model_dir), method="dpo", precision="fp32")
    torch.manual_seed(0)
    model = build_model(resolve_model(cfg.model), cfg, torch.float32)
    for _, p in trainable_parameters(model):  # a non-zero adapter, so the LoRA path counts too
        p.data.normal_(0, 0.1)
    model.eval()
    with torch.no_grad():
        packed = pref.sequence_logps(model, pref.collate_pairs(pairs, True, 0), torch.float32)
        model.set_attn_implementation("sdpa")
        padded = pref.sequence_logps(model, pref.collate_pairs(pairs, False, tiny_tokenizer.pad_token_id),
                                     torch.float32)
        alone = []
        for seq in (s for p in pairs for s in (p.chosen, p.rejected)):
            logits = model(input_ids=torch.tensor([seq.input_ids])).logits[0, :-1]
            labels = torch.tensor(seq.labels[1:])
            keep = labels != IGNORE_INDEX
            alone.append(-F.cross_entropy(logits[keep], labels[keep], reduction="sum").item())
    assert packed.shape == (12,) and packed.dtype == torch.float64
    assert torch.allclose(packed, torch.tensor(alone, dtype=torch.float64), atol=1e-4, rtol=0)
    assert torch.allclose(padded, packed, atol=1e-4, rtol=0)
    assert packed.max() < -1.0  # real sums over several tokens, not zeros


@pytest.mark.parametrize("packing", [True, False])
def test_gradient_accumulation_equals_one_batch(tiny_model_dir, tiny_tokenizer, packing):
    """4 micro-batches of 2 pairs give the gradient and loss of one batch of 8 (fp32, 1e-5)."""
    import torch

    from tunesmith.models.registry import resolve_model
    from tunesmith.train.model import build_model, trainable_parameters
    from tunesmith.train.run import Dist

    pairs = _pairs(tiny_tokenizer, n=8)
    results = {}
    for micro in (None, 2):
        cfg = TrainConfig(data="x.jsonl", model=str(tiny_model_dir), method="dpo", precision="fp32", packing=packing,
                          micro_batch_size=micro, batch_size=len(pairs), beta=0.5)
        torch.manual_seed(0)
        model = build_model(resolve_model(cfg.model), cfg, torch.float32)
        with_ref = pref.reference_logps(model, pairs, cfg, 0, torch.float32, Dist(), adapter_is_reference=False)
        for _, p in trainable_parameters(model):  # move the policy away from the reference
            p.data.normal_(0, 0.1)
        loss_sum, tokens, sums = pref.accumulate_gradients(model, with_ref, len(pairs), cfg, 0, torch.float32, "cpu")
        grads = torch.cat([p.grad.reshape(-1) for _, p in trainable_parameters(model)])
        results[micro] = (loss_sum, tokens, sums, grads)
    (l1, t1, s1, g1), (l4, t4, s4, g4) = results[None], results[2]
    assert g1.abs().max() > 1e-4 and abs(l1 / 8 - math.log(2)) > 1e-3  # non-trivial
    assert torch.allclose(g4, g1, atol=1e-5, rtol=0)
    assert abs(l4 - l1) < 1e-5 and t4 == t1 and s4 == pytest.approx(s1, abs=1e-6)


def test_cli_first_step_is_log2_and_metrics_carry_rewards(tiny_model_dir, pairs_file, tmp_path):
    """With the adapter at zero the policy is the reference: loss log(2), rewards 0 at step 1.
    metrics.jsonl and run.json carry the reward metrics; --dry-run shows the plan."""
    out = tmp_path / "run"
    args = ["train", "--model", str(tiny_model_dir), "--data", str(pairs_file), "--method", "dpo", "--precision",
            "fp32", "--batch-size", "4", "--max-steps", "4", "--val-split", "0.25", "--eval-every-steps", "2",
            "--learning-rate", "1e-2", "--beta", "0.2"]
    dry = run_tunesmith(*args, "--dry-run")  # in this process: test_train_run.py runs the real command
    assert dry.returncode == 0, dry.stderr
    plan = json.loads(dry.stdout)
    assert plan["config"]["method"] == "dpo" and plan["config"]["beta"] == 0.2
    assert plan["data"]["train_pairs"] == 18 and plan["data"]["validation_pairs"] == 6
    assert plan["resolved"]["total_steps"] == 4 and plan["estimate"]["reference_pass_tokens"] > 0

    proc = run_tunesmith(*args, "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "18 train / 6 validation preference pairs" in proc.stderr and "beta 0.2" in proc.stderr
    assert "reward acc" in proc.stderr and "reference log-probs of 24 pairs" in proc.stderr
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert set(rows[0]) == {"step", "epoch", "train_loss", "valid_loss", "token_accuracy", "lr", "grad_norm", "tokens_per_s",
                            "elapsed", "rewards_chosen", "rewards_rejected", "reward_margin", "reward_accuracy",
                            "valid_reward_accuracy", "valid_reward_margin"}
    assert rows[0]["train_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert rows[0]["rewards_chosen"] == pytest.approx(0, abs=1e-6)
    assert rows[0]["rewards_rejected"] == pytest.approx(0, abs=1e-6)
    assert rows[-1]["train_loss"] < math.log(2) and rows[-1]["reward_margin"] > 0
    assert rows[1]["valid_loss"] is not None and rows[0]["valid_loss"] is None
    assert 0.0 <= rows[1]["valid_reward_accuracy"] <= 1.0 and rows[1]["token_accuracy"] is None
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "finished" and info["resolved"]["reference"] == "base model (adapter disabled)"
    assert info["metrics"]["reward_accuracy"] is not None and info["metrics"]["valid_reward_accuracy"] is not None
    assert info["data"]["train"]["examples"] == 24  # before the split, as for SFT
    meta = json.loads((out / "adapter" / "tunesmith_adapter.json").read_text())
    assert meta["method"] == "dpo" and (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / pref.REFERENCE_FILE).is_file()


@pytest.mark.parametrize("packing", [True, False])
def test_first_step_is_exactly_log2_in_bf16(tiny_model_dir, pairs_file, tmp_path, packing):
    """The reference pass lays the pairs out as the first epoch's steps do (uneven micro-batches
    here), so the first step's forward is the reference's forward, operation for operation:
    in bf16, where differently shaped matmuls round differently, the first loss is still log(2)
    and every reward exactly 0."""
    train(TrainConfig(model=str(tiny_model_dir), data=pairs_file, out=tmp_path / "run", method="dpo", max_steps=2,
                      batch_size=5, micro_batch_size=2, precision="bf16", packing=packing, val_split=0.25,
                      learning_rate=1e-2), progress=False)
    first, second = metrics(tmp_path / "run")
    assert first["train_loss"] == math.log(2)
    assert first["rewards_chosen"] == first["rewards_rejected"] == first["reward_accuracy"] == 0.0
    assert second["train_loss"] < math.log(2) - 1e-3  # the adapter did move after step 1



def test_dpo_learns_the_preferred_style(tmp_path):
    """Chosen answers start with "wait", rejected ones with "pass", the words after are the
    same. The base model never starts an answer with "wait". After 12 steps: reward accuracy
    on held-out pairs (new prompts) well above chance, and the tuned model's greedy answers to
    held-out prompts start with "wait"."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunesmith.data.render import render_prompt

    base = save_learnable_tiny_model(tmp_path / "base")
    heldout = style_pairs(16, seed=2)
    result = train(TrainConfig(model=str(base), data=write_jsonl(tmp_path / "train.jsonl", style_pairs(48, seed=1)),
                               validation=write_jsonl(tmp_path / "heldout.jsonl", heldout), out=tmp_path / "run",
                               method="dpo", max_steps=12, batch_size=8, precision="fp32", learning_rate=1e-2,
                               warmup_ratio=0.0), progress=False)
    rows = metrics(result.out_dir)
    assert rows[0]["train_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert result.metrics["valid_reward_accuracy"] >= 0.8, result.metrics
    assert result.metrics["valid_loss"] < 0.5 * math.log(2)

    tok = AutoTokenizer.from_pretrained(str(base))
    wait_id = tok.convert_tokens_to_ids("wait")
    prompts = [render_prompt(tok, [Message("user", r["prompt"])]) for r in heldout]

    def measure(model):
        """(share of greedy answers that start with "wait", mean probability of "wait" first)."""
        starts, probs = 0, []
        with torch.no_grad():
            for ids in prompts:
                out = model.generate(torch.tensor([ids]), max_new_tokens=3, do_sample=False,
                                     pad_token_id=tok.pad_token_id)
                starts += tok.decode(out[0, len(ids):], skip_special_tokens=True).startswith("wait")
                probs.append(model(input_ids=torch.tensor([ids])).logits[0, -1].softmax(-1)[wait_id].item())
        return starts / len(prompts), sum(probs) / len(probs)

    base_share, base_p = measure(AutoModelForCausalLM.from_pretrained(str(base)).eval())
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base)), str(result.adapter_dir)).eval()
    tuned_share, tuned_p = measure(tuned)
    assert base_share <= 0.2 and tuned_share >= 0.8, (base_share, tuned_share)
    assert tuned_p > 10 * base_p, (base_p, tuned_p)


def test_resume_gives_the_same_steps(tiny_model_dir, pairs_file, tmp_path, capsys):
    """A run that lost everything after step 3's checkpoint resumes (reading its reference
    log-probs back) and redoes steps 4-6 with the same losses, rewards and adapter."""
    from safetensors.torch import load_file

    from tunesmith.train.config import resolve_config

    out = tmp_path / "run"
    train(TrainConfig(model=str(tiny_model_dir), data=pairs_file, out=out, method="dpo", max_steps=6, batch_size=4,
                      precision="fp32", learning_rate=1e-2, lora_dropout=0.1, save_every_steps=3, seed=3),
          progress=False)
    first = metrics(out)
    first_adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    shutil.rmtree(out / "checkpoints" / "step-000006")  # as if killed after step 3's checkpoint
    shutil.rmtree(out / "adapter")
    capsys.readouterr()
    train(resolve_config(None, {"resume": out}), progress=False)  # what `tunesmith train --resume OUT` runs
    err = capsys.readouterr().err
    assert "resuming" in err and "reference log-probs read from" in err
    again = metrics(out)
    assert [r["step"] for r in again] == list(range(1, 7))
    for a, b in zip(first, again):
        for key in ("train_loss", "lr", "rewards_chosen", "rewards_rejected", "reward_accuracy"):
            assert a[key] == pytest.approx(b[key], abs=1e-6), (a["step"], key)
    assert first[-1]["train_loss"] < first[0]["train_loss"]  # the steps compared did train
    resumed = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert max((first_adapter[k] - resumed[k]).abs().max().item() for k in resumed) < 1e-6


def test_init_adapter_is_the_starting_point_and_the_reference(tiny_model_dir, pairs_file, tmp_path):
    """DPO from an SFT adapter: the adapter's shape is adopted, its weights are the start and
    the reference (first-step loss log(2) although the adapter is not zero), a clashing shape
    or another base model is refused with a sentence."""
    from safetensors.torch import load_file

    from tiny_model import save_tiny_model

    chat = write_jsonl(tmp_path / "chat.jsonl", [
        {"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["chosen"]}]}
        for r in style_pairs(16, seed=4)])
    sft = train(TrainConfig(model=str(tiny_model_dir), data=chat, out=tmp_path / "sft", max_steps=3, batch_size=8,
                            precision="fp32", lora_rank=4, lora_target_modules="q_proj,v_proj"), progress=False)
    common = dict(model=str(tiny_model_dir), data=pairs_file, method="dpo", batch_size=8, precision="fp32",
                  init_adapter=sft.out_dir)
    result = train(TrainConfig(**common, out=tmp_path / "dpo", max_steps=2), progress=False)
    rows = metrics(result.out_dir)
    assert rows[0]["train_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert rows[0]["rewards_chosen"] == pytest.approx(0, abs=1e-6)
    config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert config["r"] == 4 and sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    info = json.loads((result.out_dir / "run.json").read_text())
    assert info["resolved"]["reference"] == str(sft.adapter_dir) and info["resolved"]["lora_rank"] == 4
    # The reference really is the SFT policy, not the bare base.
    from_sft = load_file(str(result.out_dir / pref.REFERENCE_FILE))["train"]
    bare = train(TrainConfig(**{**common, "init_adapter": None}, out=tmp_path / "bare", max_steps=1,
                             lora_rank=4, lora_target_modules="q_proj,v_proj"), progress=False)
    from_base = load_file(str(bare.out_dir / pref.REFERENCE_FILE))["train"]
    assert (from_sft - from_base).abs().max() > 1e-3

    with pytest.raises(UsageError, match=r"--init-adapter .* fixes the adapter's shape.*--lora-rank 8 \(the adapter has 4\)"):
        train(TrainConfig(**common, out=tmp_path / "clash", lora_rank=8), progress=False)
    other = save_tiny_model(tmp_path / "other-base", seed=1)
    with pytest.raises(UsageError, match=r"--init-adapter: adapter .* was trained on base model .*; pass --model"):
        train(TrainConfig(**{**common, "model": str(other)}, out=tmp_path / "other"), progress=False)
    assert not (tmp_path / "clash").exists() and not (tmp_path / "other").exists()  # refused before any work


def test_each_method_refuses_the_other_kind_of_data(tiny_model_dir, pairs_file, tmp_path):
    chat = write_jsonl(tmp_path / "chat.jsonl", [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}] * 4)
    with pytest.raises(UsageError, match="holds preference pairs .* train on them with --method dpo"):
        train(TrainConfig(model=str(tiny_model_dir), data=pairs_file, out=tmp_path / "a"), progress=False)
    with pytest.raises(UsageError, match="holds supervised examples .* not preference pairs.*--method lora"):
        train(TrainConfig(model=str(tiny_model_dir), data=chat, method="dpo", out=tmp_path / "b"), progress=False)
    from tunesmith.errors import ConfigError
    from tunesmith.train.config import build_config

    with pytest.raises(ConfigError, match=r"'beta' applies to --method dpo only \(got 0.3\)"):
        build_config({"data": "x.jsonl", "beta": 0.3})
    with pytest.raises(ConfigError, match="'beta' must be positive"):
        build_config({"data": "x.jsonl", "method": "dpo", "beta": 0})


def test_two_fsdp_processes_match_one(tiny_model_dir, pairs_file, tmp_path):
    """--nproc 2 --distributed-strategy fsdp: each process computes its share of the reference
    log-probs (before sharding) and of each step's pairs; losses and reward sums ride on the
    all-reduce. Batches of 5 pairs split 3/2 with micro-batches of 2, so one process runs a
    zero-weighted filler pass. (DDP shares all of this but the sharding; it is the cheaper
    case, left out to keep the test's time down.)"""
    import os

    args = ["train", "--model", str(tiny_model_dir), "--data", str(pairs_file), "--method", "dpo", "--precision",
            "fp32", "--batch-size", "5", "--micro-batch-size", "2", "--max-steps", "3", "--val-split", "0.25",
            "--learning-rate", "1e-2", "--seed", "3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    train(TrainConfig(model=str(tiny_model_dir), data=pairs_file, method="dpo", precision="fp32", batch_size=5,
                      micro_batch_size=2, max_steps=3, val_split=0.25, learning_rate=1e-2, seed=3,
                      out=tmp_path / "one"), progress=False)
    runs = {"one": metrics(tmp_path / "one")}
    for name, extra in (("fsdp", ["--nproc", "2", "--distributed-strategy", "fsdp"]),):
        proc = subprocess.run([*TUNESMITH, *args, *extra, "--out", str(tmp_path / name)], capture_output=True,
                              text=True, env=env)
        assert proc.returncode == 0, proc.stderr
        runs[name] = metrics(tmp_path / name)
    for name in ("fsdp",):
        assert [r["step"] for r in runs[name]] == [1, 2, 3]
        for a, b in zip(runs["one"], runs[name]):
            for key in ("train_loss", "rewards_chosen", "rewards_rejected"):
                assert a[key] == pytest.approx(b[key], abs=1e-5), (name, a["step"], key)
            assert a["reward_accuracy"] == b["reward_accuracy"], (name, a["step"])
        # exact rewards; the loss sum travels through the fp32 all-reduce, hence the approx
        assert runs[name][0]["rewards_chosen"] == 0.0
        assert runs[name][0]["train_loss"] == pytest.approx(math.log(2), abs=1e-7)
        assert runs[name][-1]["valid_loss"] == pytest.approx(runs["one"][-1]["valid_loss"], abs=1e-5)
        assert runs[name][-1]["valid_reward_accuracy"] == runs["one"][-1]["valid_reward_accuracy"]
    assert runs["one"][-1]["train_loss"] < runs["one"][0]["train_loss"]
