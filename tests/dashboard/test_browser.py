"""The dashboard in real headless Chromium against a real server on loopback.

Upload a file with errors and see them by line; submit a job with the tiny model and watch
it succeed with its loss curve drawn; stream two models side by side in the playground;
add and remove an adapter; the API key prompt; DPO on a fine-tuned model from the new-job
page; a sweep's trials on the Sweeps page. Every page is saved as a screenshot under
test-output/dashboard/.
"""

from __future__ import annotations

import json
import re
import threading

import pytest
import yaml

from dashboard_helpers import (  # noqa: F401 (fixtures)
    browser,
    dashboard_server,
    make_adapter,
    page,
    screenshot,
    wait_for,
    write_chat_jsonl,
)


def _path_points(d: str) -> list[tuple[float, float]]:
    return [(float(x), float(y)) for x, y in re.findall(r"[ML](-?[\d.]+),(-?[\d.]+)", d)]


def test_upload_with_errors_lists_them_by_line(dashboard_server, page, tmp_path, tiny_model_dir):
    server = dashboard_server(workers=0)
    bad = write_chat_jsonl(tmp_path / "bad.jsonl", n=12, bad_lines={
        3: '{"messages": [{"role": "user", "content": "hi"}',  # cut short: broken JSON
        7: json.dumps({"messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "yo"}]}),
    })
    page.goto(f"{server.url}/jobs/new")
    page.fill("#model", str(tiny_model_dir))
    page.set_input_files("#training-file", str(bad))

    page.wait_for_selector("#errors-table")
    lines = page.eval_on_selector_all("#errors-table tbody tr", "rows => rows.map(r => r.dataset.line)")
    assert "3" in lines and "7" in lines, lines
    row7 = page.inner_text("#errors-table tr[data-line='7']")
    assert "wizard" in row7 or "role" in row7, row7
    assert page.inner_text("#report-invalid").startswith("✗")
    assert page.is_disabled("#submit-job")
    # The report went through the model: token stats and a measured estimate are shown too.
    page.wait_for_selector("#report-stats")
    assert "Tokens per epoch" in page.inner_text("#report-stats")
    # The content audit's line (the rows repeat exactly: validate's duplicates, not near ones).
    audit = page.inner_text("#report-audit")
    assert audit.startswith("content audit: no near duplicates") and "tunesmith audit" in audit, audit
    screenshot(page, "new-job-errors")


def test_submit_a_job_and_watch_it_succeed_with_a_loss_chart(dashboard_server, page, tmp_path, tiny_model_dir):
    pytest.importorskip("tunesmith.train.run", reason="the training stage is not installed")
    server = dashboard_server(workers=1)
    train = write_chat_jsonl(tmp_path / "train.jsonl", n=12)
    valid = write_chat_jsonl(tmp_path / "valid.jsonl", n=3)

    page.goto(f"{server.url}/jobs/new")
    page.fill("#model", str(tiny_model_dir))
    page.set_input_files("#training-file", str(train))
    page.set_input_files("#validation-file", str(valid))
    page.wait_for_selector("#report-estimate")
    # A selector, not wait_for_function: polling a JS string is eval, which the dashboard's CSP refuses.
    page.wait_for_selector("#submit-job:not([disabled])")
    assert "12" in page.inner_text("#report-stats")
    page.fill("#n_epochs", "2")
    page.fill("#batch_size", "4")
    page.fill("#suffix", "dash")
    screenshot(page, "new-job")
    page.click("#submit-job")

    page.wait_for_url(re.compile(r"/jobs/ftjob-"))
    page.wait_for_selector(".page-head .badge[data-status='succeeded']", timeout=240_000)
    page.wait_for_selector("#evaluation-table", timeout=60_000)
    d = page.get_attribute("#loss-chart path.series[data-series='training loss']", "d")
    points = _path_points(d)
    assert len(points) >= 2 and len({y for _, y in points}) > 1, d  # a curve, not a dot or a flat line
    assert page.query_selector("#loss-chart path.series[data-series='validation loss']") is not None
    assert page.inner_text("#fine-tuned-model").startswith("ft:")
    assert page.query_selector_all("#checkpoints tbody tr[data-step]"), "no checkpoint listed"
    with page.expect_download() as download:
        page.click("a.download[data-file='step_metrics.csv']")
    csv_text = open(download.value.path()).read()
    assert csv_text.startswith("step,epoch,train_loss")
    screenshot(page, "job")

    page.click("nav a[data-nav='jobs']")
    page.wait_for_selector("#jobs-table tbody tr[data-job] .badge[data-status='succeeded']")
    row = page.inner_text("#jobs-table tbody tr[data-job]")
    assert "dash" in row
    screenshot(page, "jobs")

    # From the job to the playground: base vs the fine-tuned model, rows of its validation file.
    page.click("#jobs-table tbody tr[data-job] a")
    page.click("text=Try it in the playground")
    page.wait_for_selector("#row option[value='2']", state="attached")
    job = server.client.fine_tuning.jobs.list().data[0]
    assert page.input_value("#row-file") == job.validation_file
    assert page.input_value("#model-a") == server.engine.base_id
    assert page.input_value("#model-b") == job.fine_tuned_model
    page.select_option("#row", "1")
    page.fill("#max_tokens", "6")
    page.click("#run")
    page.wait_for_selector("#answer-a[data-done='true']")
    page.wait_for_selector("#answer-b[data-done='true']")
    assert "finish" in page.inner_text("#stats-b")


def test_playground_streams_base_and_adapter_side_by_side(dashboard_server, page, tmp_path, tiny_model_dir):
    adapter = make_adapter(tiny_model_dir, tmp_path / "alpha", seed=1)
    server = dashboard_server(adapters=(("alpha", str(adapter)),), workers=0)
    base = server.engine.base_id
    rows = write_chat_jsonl(tmp_path / "rows.jsonl", n=4)
    uploaded = server.client.files.create(file=open(rows, "rb"), purpose="fine-tune")

    # Models: remove the adapter, then add it back through the form.
    page.goto(f"{server.url}/models")
    page.wait_for_selector("#models-table tr[data-model='alpha']")
    page.click("button[data-remove='alpha']")
    page.wait_for_selector("#models-table tr[data-model='alpha']", state="detached")
    assert [m.id for m in server.client.models.list()] == [base]
    page.fill("#adapter-name", "alpha")
    page.fill("#adapter-path", str(adapter))
    page.click("#add-adapter")
    page.wait_for_selector("#models-table tr[data-model='alpha']")
    screenshot(page, "models")

    # Playground: a row of the uploaded file as the prompt, base on the left, adapter on the right.
    page.goto(f"{server.url}/playground?a={base}&b=alpha")
    page.select_option("#row-file", uploaded.id)
    page.wait_for_selector("#row option[value='0']", state="attached")
    page.select_option("#row", "0")
    assert page.input_value("#prompt") == "What is the capital of France?"
    assert "Paris" in page.inner_text("#reference")
    page.fill("#max_tokens", "12")
    page.click("#run")
    page.wait_for_selector("#answer-a[data-done='true']")
    page.wait_for_selector("#answer-b[data-done='true']")
    answers = {side: page.eval_on_selector(f"#answer-{side}", "el => el.textContent") for side in "ab"}
    screenshot(page, "playground")

    # What the page streamed is what each model answers through the openai client.
    for side, model in (("a", base), ("b", "alpha")):
        reply = server.client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "What is the capital of France?"}],
            temperature=0, max_tokens=12)
        assert answers[side] == reply.choices[0].message.content, (side, answers)
    assert answers["a"] != answers["b"]


def test_api_key_is_asked_once_and_kept_for_the_session(dashboard_server, page):
    import httpx

    server = dashboard_server(api_key="s3cret-key", workers=0)
    # The page itself needs no key; the API does.
    shell = httpx.get(f"{server.url}/static/app.js")
    assert shell.status_code == 200 and "default-src 'self'" in shell.headers["content-security-policy"]
    assert httpx.get(f"{server.url}/v1/fine_tuning/jobs").status_code == 401

    page.goto(server.url)
    page.wait_for_selector("#key-dialog[open]")
    screenshot(page, "api-key")
    page.fill("#key-input", "wrong")
    page.click("#key-submit")
    page.wait_for_selector("#key-error:not([hidden])")
    page.fill("#key-input", "s3cret-key")
    page.click("#key-submit")
    page.wait_for_selector("#jobs-table td.empty")
    assert not page.is_visible("#key-dialog")

    page.reload()  # the key is kept in this tab's session storage: no second prompt
    page.wait_for_selector("#jobs-table td.empty")
    assert not page.is_visible("#key-dialog")
    page.click("nav a[data-nav='models']")
    page.wait_for_selector(f"#models-table tr[data-model='{server.engine.base_id}']")


def test_cancel_a_job_from_its_page(dashboard_server, page, tmp_path, tiny_model_dir):
    server = dashboard_server(workers=0)  # no worker: the job waits in validating_files
    train = server.client.files.create(file=open(write_chat_jsonl(tmp_path / "t.jsonl", n=12), "rb"),
                                       purpose="fine-tune")
    job = server.client.fine_tuning.jobs.create(model=str(tiny_model_dir), training_file=train.id)
    page.goto(f"{server.url}/jobs/{job.id}")
    page.wait_for_selector(".page-head .badge[data-status='validating_files']")
    assert "Waiting for the first training step" in page.inner_text("#loss-chart")
    page.click("#cancel-job")  # the confirm() is accepted by the page fixture
    page.wait_for_selector(".page-head .badge[data-status='cancelled']")
    assert server.client.fine_tuning.jobs.retrieve(job.id).status == "cancelled"
    assert page.query_selector("#cancel-job") is None
    page.wait_for_selector("#events li:has-text('Job cancelled')")


def test_dpo_on_a_fine_tuned_model_from_the_new_job_page(dashboard_server, page, tmp_path, tiny_model_dir):
    """A file of preference pairs switches the method to DPO (beta shown); a fine-tuned model is
    offered as the model to continue; the job created trains DPO on top of it."""
    pytest.importorskip("tunesmith.train.run", reason="the training stage is not installed")
    server = dashboard_server(workers=1)
    jobs = server.client.fine_tuning.jobs
    chat = server.client.files.create(file=open(write_chat_jsonl(tmp_path / "t.jsonl", n=12), "rb"),
                                      purpose="fine-tune")
    sft = jobs.create(model=str(tiny_model_dir), training_file=chat.id,
                      method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1, "batch_size": 4}}})
    page.goto(f"{server.url}/jobs/{sft.id}")
    page.wait_for_selector(".page-head .badge[data-status='succeeded']", timeout=240_000)
    sft = jobs.retrieve(sft.id)

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"What is the capital of France? {i}", "chosen": "Paris",
                                         "rejected": "forgot password"}) + "\n" for i in range(12)))
    page.goto(f"{server.url}/jobs/new")
    page.wait_for_selector("#job-form")
    offered = page.eval_on_selector_all("#base-models option", "os => os.map(o => o.value)")
    assert sft.fine_tuned_model in offered, offered
    assert page.is_hidden("#beta-field") and page.input_value("#method") == "supervised"
    page.fill("#model", sft.fine_tuned_model)
    page.set_input_files("#training-file", str(pairs))
    page.wait_for_selector("#report-stats")  # checked through the fine-tuned model's base template
    # A selector, not wait_for_function: polling a JS string is eval, which the dashboard's CSP refuses.
    page.wait_for_selector("#submit-job:not([disabled])")
    assert page.input_value("#method") == "dpo" and page.is_visible("#beta-field")
    assert "DPO default 1e-4" in page.inner_text("#lr-hint")
    page.fill("#beta", "0.2")
    page.fill("#n_epochs", "1")
    page.fill("#batch_size", "4")
    screenshot(page, "new-job-dpo")
    page.click("#submit-job")

    page.wait_for_url(re.compile(r"/jobs/ftjob-"))
    page.wait_for_selector(".page-head .badge[data-status='succeeded']", timeout=240_000)
    job = jobs.retrieve(page.url.rsplit("/", 1)[-1])
    assert job.model == sft.fine_tuned_model and job.method.type == "dpo"
    assert job.method.dpo.hyperparameters.beta == 0.2
    assert job.lineage["continued_from"]["model"] == sft.fine_tuned_model


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
        # 40 steps: the losing trial must outlast a few of the sweep's reads to be pruned (test_sweep.py).
        "base": {"model": str(tiny_model_dir), "data": "train.jsonl", "val_split": 0.25, "max_steps": 40,
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
    # Both trials' validation curves in one chart (from GET /v1/sweeps/dash), the pruned one
    # with its single point; one finished trial is too few for importances.
    page.wait_for_selector("#sweep-chart-dash svg path.series")
    curves = {p.get_attribute("data-series"): p for p in page.query_selector_all("#sweep-chart-dash path.series")}
    loser = 1 - results["best"]["number"]
    assert set(curves) == {f"trial {results['best']['number']}", f"trial {loser} (pruned)"}
    assert "(40)" in page.inner_text("#sweep-chart-dash .legend") and "(pruned) (1)" in page.inner_text(
        "#sweep-chart-dash .legend")
    assert "once two trials have finished" in page.inner_text("#sweep-importance-dash")
    screenshot(page, "sweeps")
    page.click("#sweep-dash tbody tr.best a")
    page.wait_for_selector(".page-head .badge[data-status='succeeded']")
