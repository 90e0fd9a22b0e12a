"""One training run, top to bottom: config, seed, tokenizer, data, model, optimizer, loop, save.

    tunesmith train --data train.jsonl --out runs/first --max-steps 60
    python -c "from tunesmith.train.run import train; from tunesmith.train.config import TrainConfig; \
train(TrainConfig(data='train.jsonl', out='runs/first', max_steps=60))"

Multi-process: under `torchrun --nproc-per-node N` (or `tunesmith train --nproc N`) each
process trains its share of every step's examples; gradients are summed over processes
with torch.distributed (gloo on CPU, nccl on GPU) before the optimizer step. A process
group someone else set up (Ray Train's workers: jobs/ray_executor.py) is used as it is.
"""

from __future__ import annotations

import math
import os
import platform
import signal
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

import tunesmith
from tunesmith.data.stats import auto_epochs
from tunesmith.fileio import write_atomically
from tunesmith.models.adapters import check_base
from tunesmith.models.hardware import detect_machine, precision_reason
from tunesmith.models.quantization import nf4_record
from tunesmith.models.registry import hash_files, identity, load_tokenizer, resolve_model
from tunesmith.runs import ADAPTER_DIR, RUN_FILE, TRAIN_METRICS_FILE, checkpoint_dir
from tunesmith.tracking.base import TrackingSettings, check_trackers
from tunesmith.tracking.sinks import Tracking, read_tracking_file
from tunesmith.train import checkpoint as ck
from tunesmith.train import data as td
from tunesmith.train import preference as pref
from tunesmith.train.config import TrainConfig
from tunesmith.train.inputs import load_training_items
from tunesmith.train.model import (
    add_stop_checks,
    build_model,
    check_qlora,
    compile_layers,
    forward_loss,
    full_tensor,
    load_adapter_weights,
    parameter_count,
    precision_dtype,
    resolve_init_adapter,
    shard_model,
    should_compile,
    trainable_parameters,
    with_adapter_shape,
)
from tunesmith.train.progress import DPO_METRIC_KEYS, METRIC_KEYS, Reporter, say, truncate_metrics


@dataclass
class RunResult:
    out_dir: Path
    adapter_dir: Path
    metrics: dict[str, Any] = field(default_factory=dict)
    steps: int = 0
    stopped: str = "finished"
    """finished, early_stopping."""


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    device: str = "cpu"
    fsdp: bool = False
    owns_group: bool = True
    """False when the caller set the process group up (and tears it down)."""

    @property
    def main(self) -> bool:
        return self.rank == 0


class RunObserver(Protocol):
    """Told what the run leaves on disk, for an executor that mirrors it elsewhere (the Ray
    executor copies each checkpoint to Ray's storage and streams rows to the jobs worker)."""

    def started(self, out: Path, step: int) -> None:
        """Rank 0 wrote run.json and cut metrics.jsonl back to `step` (0, or the resumed checkpoint's)."""

    def logged(self, row: dict[str, Any]) -> None:
        """Rank 0 appended this row to metrics.jsonl."""

    def saved(self, out: Path, step: int, final: bool) -> None:
        """Every process, together: checkpoint `step` is on rank 0's disk (final: and OUT/adapter
        and the finished run.json)."""

    def stop_requested(self) -> bool:
        """Asked on rank 0 before each step: True stops the run as SIGTERM does, with a checkpoint
        of the last finished step (a Ray worker gets no signal: its driver asks it this way)."""


def default_out(cfg: TrainConfig) -> Path:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{Path(cfg.data).stem}-{stamp}"


def lr_at(step: int, total_steps: int, peak: float, warmup_ratio: float) -> float:
    """Linear warm-up, then cosine decay towards 0 (step is 0-based)."""
    warmup = int(round(warmup_ratio * total_steps))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


def train(cfg: TrainConfig, progress: bool = True, observer: RunObserver | None = None) -> RunResult:
    import torch

    # --- 1. resolve the config. Everything that can be wrong with the inputs is found
    # before the model loads, so a bad flag costs a second, not a minute.
    dist = _init_distributed()
    out = Path(cfg.resume or cfg.out or default_out(cfg))
    resume_from = ck.resume_point(out, bool(cfg.resume))
    check_trackers(cfg.report_to)  # a tracker whose extra is missing: say so before loading anything
    ref = resolve_model(cfg.model)
    if cfg.method == "qlora":  # needs a CUDA GPU and bitsandbytes: say so before loading anything
        check_qlora(cfg, ref, dist.world_size)
    base_identity = identity(ref)
    compute_dtype = precision_dtype(cfg.precision)
    machine = detect_machine()
    precision_why = precision_reason(machine, cfg.precision, "bf16" if compute_dtype == torch.bfloat16 else "fp32")
    log = say if dist.main else (lambda _msg: None)
    dpo = cfg.method == "dpo"  # preference pairs, DPO loss: see train/preference.py
    init_adapter = resolve_init_adapter(cfg.init_adapter, base_identity) if cfg.init_adapter else None
    model_cfg = with_adapter_shape(cfg, init_adapter) if init_adapter else cfg

    # --- 2. seed: initialisation here; data order and dropout derive from (seed, step).
    torch.manual_seed(cfg.seed)

    # --- 3. tokenizer: the base model's own, with its chat template.
    tokenizer = load_tokenizer(ref)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    # --- 4. data: render with the template, drop examples left with no trained token
    # (with dpo: preference pairs, both answers rendered the same way).
    train_ex, train_stats = load_training_items(tokenizer, cfg.data, cfg)
    if cfg.validation:
        valid_ex, valid_stats = load_training_items(tokenizer, cfg.validation, cfg)
    else:
        train_ex, valid_ex = td.split_validation(train_ex, cfg.val_split, cfg.seed)
        valid_stats = None
    epochs = auto_epochs(len(train_ex)) if cfg.epochs == "auto" else cfg.epochs
    spe = td.steps_per_epoch(len(train_ex), cfg.batch_size)
    total_steps = cfg.max_steps or epochs * spe
    lr_peak = cfg.lr
    tokens_per_step = train_stats.tokens / max(1, len(train_ex)) * min(cfg.batch_size, len(train_ex))
    dist.fsdp = dist.world_size > 1 and cfg.distributed_strategy == "fsdp"
    compiled = should_compile(cfg.compile, tokens_per_step * total_steps, dist.device, dist.fsdp, cfg.method == "qlora",
                              fp32=compute_dtype == torch.float32)

    # --- 5. model and adapter (base cast to the compute dtype once, trained weights fp32).
    model = build_model(ref, model_cfg, compute_dtype)
    if init_adapter:
        load_adapter_weights(model, init_adapter)
    model.to(dist.device)
    n_total = parameter_count(model)
    if dist.world_size > 1:
        for _, p in trainable_parameters(model):  # every process starts from rank 0's weights
            torch.distributed.broadcast(p.data, src=0)
    data_hashes = {str(p): hash_files([Path(p)]) for p in (cfg.data, cfg.validation) if p}
    if dpo:  # before sharding: each process computes its share of the pairs with the whole model
        train_ex, valid_ex = pref.prepare_reference(model, train_ex, valid_ex, cfg, pad_id, compute_dtype, dist, out,
                                                    resume_from is not None, data_hashes, init_adapter is not None, log)
    if dist.fsdp:  # after the broadcast: sharding replaces the parameters with shards
        shard_model(model)
    if compiled:
        compile_layers(model)
    groups, names = param_groups(model, cfg.weight_decay)
    params = [p for g in groups for p in g["params"]]
    n_trainable = sum(p.numel() for p in params)

    # --- 6. optimizer and schedule (the lr is a pure function of the step: see lr_at).
    # foreach kernels refuse a mix of sharded and whole tensors (FSDP full fine-tuning)
    optimizer = torch.optim.AdamW(groups, lr=lr_peak, betas=(0.9, 0.999), eps=1e-8, foreach=False if dist.fsdp else None)
    for p in params:  # zero grads rather than None: a process with no examples in a step still sums
        p.grad = torch.zeros_like(p)

    start_step, best, evals_since_best, elapsed_before, pending = 0, None, 0, 0.0, None
    if resume_from is not None:
        check_base(resume_from, base_identity)
        ck.load_weights(model, resume_from, cfg.method)
        ck.load_optimizer(optimizer, names, resume_from)
        state = ck.read_state(resume_from)
        start_step = state["step"]
        best, evals_since_best = state.get("best"), state.get("evals_since_best", 0)
        elapsed_before = state.get("elapsed", 0.0)
        # A stop during validation saved the step's metrics without its evaluation: the
        # resumed run evaluates that step first, exactly as the uninterrupted run did.
        pending = state.get("pending_row")
        log(f"resuming {out} from {resume_from.name} (epoch {state['epoch']:.2f})"
            + (" and first redoing its interrupted validation" if pending else ""))

    meta = {"base_model": base_identity, "method": cfg.method}
    if init_adapter:  # provenance: the adapter this one continues
        meta["init_adapter"] = str(init_adapter)
    if cfg.method == "qlora":  # export rebuilds the NF4 base from this to merge into what was trained
        meta["base_quantization"] = nf4_record(compute_dtype)
    run_info = {
        "config": {**cfg.to_json(), "out": str(out)},
        "resolved": {"epochs": epochs, "total_steps": total_steps, "steps_per_epoch": spe, "learning_rate": lr_peak,
                     "precision": str(compute_dtype).replace("torch.", ""), "world_size": dist.world_size,
                     "compile": compiled, "machine": machine.to_dict(), "precision_reason": precision_why,
                     **({"init_adapter": str(init_adapter)} if init_adapter else {}),
                     **({"reference": str(init_adapter) if init_adapter else "base model (adapter disabled)"}
                        if dpo else {}),
                     **({"lora_rank": model_cfg.lora_rank, "lora_alpha": model_cfg.lora_alpha}
                        if init_adapter or dpo else {})},
        "base_model": base_identity,
        **({"base_quantization": meta["base_quantization"]} if "base_quantization" in meta else {}),
        "data": {"hashes": data_hashes, "train": train_stats.to_dict(),
                 "valid": valid_stats.to_dict() if valid_stats else {"examples": len(valid_ex), "split_from_train": cfg.val_split}},
        "parameters": {"trainable": n_trainable, "total": n_total},
        "versions": versions(),
        "status": "running",
    }
    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / RUN_FILE, run_info)
        truncate_metrics(out / TRAIN_METRICS_FILE, start_step - 1 if pending else start_step)
        if observer is not None:
            observer.started(out, start_step - 1 if pending else start_step)
    log(f"machine: {machine.describe()}; precision {run_info['resolved']['precision']} ({precision_why})")
    log(f"run {out}: {cfg.method} on {cfg.model} ({n_trainable:,} trainable of {n_total:,} parameters, "
        f"{run_info['resolved']['precision']}, {dist.world_size} process(es)"
        + (", decoder layers compiled: the first step includes compiling them)" if compiled else ")"))
    unit = "preference pairs" if dpo else "examples"
    log(f"data: {len(train_ex)} train / {len(valid_ex)} validation {unit}; {train_stats.truncated} truncated, "
        f"{train_stats.dropped_no_trained_tokens} dropped (no trained token within --max-seq-len {cfg.max_seq_len})")
    length = (f"{total_steps} steps (--max-steps: {total_steps / spe:.2f} epochs)" if cfg.max_steps else
              f"{epochs} epoch(s){' (auto)' if cfg.epochs == 'auto' else ''}, {total_steps} steps")
    log(f"plan: {length}, {spe} steps/epoch, ~{tokens_per_step:.0f} tokens/step, lr {lr_peak:g}")
    if init_adapter and not dpo:
        log(f"starting from the --init-adapter {init_adapter} (LoRA r={model_cfg.lora_rank}, "
            f"alpha={model_cfg.lora_alpha:g}); the adapter saved is that one trained further")
    if dpo:
        log(f"dpo: beta {cfg.beta:g}; reference model: " + (f"the --init-adapter {init_adapter} (the policy starts "
            f"from it: LoRA r={model_cfg.lora_rank}, alpha={model_cfg.lora_alpha:g})" if init_adapter
            else "the base model (the adapter starts at zero)"))
    non_default = {k: v for k, v in cfg.non_defaults().items() if k not in ("data", "out")}
    if non_default:
        log("settings: " + ", ".join(f"{k}={v}" for k, v in non_default.items()))
    # Trackers get what run.json holds, then every metrics.jsonl row (through the reporter),
    # then the final metrics and the adapter. Only rank 0 reports.
    tracking = Tracking(cfg.report_to if dist.main else [], tracking_settings(cfg, out, resume_from is not None),
                        {k: v for k, v in run_info.items() if k != "status"}, warn=log)

    # --- 7. the loop. One optimizer step = cfg.batch_size examples over all processes,
    # loss = sum of token losses / the step's trained tokens, whatever the micro-batching
    # (dpo: cfg.batch_size pairs, loss = sum of pair losses / the step's pairs).
    # A stop request is seen between steps, and also inside one (before each decoder layer's
    # forward and after its backward) and between validation batches: a step on a busy CPU
    # can take a minute, a validation pass longer. An interrupted step is abandoned (its
    # gradients are thrown away, the weights are still those of the last finished step), so
    # the checkpoint of the last finished step resumes exactly. With several processes a
    # step is only abandoned by all of them together, at its end (see _sum_over_processes).
    stop = StopFlag(abandon=dist.world_size == 1)
    add_stop_checks(model, stop.check)
    reporter = Reporter(out / TRAIN_METRICS_FILE, total_steps, start_step, dist.main, progress,
                        METRIC_KEYS + DPO_METRIC_KEYS if dpo else METRIC_KEYS,
                        on_row=tracking.log_metrics if observer is None else _both(tracking.log_metrics, observer.logged))
    stopped = "finished"
    row: dict[str, Any] = {"step": start_step, "train_loss": None, "valid_loss": None, "token_accuracy": None}
    # Rates leave out this process's first step when it compiled the layers (a one-off
    # minute that would distort tokens/s and the ETA for the whole run).
    train_time, tokens_seen, compile_s = 0.0, 0, None
    rate_time, rate_tokens, rate_steps = 0.0, 0, 0
    t_run = time.perf_counter()
    step, saved_step = start_step, start_step if resume_from is not None else None

    def save(pending_row=None):
        nonlocal saved_step
        _save(out, step, model, optimizer, names, cfg, meta, tokenizer, best, evals_since_best,
              row.get("elapsed", elapsed_before), spe, dist, pending_row)
        saved_step = step
        if observer is not None:
            observer.saved(out, step, final=False)

    def interrupted(where: str) -> ck.TrainingInterrupted:
        return ck.TrainingInterrupted(
            f"stopped by {stop.signal_name or 'a stop request of another process'} {where}; checkpoint step {step} saved; "
            f"continue with: tunesmith train --resume {out}"
        )

    try:
        with stop.installed():
            while step < total_steps or pending is not None:
                if pending is not None:  # resumed after a stop during this step's validation
                    row, pending, stop_now, evaluate_now = pending, None, False, True
                else:
                    t0 = time.perf_counter()
                    _, indices = td.plan_step(len(train_ex), cfg.batch_size, cfg.seed, step)
                    step_targets = len(indices) if dpo else td.trained_tokens([train_ex[i] for i in indices])
                    mine = td.shard(indices, dist.rank, dist.world_size)
                    torch.manual_seed(cfg.seed * 1_000_003 + step * 1009 + dist.rank)  # dropout
                    lr = lr_at(step, total_steps, lr_peak, cfg.warmup_ratio)
                    for g in optimizer.param_groups:
                        g["lr"] = lr
                    for p in params:
                        p.grad.zero_()
                    model.train()
                    if observer is not None and dist.main and not stop.requested and observer.stop_requested():
                        stop.request("its executor (pause or cancel)")
                    try:
                        stop.check()
                        args = (model, [train_ex[i] for i in mine], step_targets, cfg, pad_id, compute_dtype,
                                dist.device, _lockstep(indices, cfg.micro_batch_size, dist), train_ex[indices[0]])
                        if dpo:
                            loss_sum, step_tokens, reward_sums = pref.accumulate_gradients(*args)
                        else:
                            loss_sum, step_tokens = accumulate_gradients(*args)
                            reward_sums = []
                    except StepAbandoned:
                        if saved_step != step:
                            save()
                        raise interrupted(f"during step {step + 1}/{total_steps} (not finished; it will be redone)") from None
                    loss_sum, step_tokens, stop_now, reward_sums = _sum_over_processes(
                        params, loss_sum, step_tokens, stop.requested, dist, reward_sums)
                    train_loss = loss_sum / step_targets
                    if not math.isfinite(train_loss):
                        last = ck.latest_checkpoint(out)
                        raise ck.TrainingError(
                            f"the training loss became {train_loss} at step {step + 1}; stopped without saving. "
                            + (f"The last good checkpoint {last} is intact" if last else "No checkpoint was saved")
                            + f"; lower --learning-rate (now {lr_peak:g}) and start again"
                        )
                    # The norm before clipping, also logged when clipping is off (an infinite bound).
                    grad_norm = clip_grad_norm(params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf, dist)
                    optimizer.step()
                    step += 1
                    step_s = time.perf_counter() - t0
                    train_time += step_s
                    tokens_seen += step_tokens
                    if compiled and compile_s is None:
                        compile_s = step_s
                        reporter.message(f"step {step} took {step_s:.0f} s including compiling the layers")
                    else:
                        rate_time, rate_tokens, rate_steps = rate_time + step_s, rate_tokens + step_tokens, rate_steps + 1
                    row = {"step": step, "epoch": step / spe, "train_loss": train_loss, "lr": lr, "grad_norm": grad_norm,
                           "tokens_per_s": rate_tokens / rate_time if rate_steps else step_tokens / step_s,
                           "elapsed": elapsed_before + time.perf_counter() - t_run,
                           "eta_s": (rate_time / rate_steps if rate_steps else step_s) * (total_steps - step)}
                    if dpo:
                        row.update(pref.reward_metrics(reward_sums, len(indices)))
                    evaluate_now = bool(valid_ex) and (
                        step == total_steps or bool(cfg.eval_every_steps and step % cfg.eval_every_steps == 0)
                    )

                if evaluate_now:
                    try:
                        row.update((pref.evaluate if dpo else evaluate)(model, valid_ex, cfg, pad_id, compute_dtype,
                                                                       dist, stop.check))
                    except StepAbandoned:
                        save(pending_row=row)
                        raise interrupted(f"during the validation after step {step}/{total_steps} "
                                          "(it will be redone)") from None
                reporter.log(row)
                save_now = step == total_steps or stop_now or bool(cfg.save_every_steps and step % cfg.save_every_steps == 0)
                if evaluate_now:
                    improved = best is None or row["valid_loss"] < best["valid_loss"]
                    if improved:
                        best, evals_since_best, save_now = {"step": step, "valid_loss": row["valid_loss"]}, 0, True
                    else:
                        evals_since_best += 1
                    if cfg.early_stopping_patience and evals_since_best >= cfg.early_stopping_patience:
                        reporter.message(f"early stopping at step {step}: no better validation loss in "
                                         f"{evals_since_best} evaluations (best {best['valid_loss']:.4f} at step {best['step']})")
                        stopped, save_now = "early_stopping", True
                if save_now:
                    save()
                if stop_now:
                    raise interrupted(f"at step {step}/{total_steps}")
                if stopped != "finished":
                    break
    except BaseException as exc:  # stopped, failed: the trackers' runs end too (--resume continues them)
        tracking.finish(failed=True)
        # checkpoints handle their own disk errors; this is metrics.jsonl and friends
        if not isinstance(exc, OSError) or not ck.disk_error(exc):
            raise
        raise ck.disk_full_error(out, exc.filename or out / TRAIN_METRICS_FILE) from None
    finally:
        try:
            reporter.close()
        except OSError:  # flushing a full disk: the error above says it already
            pass

    # --- 8. the last step was evaluated and saved in the loop; publish OUT/adapter (the
    # best checkpoint by validation loss, else the last) and the final metrics.
    adapter_dir, final = out / ADAPTER_DIR, {}
    if dist.main:
        adapter_step = best["step"] if best else step
        chosen = checkpoint_dir(out, adapter_step)
        adapter_dir = ck.publish_adapter(out, chosen)
        final = {k: row.get(k) for k in ("train_loss", "valid_loss", "token_accuracy")
                 + (pref.REWARD_KEYS + pref.VALID_KEYS if dpo else ())}
        final.update({"steps": step, "best_step": best["step"] if best else None, "stopped": stopped,
                      "tokens_per_s": rate_tokens / rate_time if rate_steps else tokens_seen / max(train_time, 1e-9),
                      "train_time_s": train_time, "compile_s": compile_s,
                      "adapter": str(adapter_dir), "adapter_step": adapter_step})
        run_info.update({"status": "finished", "metrics": final})
        write_json(out / RUN_FILE, run_info)
        tracking.log_summary(final)
        tracking.log_artifact(adapter_dir, ADAPTER_DIR)
        tracking.finish()
        log(f"done: {step} steps, adapter {adapter_dir} (step {final['adapter_step']}"
            + (f", validation loss {best['valid_loss']:.4f}" if best else "") + ")")
    if observer is not None:
        observer.saved(out, step, final=True)
    if dist.world_size > 1:
        torch.distributed.barrier()
        if dist.owns_group:
            torch.distributed.destroy_process_group()
    return RunResult(out_dir=out, adapter_dir=adapter_dir, metrics=final, steps=step, stopped=stopped)


def _both(first: Any, second: Any) -> Any:
    def call(row: dict[str, Any]) -> None:
        first(row)
        second(row)

    return call


def tracking_settings(cfg: TrainConfig, out: Path, resuming: bool) -> TrackingSettings:
    """What the trackers need; a resumed run continues the trackers' runs of its first attempt."""
    return TrackingSettings(
        run_dir=out, project=cfg.tracking_project, run_name=cfg.run_name or out.name, tags=tuple(cfg.tracking_tags),
        wandb_entity=cfg.wandb_entity, mlflow_tracking_uri=cfg.mlflow_tracking_uri, tensorboard_dir=cfg.tensorboard_dir,
        resume_ids=read_tracking_file(out).get("runs", {}) if resuming else {},
    )


def accumulate_gradients(model: Any, examples: list, step_targets: int, cfg: TrainConfig, pad_id: int,
                         compute_dtype: Any, device: str, min_passes: int = 0, filler: Any = None) -> tuple[float, int]:
    """Backward over micro-batches of `examples`, each loss divided by the whole step's
    trained-token count, so the summed gradient is that of the mean over the step's tokens
    whatever the micro-batching. Returns (sum of token losses, tokens processed).

    FSDP gathers weights in every forward and backward, a collective all processes must
    join: a process with fewer micro-batches than `min_passes` runs `filler` with its loss
    times 0 until it has done as many."""

    loss_sum, tokens = 0.0, 0
    passes = td.micro_batches(list(range(len(examples))), cfg.micro_batch_size)
    for mb in passes:
        batch = td.to_device(td.collate([examples[i] for i in mb], cfg.packing, pad_id, share_prefix=True), device)
        mb_loss, _, _ = forward_loss(model, batch, compute_dtype)
        (mb_loss / step_targets).backward()
        loss_sum += mb_loss.item()
        tokens += batch["tokens"]
    for _ in range(min_passes - len(passes)):
        batch = td.to_device(td.collate([filler], cfg.packing, pad_id), device)
        (forward_loss(model, batch, compute_dtype)[0] * 0.0).backward()
    return loss_sum, tokens


def clip_grad_norm(params: list, max_norm: float, dist: Dist) -> float:
    """torch's clip_grad_norm_, also for FSDP full fine-tuning, where sharded layer weights
    and whole embeddings are mixed (torch's version refuses the mix). Returns the total
    norm before clipping."""
    import torch

    if not dist.fsdp:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))

    total = torch.stack([full_tensor(p.grad.norm()).float() for p in params]).norm()
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for p in params:
        p.grad.mul_(coef.to(p.grad.dtype))
    return float(total)


def _lockstep(indices: list[int], micro_batch_size: int | None, dist: Dist) -> int:
    """With FSDP, the most micro-batches any process has in this step (all must do as many)."""
    if not dist.fsdp:
        return 0

    return max(len(td.micro_batches(td.shard(indices, r, dist.world_size), micro_batch_size)) for r in range(dist.world_size))


def evaluate(model: Any, examples: list, cfg: TrainConfig, pad_id: int, compute_dtype: Any, dist: Dist,
             check_stop: Any = None) -> dict[str, float]:
    """Mean validation loss and token accuracy over every trained token (all processes).
    `check_stop()` runs between batches and may raise to abandon the pass."""
    import torch

    model.eval()
    everyone = list(range(len(examples)))
    size = cfg.micro_batch_size or cfg.batch_size
    mine = td.micro_batches(td.shard(everyone, dist.rank, dist.world_size), size)
    sums = torch.zeros(3, dtype=torch.float64)
    try:
        # Compiled layers run eagerly here: compiling a second, inference graph would cost
        # another minute for a pass that has no backward to speed up.
        with torch.no_grad(), torch.compiler.set_stance("force_eager"):
            for mb in mine:
                if check_stop is not None:
                    check_stop()
                batch = td.to_device(td.collate([examples[i] for i in mb], cfg.packing, pad_id, share_prefix=True), dist.device)
                loss, n, correct = forward_loss(model, batch, compute_dtype)
                sums += torch.tensor([loss.item(), n, correct.item()], dtype=torch.float64)
            for _ in range(_lockstep(everyone, size, dist) - len(mine)):  # FSDP: join the others' gathers
                forward_loss(model, td.to_device(td.collate([examples[0]], cfg.packing, pad_id), dist.device), compute_dtype)
    finally:
        model.train()
    if dist.world_size > 1:
        torch.distributed.all_reduce(sums)
    return {"valid_loss": float(sums[0] / sums[1]), "token_accuracy": float(sums[2] / sums[1])}


def _save(out, step, model, optimizer, names, cfg, meta, tokenizer, best, evals_since_best, elapsed, spe, dist,
          pending_row=None) -> None:
    import torch

    gathered = None
    if dist.fsdp:  # every process takes part in gathering the shards; rank 0 writes
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        gathered = (full, ck.optimizer_tensors(optimizer, names))

    if dist.main:
        state = {"epoch": step / spe, "data_position": {"epoch": step // spe, "step_in_epoch": step % spe},
                 "best": best, "evals_since_best": evals_since_best, "elapsed": elapsed, "seed": cfg.seed,
                 "world_size": dist.world_size,
                 "rng": "dropout and data order derive from (seed, step, rank); rng.safetensors is the torch state at save"}
        if pending_row is not None:  # stopped during this step's validation: resume evaluates it first
            state["pending_row"] = pending_row
        ck.save_checkpoint(out, step, model, optimizer, names, state, meta, tokenizer if cfg.method == "full" else None,
                           gathered)
        if best:
            ck.mark_best(out, best["step"], best["valid_loss"])
        ck.prune_checkpoints(out)
    if dist.world_size > 1:
        torch.distributed.barrier()


def param_groups(model: Any, weight_decay: float) -> tuple[list[dict], list[str]]:
    """AdamW groups (no decay on vectors: norms, biases) and the parameter names in order."""

    decay, no_decay = [], []
    for name, p in trainable_parameters(model):
        (decay if p.ndim >= 2 else no_decay).append((name, p))
    groups = [{"params": [p for _, p in decay], "weight_decay": weight_decay},
              {"params": [p for _, p in no_decay], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]], [n for n, _ in decay] + [n for n, _ in no_decay]


def _sum_over_processes(params, loss_sum: float, tokens: int, stop: bool, dist: Dist,
                        extra: list[float] | None = None) -> tuple[float, int, bool, list[float]]:
    """Sum gradients, loss, token counts and `extra` sums (DPO's rewards) over processes (one
    all-reduce), and agree on stopping. FSDP has already summed (reduce-scattered) the
    gradients in backward."""
    extra = list(extra or [])
    if dist.world_size == 1:
        return loss_sum, tokens, stop, extra
    import torch

    if dist.fsdp:  # only the weights FSDP did not shard (embeddings, LM head) are left to sum
        from torch.distributed.tensor import DTensor

        params = [p for p in params if not isinstance(p, DTensor)]
    dtype = params[0].grad.dtype if params else torch.float64
    flat = torch.cat([p.grad.reshape(-1) for p in params]
                     + [torch.tensor([loss_sum, tokens, float(stop), *extra], dtype=dtype, device=dist.device)])
    torch.distributed.all_reduce(flat)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
        offset += n
    loss_sum, tokens, stops, *extra = flat[offset:].tolist()
    return loss_sum, int(tokens), stops > 0, extra


def _init_distributed() -> Dist:
    import torch
    import torch.distributed as tdist

    given = tdist.is_available() and tdist.is_initialized()
    if given:  # set up by the caller (Ray Train): the ranks are the group's
        world, rank = tdist.get_world_size(), tdist.get_rank()
    else:
        world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if world == 1:
        return Dist(device="cuda" if torch.cuda.is_available() else "cpu")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    else:
        device = "cpu"
    if not given:
        tdist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return Dist(rank=rank, world_size=world, device=device, owns_group=not given)


def versions() -> dict[str, str]:
    import peft
    import torch
    import transformers

    return {"tunesmith": tunesmith.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "python": platform.python_version()}


def write_json(path: Path, obj: Any) -> None:
    import json

    write_atomically(path, json.dumps(obj, indent=2, default=str) + "\n")


class StepAbandoned(Exception):
    """Raised by StopFlag.check inside a step or a validation pass to abandon it."""


class StopFlag:
    """Ctrl-C / SIGTERM set a flag; `check()` (called between and inside steps) raises
    StepAbandoned once it is set, where abandoning is allowed (a single process)."""

    def __init__(self, abandon: bool = True) -> None:
        self.requested = False
        self.signal_name = ""
        self.abandon = abandon

    def _handle(self, signum, _frame) -> None:
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def request(self, by: str) -> None:
        """A stop asked for without a signal (see RunObserver.stop_requested)."""
        self.requested, self.signal_name = True, by

    def check(self) -> None:
        if self.requested and self.abandon:
            raise StepAbandoned()

    def installed(self):
        import contextlib

        @contextlib.contextmanager
        def ctx():
            old = {}
            try:
                for sig in (signal.SIGINT, signal.SIGTERM):
                    old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: the caller handles stopping
                pass
            try:
                yield self
            finally:
                for sig, handler in old.items():
                    signal.signal(sig, handler)

        return ctx()
