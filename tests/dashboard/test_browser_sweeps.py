"""The dashboard's sweeps page in real headless Chromium: a sweep of two trials runs on the
server's worker while the page lists them, then shows the pruned and the best trial.

    python -m pytest tests/dashboard/test_browser_sweeps.py -q
"""

from __future__ import annotations

import json
import threading

import pytest
import yaml

from dashboard_helpers import browser, dashboard_server, page, screenshot, wait_for  # noqa: F401 (fixtures)


def test_the_sweeps_page_lists_each_trial_and_marks_the_best(dashboard_server, page, tmp_path, tiny_model_dir):
    pytest.importorskip("optuna")
    from tunesmith.jobs.sweep import run_sweep
    from tunesmith.jobs.sweep_config import load_sweep_config

    server = dashboard_server(workers=1)
    rows = [{"messages": [{"role": "user", "content": f"What is the capital of France? {i}"},
                          {"role": "assistant", "content": f"Paris {i % 3}"}]} for i in range(16)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump({
        "name": "dash", "sampler": "grid", "trials": 2, "parallelism": 1,
        "base": {"model": str(tiny_model_dir), "data": "train.jsonl", "val_split": 0.25, "max_steps": 4,
                 "batch_size": 4, "eval_every_steps": 1, "precision": "fp32"},
        "search_space": {"learning_rate": {"type": "choice", "values": [1e-2, 1e-7]}}}))
    cfg = load_sweep_config(tmp_path / "sweep.yaml")
    results = {}
    # workers=0: the server's own worker runs the trials, as `tunesmith worker`s would.
    sweep = threading.Thread(target=lambda: results.update(
        run_sweep(cfg, server.service.store, tmp_path / "out", workers=0, poll_interval_s=0.3, log=lambda _m: None)))
    sweep.start()

    page.goto(f"{server.url}/sweeps")
    page.wait_for_selector("#sweep-dash tbody tr[data-trial='0']", timeout=120_000)
    sweep.join(timeout=300)
    assert results["best"]["params"] == {"learning_rate": 1e-2}
    unfinished = ", ".join(f"#sweep-dash .badge[data-status='{s}']" for s in ("validating_files", "queued", "running"))
    wait_for(lambda: len(page.query_selector_all("#sweep-dash tbody tr")) == 2
             and not page.query_selector_all(unfinished), 60, "both trials to end on the page")
    page.reload()  # the final state, fetched once
    page.wait_for_selector("#sweep-dash tbody tr.best")
    best = page.inner_text("#sweep-dash tbody tr.best")
    assert "0.0100" in best or "0.01" in best, best
    assert page.get_attribute("#sweep-dash tbody tr.best", "data-trial") == str(results["best"]["number"])
    pruned = page.inner_text(f"#sweep-dash tbody tr[data-trial='{1 - results['best']['number']}']")
    assert "cancelled" in pruned.lower() and "1.00e-7" in pruned, pruned
    assert f"{results['best']['value']:.4f}" in best
    screenshot(page, "sweeps")
    page.click("#sweep-dash tbody tr.best a")
    page.wait_for_selector(".page-head .badge[data-status='succeeded']")
