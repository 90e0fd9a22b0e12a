"""End to end on the tiny model: the real CLI, the run directory, resume, stops, DDP."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from in_process import run_tunesmith

from tunesmith.errors import UsageError
from tunesmith.train.config import TrainConfig
from tunesmith.train.run import train

REPO = Path(__file__).resolve().parents[2]
TUNESMITH = [sys.executable, "-c", "from tunesmith.cli import main; main()"]


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    rows = []
    for i in range(24):
        q = ["What is the capital of France?", "How do I reset my password?", "I am still waiting on my card?"][i % 3]
        a = ["Paris.", "Click on forgot password.", "card_arrival", "exchange_rate"][i % 4]
        rows.append({"messages": [{"role": "user", "content": f"{q} {i}"}, {"role": "assistant", "content": f"{a} {i % 5}"}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def cli(*args: str, env_extra: dict | None = None, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([*TUNESMITH, "train", *args], capture_output=True, text=True, env=env, **kw)


def cli_here(*args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    """`tunesmith train ARGS` in this process (tests/in_process.py): for the runs whose child
    process would only add seconds of importing torch. Runs that are signalled, limited,
    launch ranks or compile stay real child processes (`cli`)."""
    return run_tunesmith("train", *args, env=env_extra)


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def common(model: Path, data: Path) -> list[str]:
    return ["--model", str(model), "--data", str(data), "--precision", "fp32", "--batch-size", "4", "--seed", "3"]


def test_cli_run_leaves_a_complete_run_dir(tiny_model_dir, chat_file, tmp_path):
    out = tmp_path / "run"
    proc = cli(*common(tiny_model_dir, chat_file), "--out", str(out), "--max-steps", "6", "--val-split", "0.25",
               "--eval-every-steps", "3", "--save-every-steps", "2", "--lora-rank", "4")
    assert proc.returncode == 0, proc.stderr
    assert "trainable" in proc.stderr and "steps/epoch" in proc.stderr and "tokens/step" in proc.stderr

    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "finished" and info["config"]["lora_rank"] == 4
    assert info["base_model"]["sha256"] and info["versions"]["torch"]
    assert list(info["data"]["hashes"].values())[0] and info["data"]["train"]["examples"] == 24
    assert info["metrics"]["steps"] == 6 and info["metrics"]["valid_loss"] > 0
    # The machine and the precision are said, with why (issue 24).
    machine = info["resolved"]["machine"]
    assert machine["class"] in {"CUDA", "AMX", "AVX512-BF16", "AVX2", "other"} and machine["threads"] >= 1
    assert info["resolved"]["precision"] == "float32" and info["resolved"]["precision_reason"] == "--precision fp32"
    assert f"machine: {machine['class']} (" in proc.stderr and "precision float32 (--precision fp32)" in proc.stderr

    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert set(rows[0]) == {"step", "epoch", "train_loss", "valid_loss", "token_accuracy", "lr", "grad_norm",
                            "tokens_per_s", "elapsed"}
    assert all(r["grad_norm"] > 0 for r in rows)
    assert rows[2]["valid_loss"] is not None and rows[3]["valid_loss"] is None
    assert 0.0 <= rows[5]["token_accuracy"] <= 1.0

    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert "step-000006" in names and "best.json" in names and not any(n.startswith(".tmp") for n in names)
    ckpt = out / "checkpoints" / "step-000006"
    for f in ("adapter_config.json", "adapter_model.safetensors", "tunesmith_adapter.json", "trainer_state.json",
              "optimizer.safetensors", "rng.safetensors"):
        assert (ckpt / f).is_file(), f
    assert not list(ckpt.glob("*.bin")) and not list(ckpt.glob("*.pt"))
    best = json.loads((out / "checkpoints" / "best.json").read_text())
    valid = {r["step"]: r["valid_loss"] for r in rows if r["valid_loss"] is not None}
    assert best["step"] == min(valid, key=valid.get)
    meta = json.loads((out / "adapter" / "tunesmith_adapter.json").read_text())
    assert meta["step"] == best["step"] and meta["method"] == "lora" and meta["base_model"] == info["base_model"]


def test_adapter_loads_with_peft_and_refuses_other_base(tiny_model_dir, chat_file, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tiny_model import save_tiny_model
    from tunesmith.errors import UsageError
    from tunesmith.models.adapters import check_base, resolve_adapter
    from tunesmith.models.registry import identity, resolve_model

    out = tmp_path / "run"
    result = train(TrainConfig(model=str(tiny_model_dir), data=chat_file, out=out, max_steps=3, batch_size=4,
                               precision="fp32", learning_rate=1e-2), progress=False)
    assert result.adapter_dir == out / "adapter" and resolve_adapter(out) == out / "adapter" and result.steps == 3
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    ids = torch.tensor([[1, 5, 9, 12]])
    before = base(input_ids=ids).logits
    tuned = PeftModel.from_pretrained(base, str(result.adapter_dir))
    assert not torch.allclose(tuned(input_ids=ids).logits, before)
    check_base(result.adapter_dir, identity(resolve_model(str(tiny_model_dir))))
    other = save_tiny_model(tmp_path / "other", seed=1)
    with pytest.raises(UsageError, match="was trained on base model"):
        check_base(result.adapter_dir, identity(resolve_model(str(other))))


def test_init_adapter_continues_an_adapter_with_more_sft(tiny_model_dir, chat_file, tmp_path):
    """--method lora --init-adapter RUN: the run starts from that adapter's weights and shape
    (its first loss is the trained adapter's, not a fresh one's) and saves one adapter."""
    from safetensors.torch import load_file

    from tunesmith.errors import ConfigError
    from tunesmith.train.config import build_config

    common_cfg = dict(model=str(tiny_model_dir), data=chat_file, batch_size=4, precision="fp32", seed=3)
    first = train(TrainConfig(**common_cfg, out=tmp_path / "first", max_steps=8, learning_rate=3e-2, lora_rank=4,
                              lora_target_modules="q_proj,v_proj"), progress=False)
    # Same seed, so step 1 sees the same batch: from the trained adapter its loss is far lower.
    more = train(TrainConfig(**common_cfg, out=tmp_path / "more", max_steps=2, learning_rate=1e-2,
                             init_adapter=first.out_dir), progress=False)
    fresh_loss, continued_loss = metrics(first.out_dir)[0]["train_loss"], metrics(more.out_dir)[0]["train_loss"]
    assert continued_loss < fresh_loss - 0.2, (fresh_loss, continued_loss)
    config = json.loads((more.adapter_dir / "adapter_config.json").read_text())
    assert config["r"] == 4 and sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    info = json.loads((more.out_dir / "run.json").read_text())
    assert info["resolved"]["init_adapter"] == str(first.adapter_dir) and info["config"]["method"] == "lora"
    meta = json.loads((more.adapter_dir / "tunesmith_adapter.json").read_text())
    assert meta["init_adapter"] == str(first.adapter_dir)

    # With a vanishing learning rate one step leaves the weights where the init adapter had them.
    still = train(TrainConfig(**common_cfg, out=tmp_path / "still", max_steps=1, learning_rate=1e-30,
                              init_adapter=first.out_dir), progress=False)
    want, got = load_file(str(first.adapter_dir / "adapter_model.safetensors")), \
        load_file(str(still.adapter_dir / "adapter_model.safetensors"))
    assert set(got) == set(want) and max((got[k] - want[k]).abs().max().item() for k in want) < 1e-6

    with pytest.raises(ConfigError, match=r"'init_adapter' applies to --method lora, dpo and reinforcement only.*\(got 'runs/sft'\)"):
        build_config({"data": "x.jsonl", "method": "full", "init_adapter": "runs/sft"})


def test_config_errors_are_one_sentence(tiny_model_dir, chat_file, tmp_path):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text(f"data: {chat_file}\nlerning_rate: 0.1\nbatch_size: 0\n")
    proc = cli_here("-c", str(yaml_file))
    assert proc.returncode == 2
    assert "unknown key 'lerning_rate'; did you mean 'learning_rate'?" in proc.stderr
    assert "'batch_size' must be a positive integer (got 0)" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_yaml_with_flag_override_and_dry_run(tiny_model_dir, chat_file, tmp_path):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text(f"model: {tiny_model_dir}\ndata: {chat_file}\nbatch_size: 4\nepochs: 2\nlearning_rate: 0.1\n")
    proc = cli_here("-c", str(yaml_file), "--batch-size", "8", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["config"]["batch_size"] == 8 and report["config"]["learning_rate"] == 0.1
    assert report["resolved"]["steps_per_epoch"] == 3 and report["resolved"]["total_steps"] == 6
    assert report["data"]["train_examples"] == 24 and report["estimate"]["tokens"] > 0


def _reference(model, data, out, **kw) -> list[dict]:
    train(TrainConfig(model=str(model), data=data, out=out, precision="fp32", batch_size=4, seed=3,
                      lora_dropout=0.1, **kw), progress=False)
    return metrics(out)


def _same_curve(a: list[dict], b: list[dict]) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        assert abs(ra["lr"] - rb["lr"]) < 1e-9, ra["step"]
        assert abs(ra["train_loss"] - rb["train_loss"]) < 1e-6, (ra["step"], ra["train_loss"], rb["train_loss"])


def _same_adapter(a: Path, b: Path) -> None:
    from safetensors.torch import load_file

    wa, wb = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys()
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-6


def _wait_for(predicate, proc, timeout_s=120):
    t0 = time.monotonic()
    while not predicate():
        assert proc.poll() is None, "the run ended before it could be stopped"
        assert time.monotonic() - t0 < timeout_s
        time.sleep(0.02)


def test_resume_after_sigkill_mid_epoch_is_exact(tiny_model_dir, chat_file, tmp_path):
    steps = 24  # 6 steps per epoch
    ref = _reference(tiny_model_dir, chat_file, tmp_path / "ref", max_steps=steps)
    out = tmp_path / "run"
    args = [*common(tiny_model_dir, chat_file), "--lora-dropout", "0.1", "--max-steps", str(steps),
            "--save-every-steps", "2", "--out", str(out)]
    proc = subprocess.Popen([*TUNESMITH, "train", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for(lambda: (out / "checkpoints" / "step-000004").is_dir(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "adapter").exists()  # it really was killed mid-run
    proc = cli_here("--resume", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "resuming" in proc.stderr
    _same_curve(ref, metrics(out))
    _same_adapter(tmp_path / "ref" / "adapter", out / "adapter")


def test_sigterm_in_second_epoch_saves_and_resumes_exactly(tiny_model_dir, chat_file, tmp_path):
    steps = 18
    ref = _reference(tiny_model_dir, chat_file, tmp_path / "ref", max_steps=steps)
    out = tmp_path / "run"
    args = [*common(tiny_model_dir, chat_file), "--lora-dropout", "0.1", "--max-steps", str(steps), "--out", str(out)]
    proc = subprocess.Popen([*TUNESMITH, "train", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: (out / "metrics.jsonl").is_file() and len(metrics(out)) >= 8, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    last_line = err.strip().splitlines()[-1]
    assert "stopped by SIGTERM" in last_line and f"tunesmith train --resume {out}" in last_line
    stopped_at = metrics(out)[-1]["step"]
    assert 8 <= stopped_at < steps and (out / "checkpoints" / f"step-{stopped_at:06d}").is_dir()
    proc = cli_here("--resume", str(out))
    assert proc.returncode == 0, proc.stderr
    _same_curve(ref, metrics(out))
    _same_adapter(tmp_path / "ref" / "adapter", out / "adapter")


def test_nan_loss_stops_with_last_checkpoint_intact(tiny_model_dir, chat_file, tmp_path):
    out = tmp_path / "run"
    proc = cli_here(*common(tiny_model_dir, chat_file), "--out", str(out), "--max-steps", "10", "--learning-rate", "1e30",
               "--max-grad-norm", "0", "--save-every-steps", "1", "--warmup-ratio", "0")
    assert proc.returncode == 1
    line = proc.stderr.strip().splitlines()[-1]
    assert "training loss became nan" in line.lower() and "lower --learning-rate" in line
    good = sorted((out / "checkpoints").glob("step-*"))
    assert good and "is intact" in line and good[-1].name in line
    assert json.loads((good[-1] / "trainer_state.json").read_text())["step"] == int(good[-1].name.split("-")[1])


def test_full_disk_keeps_previous_checkpoint(tiny_model_dir, chat_file, tmp_path):
    import resource

    out = tmp_path / "run"

    def limit_file_size():  # every file may grow to 64 KB: metrics fit, a checkpoint does not
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    proc = subprocess.run([*TUNESMITH, "train", *common(tiny_model_dir, chat_file), "--out", str(out),
                           "--max-steps", "4", "--save-every-steps", "2", "--lora-rank", "64"],
                          capture_output=True, text=True, preexec_fn=limit_file_size)
    assert proc.returncode == 1, proc.stderr
    assert "disk is full" in proc.stderr and "Traceback" not in proc.stderr
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".tmp")]


def test_full_fine_tuning_leaves_a_model_dir(tiny_model_dir, chat_file, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "full"
    result = train(TrainConfig(model=str(tiny_model_dir), data=chat_file, out=out, method="full", max_steps=2,
                               batch_size=4, precision="fp32", learning_rate=1e-3), progress=False)
    assert (result.adapter_dir / "config.json").is_file() and (result.adapter_dir / "tokenizer_config.json").is_file()
    assert json.loads((result.adapter_dir / "tunesmith_adapter.json").read_text())["method"] == "full"
    AutoModelForCausalLM.from_pretrained(str(result.adapter_dir))
    # Given where an adapter goes (serve --adapter, a job's published model), the sentence says
    # what the folder holds and how to serve it, not "holds no adapter".
    from tunesmith.models.adapters import resolve_adapter

    for given in (out, result.adapter_dir):
        with pytest.raises(UsageError, match=rf"whole fine-tuned weights .* tunesmith serve --model {re.escape(str(result.adapter_dir))}$"):
            resolve_adapter(given)


def test_two_processes_match_one(tiny_model_dir, chat_file, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    args = [*common(tiny_model_dir, chat_file), "--max-steps", "4", "--batch-size", "8", "--val-split", "0.25"]
    p1 = cli_here(*args, "--out", str(one))
    assert p1.returncode == 0, p1.stderr
    p2 = cli(*args, "--out", str(two), "--nproc", "2", env_extra={"OMP_NUM_THREADS": "1"})
    assert p2.returncode == 0, p2.stderr
    assert json.loads((two / "run.json").read_text())["resolved"]["world_size"] == 2
    a, b = metrics(one), metrics(two)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        assert abs(ra["train_loss"] - rb["train_loss"]) < 1e-5
    assert abs(a[-1]["valid_loss"] - b[-1]["valid_loss"]) < 1e-5


def test_early_stopping_triggers_and_keeps_the_best(tiny_model_dir, chat_file, tmp_path):
    """A validation set that contradicts the training set: the more the model learns the
    training answers, the worse the validation loss gets, so patience must run out."""
    rows = [json.loads(line) for line in chat_file.read_text().splitlines()]
    for r in rows:
        r["messages"][1]["content"] = "Completely different answer " + r["messages"][1]["content"][::-1]
    contrary = tmp_path / "contrary.jsonl"
    contrary.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    steps = 20
    proc = cli_here(*common(tiny_model_dir, chat_file), "--out", str(out), "--max-steps", str(steps), "--validation",
               str(contrary), "--eval-every-steps", "1", "--early-stopping-patience", "2", "--learning-rate", "3e-2",
               "--warmup-ratio", "0")
    assert proc.returncode == 0, proc.stderr
    rows = metrics(out)
    valid = {r["step"]: r["valid_loss"] for r in rows}
    best_step = min(valid, key=valid.get)
    stopped_at = rows[-1]["step"]
    assert stopped_at < steps, f"patience never ran out: {valid}"
    assert stopped_at == best_step + 2  # two evaluations in a row without improvement
    assert f"early stopping at step {stopped_at}" in proc.stderr
    info = json.loads((out / "run.json").read_text())
    assert info["metrics"]["stopped"] == "early_stopping" and info["metrics"]["steps"] == stopped_at
    best = json.loads((out / "checkpoints" / "best.json").read_text())
    assert best["step"] == best_step and abs(best["valid_loss"] - valid[best_step]) < 1e-9
    assert (out / "checkpoints" / f"step-{best_step:06d}").is_dir()
    assert json.loads((out / "adapter" / "tunesmith_adapter.json").read_text())["step"] == best_step


# Runs `tunesmith train` with a real SIGTERM sent to itself at a chosen point: from inside
# the n-th training (or validation) forward pass. The forward pass itself is the real one;
# the wrapper only counts passes, so the test knows where the signal landed and whether
# any forward pass began after it (a prompt stop begins none).
SIGNAL_AT = """
import atexit, os, signal, sys
import torch
import tunesmith.train.model as m

kind_wanted, n_wanted = sys.argv[1], int(sys.argv[2])
real, calls, after = m.forward_loss, {"train": 0, "eval": 0}, []

def counting(model, batch, dtype):
    kind = "train" if torch.is_grad_enabled() else "eval"
    if after:
        after.append(kind)
    calls[kind] += 1
    if (kind, calls[kind]) == (kind_wanted, n_wanted):
        after.append("signal")
        os.kill(os.getpid(), signal.SIGTERM)
    return real(model, batch, dtype)

m.forward_loss = counting
atexit.register(lambda: print("PASSES_AFTER_SIGNAL", len(after) - 1, flush=True))
from tunesmith.cli import main
sys.argv = ["tunesmith", "train", *sys.argv[3:]]
main()
"""


def _train_with_signal_at(kind: str, n: int, args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", SIGNAL_AT, kind, str(n), *args], capture_output=True, text=True,
                          timeout=600)


@pytest.mark.parametrize("where", ["step", "validation"])
def test_sigterm_stops_within_the_step_or_validation_and_resumes_exactly(where, tiny_model_dir, chat_file, tmp_path):
    """SIGTERM arriving in the middle of a step (or of a validation pass) abandons it at the
    next decoder layer: no further forward pass starts, the last finished step is saved,
    and the resumed run (redoing the abandoned work) matches an uninterrupted one."""
    steps = 9
    extra = ["--micro-batch-size", "2", "--val-split", "0.25", "--eval-every-steps", "3", "--lora-dropout", "0.1"]
    ref_out = tmp_path / "ref"
    ref = cli_here(*common(tiny_model_dir, chat_file), *extra, "--max-steps", str(steps), "--out", str(ref_out))
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "run"
    args = [*common(tiny_model_dir, chat_file), *extra, "--max-steps", str(steps), "--out", str(out)]
    # step: the 1st of step 5's two micro-batches (call 9); validation (6 examples, 3 batches
    # per pass): the 2nd batch of the pass after step 6 (call 5)
    kind, n, saved = ("train", 9, 4) if where == "step" else ("eval", 3 + 2, 6)
    proc = _train_with_signal_at(kind, n, args)
    assert proc.returncode == 130, proc.stderr
    assert "PASSES_AFTER_SIGNAL 0" in proc.stdout
    last_line = proc.stderr.strip().splitlines()[-1]
    assert f"checkpoint step {saved} saved" in last_line and f"tunesmith train --resume {out}" in last_line
    assert ("during step 5/9" if where == "step" else "during the validation after step 6/9") in last_line
    assert latest_step(out) == saved and metrics(out)[-1]["step"] == saved - (where == "validation")
    resumed = cli_here("--resume", str(out))
    assert resumed.returncode == 0, resumed.stderr
    a, b = metrics(ref_out), metrics(out)
    _same_curve(a, b)
    assert [r["valid_loss"] for r in a] == pytest.approx([r["valid_loss"] for r in b], abs=1e-6)
    _same_adapter(ref_out / "adapter", out / "adapter")


def latest_step(out: Path) -> int:
    return max(int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("step-*"))


def _can_mount_tmpfs(where: Path) -> bool:
    """Whether a private tmpfs can be mounted here (user + mount namespace, no real root needed)."""
    import shutil

    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs '{where}'"],
                           capture_output=True)
    return probe.returncode == 0


def test_full_disk_on_a_real_small_filesystem(tiny_model_dir, chat_file, tmp_path):
    """A real full disk (ENOSPC), no injection: the run directory lies on a 2.5 MB tmpfs
    mounted in a private user+mount namespace. One checkpoint (1.6 MB: LoRA r64 on the tiny
    model, with its AdamW moments) fits, the second does not."""
    disk, after = tmp_path / "disk", tmp_path / "after"
    disk.mkdir()
    if not _can_mount_tmpfs(disk):
        pytest.skip("cannot mount a tmpfs in a user namespace here (unshare -rm refused); "
                    "test_full_disk_keeps_previous_checkpoint covers the file-size-limit case")
    train_cmd = " ".join(f"'{a}'" for a in [*TUNESMITH, "train", *common(tiny_model_dir, chat_file),
                                            "--out", str(disk / "run"), "--max-steps", "6",
                                            "--save-every-steps", "2", "--lora-rank", "64"])
    script = (f"mount -t tmpfs -o size=2500k tmpfs '{disk}' && {{ {train_cmd}; rc=$?; "
              f"df -k '{disk}' | tail -1; cp -a '{disk}/run' '{after}'; exit $rc; }}")
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr
    last_line = proc.stderr.strip().splitlines()[-1]
    assert "the disk is full" in last_line and "step-000004" in last_line and "Traceback" not in proc.stderr
    good = disk / "run" / "checkpoints" / "step-000002"
    assert f"the last good checkpoint {good} is intact" in last_line
    assert f"tunesmith train --resume {disk / 'run'}" in last_line
    names = sorted(p.name for p in (after / "checkpoints").iterdir())
    assert names == ["step-000002"]  # the half-written step 4 was removed, step 2 untouched
    kept = after / "checkpoints" / "step-000002"
    assert json.loads((kept / "trainer_state.json").read_text())["step"] == 2
    from safetensors.torch import load_file

    assert load_file(str(kept / "optimizer.safetensors")) and load_file(str(kept / "adapter_model.safetensors"))
    assert [r["step"] for r in metrics(after)] == [1, 2, 3, 4]


def test_fsdp_two_processes_match_one_and_resume(tiny_model_dir, chat_file, tmp_path):
    """--distributed-strategy fsdp with 2 CPU processes (gloo, torch's FSDP2 fully_shard):
    the same losses and adapter as one process; and a run that lost its last checkpoint
    resumes from the sharded-then-gathered one before it and still ends the same."""
    import shutil

    one, two = tmp_path / "one", tmp_path / "two"
    args = [*common(tiny_model_dir, chat_file), "--max-steps", "4", "--batch-size", "8", "--val-split", "0.25"]
    p1 = cli_here(*args, "--out", str(one))
    assert p1.returncode == 0, p1.stderr
    fsdp = [*args, "--out", str(two), "--nproc", "2", "--distributed-strategy", "fsdp", "--save-every-steps", "2"]
    p2 = cli(*fsdp, env_extra={"OMP_NUM_THREADS": "1"})
    assert p2.returncode == 0, p2.stderr
    info = json.loads((two / "run.json").read_text())
    assert info["resolved"]["world_size"] == 2 and info["config"]["distributed_strategy"] == "fsdp"
    a = metrics(one)
    _same_curve_within(a, metrics(two), 1e-5)
    _same_adapter_within(one / "adapter", two / "adapter", 1e-5)

    shutil.rmtree(two / "checkpoints" / "step-000004")  # as if killed after step 2's checkpoint
    shutil.rmtree(two / "adapter")
    p3 = cli("--resume", str(two), "--nproc", "2", env_extra={"OMP_NUM_THREADS": "1"})
    assert p3.returncode == 0, p3.stderr
    assert "resuming" in p3.stderr
    _same_curve_within(a, metrics(two), 1e-5)
    _same_adapter_within(one / "adapter", two / "adapter", 1e-5)


def _same_curve_within(a: list[dict], b: list[dict], tol: float) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        assert abs(ra["train_loss"] - rb["train_loss"]) < tol, (ra["step"], ra["train_loss"], rb["train_loss"])
        assert (ra["valid_loss"] is None) == (rb["valid_loss"] is None)
        if ra["valid_loss"] is not None:
            assert abs(ra["valid_loss"] - rb["valid_loss"]) < tol


def _same_adapter_within(a: Path, b: Path, tol: float) -> None:
    from safetensors.torch import load_file

    wa, wb = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys() and all(wa[k].shape == wb[k].shape for k in wa)
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < tol


def test_sigterm_to_nproc_launcher_stops_every_rank_with_a_checkpoint(tiny_model_dir, chat_file, tmp_path):
    """`tunesmith train --nproc 2` gets SIGTERM (as from the jobs worker or `kill`): it passes
    it on, the ranks agree to stop after the step, save, and the resume line comes last."""
    out = tmp_path / "run"
    args = [*common(tiny_model_dir, chat_file), "--max-steps", "400", "--batch-size", "8", "--nproc", "2",
            "--out", str(out)]
    proc = subprocess.Popen([*TUNESMITH, "train", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    _wait_for(lambda: (out / "metrics.jsonl").is_file() and len(metrics(out)) >= 3, proc, timeout_s=300)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    last_line = err.strip().splitlines()[-1]
    assert "stopped by SIGTERM at step" in last_line and f"tunesmith train --resume {out}" in last_line
    stopped_at = metrics(out)[-1]["step"]
    assert stopped_at < 400 and (out / "checkpoints" / f"step-{stopped_at:06d}" / "trainer_state.json").is_file()


def test_fsdp_full_fine_tuning_matches_one_process(tiny_model_dir, chat_file, tmp_path):
    """Full fine-tuning under FSDP mixes sharded layer weights with whole embeddings (the
    gradient clipping and AdamW must take both): same losses and saved model as 1 process."""
    from safetensors.torch import load_file

    one, two = tmp_path / "one", tmp_path / "two"
    args = [*common(tiny_model_dir, chat_file), "--method", "full", "--max-steps", "3", "--batch-size", "8",
            "--learning-rate", "1e-3"]
    p1 = cli_here(*args, "--out", str(one))
    assert p1.returncode == 0, p1.stderr
    p2 = cli(*args, "--out", str(two), "--nproc", "2", "--distributed-strategy", "fsdp",
             env_extra={"OMP_NUM_THREADS": "1"})
    assert p2.returncode == 0, p2.stderr
    _same_curve_within(metrics(one), metrics(two), 1e-5)
    wa, wb = load_file(str(one / "adapter" / "model.safetensors")), load_file(str(two / "adapter" / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(wa[k].shape == wb[k].shape for k in wa)
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-5


def test_compiled_layers_train_the_same_losses(tiny_model_dir, chat_file, tmp_path):
    """--compile on (torch.compile of each layer's attention, MLP and norms) gives the eager
    run's losses and validation (which runs eagerly) in fp32, and says it compiled."""
    runs = {}
    for setting in ("on", "off"):
        out = tmp_path / setting
        run = cli if setting == "on" else cli_here  # compiling stays in a child process
        proc = run(*common(tiny_model_dir, chat_file), "--out", str(out), "--max-steps", "3", "--val-split", "0.25",
                   "--compile", setting)
        assert proc.returncode == 0, proc.stderr
        runs[setting] = (metrics(out), json.loads((out / "run.json").read_text()))
    (on_rows, on_info), (off_rows, off_info) = runs["on"], runs["off"]
    assert on_info["resolved"]["compile"] is True and off_info["resolved"]["compile"] is False
    assert on_info["metrics"]["compile_s"] > 0 and off_info["metrics"]["compile_s"] is None
    for a, b in zip(on_rows, off_rows, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
    assert on_rows[-1]["valid_loss"] == pytest.approx(off_rows[-1]["valid_loss"], rel=1e-5)


def test_compile_setting_resolution(monkeypatch):
    from tunesmith.errors import UsageError
    from tunesmith.train import model as tm

    monkeypatch.setattr(tm, "compile_toolchain_missing", lambda device: None)
    assert tm.should_compile("auto", tm.COMPILE_MIN_TOKENS, "cpu", fsdp=False)
    assert not tm.should_compile("auto", tm.COMPILE_MIN_TOKENS - 1, "cpu", fsdp=False)
    assert not tm.should_compile("auto", 10 * tm.COMPILE_MIN_TOKENS, "cpu", fsdp=True)
    assert not tm.should_compile("off", 10 * tm.COMPILE_MIN_TOKENS, "cpu", fsdp=False)
    assert tm.should_compile("on", 1, "cpu", fsdp=False)
    with pytest.raises(UsageError, match="--compile on does not combine with --distributed-strategy fsdp"):
        tm.should_compile("on", 1, "cpu", fsdp=True)
    assert not tm.should_compile("auto", 10 * tm.COMPILE_MIN_TOKENS, "cpu", fsdp=False, quantized=True)
    # fp32 on a CPU: compiled steps measured slower than eager (issue 24), so auto stays eager;
    # on is still obeyed, and fp32 on CUDA is not affected.
    assert not tm.should_compile("auto", 10 * tm.COMPILE_MIN_TOKENS, "cpu", fsdp=False, fp32=True)
    assert tm.should_compile("on", 1, "cpu", fsdp=False, fp32=True)
    assert tm.should_compile("auto", 10 * tm.COMPILE_MIN_TOKENS, "cuda:0", fsdp=False, fp32=True)
    with pytest.raises(UsageError, match="--compile on does not combine with --method qlora"):
        tm.should_compile("on", 1, "cpu", fsdp=False, quantized=True)
    monkeypatch.setattr(tm, "compile_toolchain_missing", lambda device: "no C++ compiler (g++ or clang++) on PATH")
    assert not tm.should_compile("auto", 10 * tm.COMPILE_MIN_TOKENS, "cpu", fsdp=False)
    with pytest.raises(UsageError, match="no C\\+\\+ compiler.*use --compile off"):
        tm.should_compile("on", 1, "cpu", fsdp=False)


def test_compile_toolchain_check_reads_path(monkeypatch, tmp_path):
    from tunesmith.train.model import compile_toolchain_missing

    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CXX", raising=False)
    assert "no C++ compiler" in compile_toolchain_missing("cpu")
    fake = tmp_path / "g++"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    assert compile_toolchain_missing("cpu") is None
