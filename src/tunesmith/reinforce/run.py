"""One reinforcement fine-tuning run, top to bottom: GRPO on a LoRA adapter against a grader.

    tunesmith train --method reinforcement --data prompts.jsonl --grader grader.json --max-steps 20 --out runs/rft

Each step takes --batch-size prompts, samples --group-size answers to each from the policy
being trained (the base plus the adapter, through the one engine, `generate.engine`, on the
live model: no copy of the weights), grades them (`graders.run.Grading`), turns the rewards
into group-normalised advantages and takes --policy-updates optimizer steps on the GRPO loss
(reinforce/grpo.py). The KL reference is the policy as training started: with --init-adapter,
that adapter loaded a second time as a frozen peft adapter on the same model (REFERENCE);
without one, the same model with the adapter disabled (the base).

The run directory is a supervised run's (runs.py): run.json, metrics.jsonl (with the reward
keys of train.progress.RFT_METRIC_KEYS), samples.jsonl (every answer and its grade),
checkpoints written and resumed by train.checkpoint, RUN/adapter at the end. Sampling seeds
are a pure function of (--seed, step, answer), so a resumed run samples exactly what the
uninterrupted one would have (that is the sampler's RNG state; trainer_state.json says so).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any

from tunesmith.errors import TunesmithError, UsageError
from tunesmith.generate.engine import LocalEngine
from tunesmith.generate.requests import SamplingParams
from tunesmith.graders.files import load_grader
from tunesmith.graders.judge import Endpoint
from tunesmith.graders.run import Grading
from tunesmith.models.adapters import check_base
from tunesmith.models.hardware import detect_machine, precision_reason
from tunesmith.models.inference import LoadedModel
from tunesmith.models.registry import hash_files, identity, load_tokenizer, resolve_model
from tunesmith.reinforce import grpo
from tunesmith.runs import ADAPTER_DIR, RUN_FILE, SAMPLES_FILE, TRAIN_METRICS_FILE, checkpoint_dir
from tunesmith.tracking.sinks import Tracking
from tunesmith.train import checkpoint as ck
from tunesmith.train import data as td
from tunesmith.train.config import TrainConfig
from tunesmith.train.inputs import load_training_items
from tunesmith.train.model import (
    PACKED_ATTENTION,
    add_stop_checks,
    build_model,
    load_adapter_weights,
    load_frozen_adapter,
    parameter_count,
    precision_dtype,
    resolve_init_adapter,
    with_adapter_shape,
)
from tunesmith.train.progress import METRIC_KEYS, RFT_METRIC_KEYS, Reporter, say, truncate_metrics
from tunesmith.train.run import (
    Dist,
    RunResult,
    StepAbandoned,
    StopFlag,
    clip_grad_norm,
    default_out,
    lr_at,
    param_groups,
    tracking_settings,
    versions,
    write_json,
)

POLICY = "default"
"""The name peft (and so the engine) knows the adapter being trained by."""

REFERENCE = "reference"
"""The name peft knows the frozen copy of --init-adapter by, the KL reference (only with
--init-adapter and --kl-coef above 0); never trained, never saved."""


def sample_seed(seed: int, step: int, answer: int, held_out: bool = False) -> int:
    """The sampling seed of one answer: a pure function of the run's seed, the step and the
    answer's place in it, so a resumed run samples what the uninterrupted one did. Held-out
    answers use the same seeds at every evaluation, so the held-out reward moves only with
    the adapter."""
    return (seed * 1_000_003 + (0 if held_out else (step + 1) * 7_919) + answer) * 2_654_435_761 % 2**63


def train_rft(cfg: TrainConfig, progress: bool = True) -> RunResult:
    import torch

    # --- 1. resolve everything that can be wrong before the model loads.
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UsageError("--method reinforcement trains in one process; drop --nproc")
    out = Path(cfg.resume or cfg.out or default_out(cfg))
    resume_from = ck.resume_point(out, bool(cfg.resume))
    grader = load_grader(cfg.grader)
    ref = resolve_model(cfg.model)
    base_identity = identity(ref)
    compute_dtype = precision_dtype(cfg.precision)
    machine = detect_machine()
    precision = "bf16" if compute_dtype == torch.bfloat16 else "fp32"
    init_adapter = resolve_init_adapter(cfg.init_adapter, base_identity) if cfg.init_adapter else None
    model_cfg = with_adapter_shape(cfg, init_adapter) if init_adapter else cfg
    dist = Dist(device="cuda" if torch.cuda.is_available() else "cpu")

    # --- 2. seed: the adapter's initialisation; sampling seeds derive from (seed, step).
    torch.manual_seed(cfg.seed)

    # --- 3. tokenizer and prompts (the whole row is the grader's item).
    tokenizer = load_tokenizer(ref)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    prompts, stats = load_training_items(tokenizer, cfg.data, cfg)
    if cfg.validation:
        held_out = load_training_items(tokenizer, cfg.validation, cfg)[0]
    else:
        prompts, held_out = td.split_validation(prompts, cfg.val_split, cfg.seed)
    epochs = 1 if cfg.epochs == "auto" else cfg.epochs  # one pass, as hosted RFT does by default
    spe = td.steps_per_epoch(len(prompts), cfg.batch_size)
    total_steps = cfg.max_steps or epochs * spe
    answers_per_step = min(cfg.batch_size, len(prompts)) * cfg.group_size

    # --- 4. model and adapter. Sampling and training share the one model: the engine
    # generates with the adapter as it is at this step (peft's "default" adapter).
    model = build_model(ref, model_cfg, compute_dtype)
    if init_adapter:
        load_adapter_weights(model, init_adapter)
    # The KL reference is where RL started (as TRL's ref_model and verl's reference policy):
    # the --init-adapter, not the bare base, which the SFT start was trained away from on
    # purpose. A second, frozen peft adapter holds it; the base weights stay one copy.
    reference = REFERENCE if init_adapter and cfg.kl_coef else None
    if reference:
        load_frozen_adapter(model, init_adapter, reference)
    model.to(dist.device)
    groups, names = param_groups(model, cfg.weight_decay)
    params = [p for g in groups for p in g["params"]]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)
    for p in params:
        p.grad = torch.zeros_like(p)
    start_step, elapsed_before, tokens_trained = 0, 0.0, 0
    if resume_from is not None:
        check_base(resume_from, base_identity)
        ck.load_weights(model, resume_from, cfg.method)
        ck.load_optimizer(optimizer, names, resume_from)
        state = ck.read_state(resume_from)
        start_step, elapsed_before = state["step"], state.get("elapsed", 0.0)
        tokens_trained = state.get("trained_tokens", 0)
        say(f"resuming {out} from {resume_from.name} (epoch {state['epoch']:.2f})")
    engine = LocalEngine(LoadedModel(model, tokenizer, ref.name, "base", base_identity), precision=precision,
                         max_batch_rows=max(answers_per_step, 1))
    grading = Grading(grader, Endpoint(base_url=cfg.judge_base_url))

    data_hashes = {str(p): hash_files([Path(p)]) for p in (cfg.data, cfg.validation) if p}
    meta = {"base_model": base_identity, "method": cfg.method, **({"init_adapter": str(init_adapter)} if init_adapter else {})}
    run_info = {
        "config": {**cfg.to_json(), "out": str(out)},
        "resolved": {"epochs": epochs, "total_steps": total_steps, "steps_per_epoch": spe, "learning_rate": cfg.lr,
                     "precision": precision, "world_size": 1, "compile": False, "machine": machine.to_dict(),
                     "precision_reason": precision_reason(machine, cfg.precision, precision),
                     "answers_per_step": answers_per_step, "grader": grader.model_dump(),
                     "reference": (f"init adapter {init_adapter} (frozen)" if reference else
                                   "base model (adapter disabled)" if cfg.kl_coef else None),
                     "loss_normalisation": "token-level: sum over the step's answer tokens / their count (docs/rft.md)",
                     **({"init_adapter": str(init_adapter), "lora_rank": model_cfg.lora_rank,
                         "lora_alpha": model_cfg.lora_alpha} if init_adapter else {})},
        "base_model": base_identity,
        "data": {"hashes": data_hashes, "train": stats.to_dict(), "valid": {"examples": len(held_out)}},
        "parameters": {"trainable": sum(p.numel() for p in params), "total": parameter_count(model)},
        "versions": versions(),
        "status": "running",
    }
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / RUN_FILE, run_info)
    truncate_metrics(out / TRAIN_METRICS_FILE, start_step)
    truncate_metrics(out / SAMPLES_FILE, start_step)  # the same "step" key: answers of undone steps go
    say(f"machine: {machine.describe()}; precision {precision}")
    say(f"run {out}: reinforcement (GRPO) on {cfg.model} ({run_info['parameters']['trainable']:,} trainable of "
        f"{run_info['parameters']['total']:,} parameters); grader {grader.name} ({grader.type})")
    say(f"data: {len(prompts)} train / {len(held_out)} held-out prompts; {stats.dropped_no_trained_tokens} dropped "
        f"(prompt + --max-completion-tokens {cfg.max_completion_tokens} over --max-seq-len {cfg.max_seq_len})")
    say(f"plan: {total_steps} steps ({epochs} epoch(s) of {spe}), {answers_per_step} answers/step "
        f"({cfg.group_size} per prompt), up to {cfg.max_completion_tokens} tokens each, temperature {cfg.temperature:g}, "
        f"lr {cfg.lr:g}, kl_coef {cfg.kl_coef:g}"
        + (f" (reference: {run_info['resolved']['reference']})" if cfg.kl_coef else "")
        + f", {cfg.policy_updates} update(s) per batch")
    tracking = Tracking(cfg.report_to, tracking_settings(cfg, out, resume_from is not None),
                        {k: v for k, v in run_info.items() if k != "status"}, warn=say)

    # --- 5. the loop: sample, grade, advantages, update(s), log, checkpoint. A stop request
    # (Ctrl-C, SIGTERM) abandons the step in progress; the last finished step is saved.
    stop = StopFlag()
    reporter = Reporter(out / TRAIN_METRICS_FILE, total_steps, start_step, True, progress,
                        METRIC_KEYS + RFT_METRIC_KEYS, on_row=tracking.log_metrics)
    step, saved_step, row = start_step, start_step if resume_from is not None else None, {}
    t_run = time.perf_counter()
    ctx = _Context(cfg, model, engine, grading, pad_id, compute_dtype, dist.device, params, stop, reference)

    def save() -> None:
        nonlocal saved_step
        state = {"epoch": step / spe, "data_position": {"epoch": step // spe, "step_in_epoch": step % spe},
                 "elapsed": row.get("elapsed", elapsed_before), "seed": cfg.seed, "world_size": 1,
                 "trained_tokens": tokens_trained,
                 "rng": "sampling seeds derive from (seed, step, answer): reinforce.run.sample_seed; data order "
                        "from (seed, step); rng.safetensors is the torch state at save"}
        ck.save_checkpoint(out, step, model, optimizer, names, state, meta, only_adapter=POLICY)
        ck.prune_checkpoints(out)
        saved_step = step

    def interrupted(where: str) -> ck.TrainingInterrupted:
        return ck.TrainingInterrupted(f"stopped by {stop.signal_name} {where}; checkpoint step {step} saved; "
                                      f"continue with: tunesmith train --resume {out}")

    try:
        with stop.installed(), open(out / SAMPLES_FILE, "a") as samples_fh:
            while step < total_steps:
                t0 = time.perf_counter()
                _, indices = td.plan_step(len(prompts), cfg.batch_size, cfg.seed, step)
                lr = lr_at(step, total_steps, cfg.lr, cfg.warmup_ratio)
                for g in optimizer.param_groups:
                    g["lr"] = lr
                try:
                    samples, sampling_s = ctx.sample([prompts[i] for i in indices], indices, step)
                    t_grade = time.perf_counter()
                    errors = ctx.grade(samples, [prompts[i].item for i in indices])
                    grading_s = time.perf_counter() - t_grade
                    rewards = [s.reward for s in samples]
                    advantages, flat = grpo.group_advantages(rewards, cfg.group_size)
                    for s, a in zip(samples, advantages):
                        s.advantage = a
                    loss, kl, grad_norm, trained = ctx.update(optimizer, samples)
                except StepAbandoned:
                    if saved_step != step:
                        save()
                    raise interrupted(f"during step {step + 1}/{total_steps} (not finished; it will be redone)") from None
                if not math.isfinite(loss):
                    raise ck.TrainingError(f"the loss became {loss} at step {step + 1}; stopped without saving; "
                                           f"lower --learning-rate (now {cfg.lr:g}) and start again")
                step += 1
                step_s = time.perf_counter() - t0
                # what the job reports as trained_tokens: every sequence (prompt and answer) per update
                tokens_trained += cfg.policy_updates * sum(len(s.prompt_ids) + len(s.completion_ids) for s in samples)
                mean = sum(rewards) / len(rewards)
                row = {"step": step, "epoch": step / spe, "train_loss": loss, "lr": lr, "grad_norm": grad_norm,
                       "tokens_per_s": trained / step_s, "elapsed": elapsed_before + time.perf_counter() - t_run,
                       "eta_s": step_s * (total_steps - step),
                       "reward_mean": mean,
                       "reward_std": math.sqrt(sum((r - mean) ** 2 for r in rewards) / len(rewards)),
                       "zero_variance_groups": flat, "kl": kl,
                       "completion_tokens": sum(len(s.completion_ids) for s in samples) / len(samples),
                       "truncated_completions": sum(s.finish_reason == "length" for s in samples) / len(samples),
                       "grader_errors": errors, "samples_per_s": len(samples) / step_s,
                       "sampling_s": sampling_s, "grading_s": grading_s}
                for s in samples:
                    samples_fh.write(json.dumps({"step": step, "line": s.line, "text": s.text, "reward": s.reward,
                                                 "advantage": s.advantage, "errors": s.errors,
                                                 "completion_tokens": len(s.completion_ids),
                                                 "finish_reason": s.finish_reason}) + "\n")
                samples_fh.flush()
                evaluate_now = bool(held_out) and (step == total_steps or bool(
                    cfg.eval_every_steps and step % cfg.eval_every_steps == 0))
                stopped_in_eval = False
                if evaluate_now:
                    try:
                        row["valid_reward"] = ctx.held_out_reward(held_out)
                    except StepAbandoned:
                        stopped_in_eval = True
                reporter.log(row)
                if stopped_in_eval or stop.requested:
                    save()
                    raise interrupted(f"at step {step}/{total_steps}" + (" (its held-out reward was not measured)"
                                                                          if stopped_in_eval else ""))
                if step == total_steps or bool(cfg.save_every_steps and step % cfg.save_every_steps == 0):
                    save()
    except BaseException:
        tracking.finish(failed=True)
        raise
    finally:
        reporter.close()
        engine.close()
        grading.close()

    # --- 6. publish the last checkpoint as OUT/adapter (RL's held-out reward is noisy: the
    # last adapter, not a best-by-metric one) and the final metrics.
    adapter_dir = ck.publish_adapter(out, checkpoint_dir(out, step))
    final = {k: row.get(k) for k in ("train_loss", "reward_mean", "valid_reward", "kl")}
    final.update({"steps": step, "stopped": "finished", "trained_tokens": tokens_trained,
                  "adapter": str(adapter_dir), "adapter_step": step,
                  "train_time_s": row.get("elapsed")})
    run_info.update({"status": "finished", "metrics": final})
    write_json(out / RUN_FILE, run_info)
    tracking.log_summary(final)
    tracking.log_artifact(adapter_dir, ADAPTER_DIR)
    tracking.finish()
    say(f"done: {step} steps, adapter {adapter_dir}")
    return RunResult(out_dir=out, adapter_dir=adapter_dir, metrics=final, steps=step)


class _Context:
    """What one step uses, held for the run: the model, the engine on it, the grader."""

    def __init__(self, cfg: TrainConfig, model: Any, engine: LocalEngine, grading: Grading, pad_id: int,
                 compute_dtype: Any, device: str, params: list, stop: StopFlag, reference: str | None):
        self.cfg, self.model, self.engine, self.grading = cfg, model, engine, grading
        self.pad_id, self.compute_dtype, self.device, self.params, self.stop = pad_id, compute_dtype, device, params, stop
        self.reference = reference

    def generate(self, prompt_ids: list[list[int]], seeds: list[int]) -> list[Any]:
        """Sample through the engine from the adapter as it is now. The engine decodes with a
        KV cache, which packed attention (training's, with --packing) has no use for, so the
        model attends with sdpa while it samples."""
        self.model.eval()
        if self.cfg.packing:
            self.model.set_attn_implementation("sdpa")
        try:
            params = SamplingParams(self.cfg.max_completion_tokens, self.cfg.temperature)
            return self.engine.generate_batch(prompt_ids, POLICY, params, seeds=seeds,
                                              on_done=lambda _i: self.stop.check())
        except TunesmithError:
            self.stop.check()  # a failed row because of a stop: abandon the step quietly
            raise
        finally:
            if self.cfg.packing:
                self.model.set_attn_implementation(PACKED_ATTENTION)
            self.model.train()
            # The engine makes the adapter it serves the active one in inference mode, which
            # freezes its weights; they are this run's trained parameters.
            for p in self.params:
                p.requires_grad_(True)

    @contextlib.contextmanager
    def reference_active(self):
        """The model answers as the KL reference inside: the frozen init adapter (REFERENCE)
        when there is one, else the base (the adapter disabled)."""
        if self.reference is None:
            with self.model.disable_adapter():
                yield
            return
        self.model.set_adapter(self.reference, inference_mode=True)
        try:
            yield
        finally:
            # Back to the trained adapter, whatever happened inside: the engine samples from
            # the active adapter and switches only when its own record says another one is
            # active (it says POLICY), and set_adapter outside inference mode makes the
            # trained weights require grad again (the reference's stay frozen).
            self.model.set_adapter(POLICY)

    def sample(self, step_prompts: list, indices: list[int], step: int) -> tuple[list[grpo.Sample], float]:
        t0 = time.perf_counter()
        g = self.cfg.group_size
        ids = [p.prompt_ids for p in step_prompts for _ in range(g)]
        done = self.generate(ids, [sample_seed(self.cfg.seed, step, k) for k in range(len(ids))])
        samples = [grpo.Sample(indices[k // g], step_prompts[k // g].line, ids[k], list(c.token_ids), c.text,
                               c.finish_reason) for k, c in enumerate(done)]
        return samples, time.perf_counter() - t0

    def grade(self, samples: list[grpo.Sample], items: list[dict[str, Any]]) -> int:
        """Score every answer against its prompt's row; returns the answers the grader could
        not score (they score 0, and count as grader errors, never stop the run)."""
        errors = 0
        for k, s in enumerate(samples):
            result = self.grading.run(s.text, items[k // self.cfg.group_size])
            s.reward, s.errors = result.reward, {k2: v for k2, v in result.errors.items() if v}
            errors += result.error
        return errors

    def held_out_reward(self, held_out: list) -> float:
        n = self.cfg.eval_samples
        ids = [p.prompt_ids for p in held_out for _ in range(n)]
        done = self.generate(ids, [sample_seed(self.cfg.seed, 0, k, held_out=True) for k in range(len(ids))])
        return sum(self.grading.run(c.text, held_out[k // n].item).reward for k, c in enumerate(done)) / len(done)

    def update(self, optimizer: Any, samples: list[grpo.Sample]) -> tuple[float, float | None, float, int]:
        """--policy-updates optimizer steps on the sampled answers. Returns the first update's
        loss (per answer token), the mean KL per answer token (None without a reference),
        the last gradient norm and the answer tokens trained per update."""
        import torch

        cfg, model = self.cfg, self.model
        passes = td.micro_batches(list(range(len(samples))), cfg.micro_batch_size)
        batches = [grpo.collate_samples([samples[i] for i in mb], cfg.packing, self.pad_id, self.device)
                   for mb in passes]
        n_tokens = sum(len(s.completion_ids) for s in samples)
        refs, olds = [None] * len(batches), [None] * len(batches)
        model.eval()
        with torch.no_grad():
            if cfg.kl_coef:
                with self.reference_active():
                    refs = [grpo.policy_logps(model, b, self.compute_dtype) for b in batches]
            if cfg.policy_updates > 1:  # later updates are off-policy: the sampler's log-probs
                olds = [grpo.policy_logps(model, b, self.compute_dtype) for b in batches]
        model.train()
        # A stop is honoured during the first update only: once the weights have moved, the
        # step's remaining updates run to its end, so a checkpoint is always a whole step.
        handles = add_stop_checks(model, self.stop.check)
        first_loss, kl_sum, grad_norm = None, None, 0.0
        try:
            for update in range(cfg.policy_updates):
                for p in self.params:
                    p.grad.zero_()
                loss_sum = 0.0
                for b, old, ref in zip(batches, olds, refs):
                    if update == 0:
                        self.stop.check()
                    logps = grpo.policy_logps(model, b, self.compute_dtype)
                    loss, kl = grpo.grpo_token_loss(logps, b, old, ref, cfg.clip_epsilon, cfg.kl_coef)
                    (loss.sum() / n_tokens).backward()
                    loss_sum += loss.sum().item()
                    if update == 0 and kl is not None:
                        kl_sum = (kl_sum or 0.0) + kl.sum().item()
                grad_norm = clip_grad_norm(self.params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf,
                                            Dist(device=self.device))
                optimizer.step()
                if first_loss is None:
                    first_loss = loss_sum / n_tokens
                    for h in handles:
                        h.remove()
        finally:
            for h in handles:
                h.remove()
        return first_loss, (kl_sum / n_tokens if kl_sum is not None else None), grad_norm, n_tokens
