"""/v1/fine_tuning/jobs without training: create, validation failures, cancel, pagination, errors."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from jobs_helpers import jobs_server, postgres_server, postgres_url, wait_for, write_chat_jsonl  # noqa: F401 (fixtures)


def _upload(live, path):
    return live.client.files.create(file=open(path, "rb"), purpose="fine-tune").id


def test_invalid_file_fails_in_validation_with_line_numbers(jobs_server, tmp_path, tiny_model_dir):
    live = jobs_server(workers=1)
    bad = write_chat_jsonl(tmp_path / "bad.jsonl", n=20, bad_lines={
        3: "{not json",
        17: json.dumps({"messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "x"}]}),
    })
    job = live.client.fine_tuning.jobs.create(model=str(tiny_model_dir), training_file=_upload(live, bad))
    assert job.status == "validating_files" and job.object == "fine_tuning.job"
    job = wait_for(lambda: (j := live.client.fine_tuning.jobs.retrieve(job.id)).status == "failed" and j,
                   60, "the job to fail")
    assert job.error.code == "invalid_training_file" and job.error.param == "training_file"
    assert "line 3 (invalid_json)" in job.error.message and "line 17" in job.error.message
    assert job.fine_tuned_model is None and job.finished_at is not None
    messages = [e.message for e in live.client.fine_tuning.jobs.list_events(job.id, limit=50)]
    assert any("line 3 (invalid_json)" in m for m in messages)
    assert any("line 17" in m and "role" in m for m in messages)


def _banking_chat(path, rows):
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
                            + "\n" for q, a in rows))
    return path


BANKING = [("I am still waiting on my card?", "card_arrival"), ("How do I reset my password?", "passcode_forgotten"),
           ("What is the capital of France?", "other"), ("My card was charged twice", "card_payment_fee_charged"),
           ("Can I get a refund for this purchase?", "request_refund"), ("Where is my transfer?", "pending_transfer"),
           ("How do I top up with a bank transfer?", "top_up_by_bank_transfer_charge"),
           ("Which currencies do you support?", "fiat_currency_support"), ("Close my account please", "terminate_account"),
           ("I forgot my passcode", "passcode_forgotten"), ("Is there a fee for ATM withdrawals?", "cash_withdrawal_charge"),
           ("Why was my card declined?", "declined_card_payment")]


@pytest.mark.parametrize("leakage_error", [False, True])
def test_leakage_is_a_warning_event_and_with_the_option_an_error(jobs_server, tmp_path, tiny_model_dir, leakage_error):
    # The validation file repeats one training prompt in other case and punctuation: not the
    # same example (validate's exact overlap check misses it), but the audit's leakage.
    train = _banking_chat(tmp_path / "train.jsonl", BANKING)
    valid = _banking_chat(tmp_path / "valid.jsonl", [("i am STILL waiting on my card", "card_arrival"),
                                                     ("What does the exchange rate look like today?", "exchange_rate")])
    live = jobs_server(workers=1, leakage_error=leakage_error)
    jobs = live.client.fine_tuning.jobs
    job = jobs.create(model=str(tiny_model_dir), training_file=_upload(live, train), validation_file=_upload(live, valid))
    if leakage_error:
        job = wait_for(lambda: (j := jobs.retrieve(job.id)).status == "failed" and j, 120, "the job to fail")
        assert job.error.param == "training_file" and "line 1 (leakage)" in job.error.message
    else:
        wait_for(lambda: jobs.retrieve(job.id).status != "validating_files", 120, "validation to pass")
        jobs.cancel(job.id)
    messages = [e.message for e in jobs.list_events(job.id, limit=50)]
    assert any("content audit: 1 leakage" in m and "tunesmith audit" in m for m in messages), messages
    assert any("line 1 (leakage): the same prompt as line 1 of the validation file" in m for m in messages), messages


def test_too_few_examples_fails_the_job(jobs_server, tmp_path, tiny_model_dir):
    live = jobs_server(workers=1)
    small = write_chat_jsonl(tmp_path / "small.jsonl", n=4)
    job = live.client.fine_tuning.jobs.create(model=str(tiny_model_dir), training_file=_upload(live, small))
    job = wait_for(lambda: (j := live.client.fine_tuning.jobs.retrieve(job.id)).status == "failed" and j, 60, "failure")
    assert "too_few_examples" in job.error.message and "at least 10" in job.error.message
    assert job.error.param == "training_file"


def test_create_rejects_bad_requests_with_openai_errors(jobs_server, tmp_path, tiny_model_dir):
    live = jobs_server(workers=0)
    fid = _upload(live, write_chat_jsonl(tmp_path / "t.jsonl"))
    jobs = live.client.fine_tuning.jobs
    with pytest.raises(openai.BadRequestError) as exc:
        jobs.create(model=str(tiny_model_dir), training_file="file-doesnotexist")
    assert exc.value.body["param"] == "training_file" and "names no uploaded file" in exc.value.message
    with pytest.raises(openai.BadRequestError) as exc:
        jobs.create(model="no-such-model", training_file=fid)
    assert exc.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as exc:
        jobs.create(model=str(tiny_model_dir), training_file=fid, hyperparameters={"n_epochs": 0})
    assert "n_epochs" in exc.value.message
    with pytest.raises(openai.BadRequestError) as exc:
        jobs.create(model=str(tiny_model_dir), training_file=fid, hyperparameters={"n_workers": 0})
    assert "n_workers" in exc.value.message
    with pytest.raises(openai.BadRequestError) as exc:
        jobs.create(model=str(tiny_model_dir), training_file=fid,
                    method={"type": "dpo", "supervised": {"hyperparameters": {"n_epochs": 1}}})
    assert exc.value.body["param"] == "method.supervised" and "put the hyperparameters under method.dpo" in exc.value.message
    with pytest.raises(openai.BadRequestError) as exc:
        jobs.create(model=str(tiny_model_dir), training_file=fid, method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0}}})
    assert "method.dpo.hyperparameters.beta" in exc.value.message
    r = httpx.post(f"{live.url}/v1/fine_tuning/jobs", timeout=30,
                   json={"model": str(tiny_model_dir), "training_file": fid, "n_epohcs": 3})
    assert r.status_code == 400 and "unknown parameter 'n_epohcs'" in r.json()["error"]["message"]
    with pytest.raises(openai.NotFoundError):
        jobs.retrieve("ftjob-nope")
    assert live.store.list_jobs()[0] == []


def test_pagination_and_metadata(jobs_server, tmp_path, tiny_model_dir):
    live = jobs_server(workers=0)
    fid = _upload(live, write_chat_jsonl(tmp_path / "t.jsonl"))
    created = [live.client.fine_tuning.jobs.create(model=str(tiny_model_dir), training_file=fid, suffix=f"s{i}",
                                                   metadata={"team": "a" if i % 2 else "b"}).id for i in range(5)]
    first = live.client.fine_tuning.jobs.list(limit=2)
    assert [j.id for j in first.data] == created[::-1][:2] and first.has_more
    everything = [j.id for j in live.client.fine_tuning.jobs.list(limit=2)]  # the client follows `after`
    assert everything == created[::-1]
    team_a = [j.id for j in live.client.fine_tuning.jobs.list(metadata={"team": "a"})]
    assert team_a == [created[3], created[1]]
    with pytest.raises(openai.BadRequestError):
        live.client.fine_tuning.jobs.list(after="ftjob-unknown")


def test_cancel_pause_resume_without_a_worker(jobs_server, tmp_path, tiny_model_dir):
    live = jobs_server(workers=0)
    fid = _upload(live, write_chat_jsonl(tmp_path / "t.jsonl"))
    jobs = live.client.fine_tuning.jobs
    job = jobs.create(model=str(tiny_model_dir), training_file=fid)
    with pytest.raises(openai.BadRequestError):
        jobs.pause(job.id)  # still validating_files
    assert jobs.cancel(job.id).status == "cancelled"
    assert jobs.cancel(job.id).status == "cancelled"  # idempotent
    with pytest.raises(openai.BadRequestError):
        jobs.resume(job.id)
    live.store.update_job(job.id, status="queued")  # as a worker leaves it after validation
    job2 = jobs.create(model=str(tiny_model_dir), training_file=fid)
    live.store.update_job(job2.id, status="queued")
    assert jobs.pause(job2.id).status == "paused"
    assert jobs.resume(job2.id).status == "queued"
    live.store.update_job(job2.id, status="failed")
    with pytest.raises(openai.BadRequestError) as exc:
        jobs.cancel(job2.id)
    assert "already failed" in exc.value.message
    messages = [e.message for e in jobs.list_events(job2.id)]
    assert messages[:2] == ["Job resumed", "Job paused"]


def test_a_file_used_by_an_unfinished_job_cannot_be_deleted(jobs_server, tmp_path, tiny_model_dir):
    live = jobs_server(workers=0)
    fid = _upload(live, write_chat_jsonl(tmp_path / "t.jsonl"))
    job = live.client.fine_tuning.jobs.create(model=str(tiny_model_dir), training_file=fid)
    with pytest.raises(openai.ConflictError):
        live.client.files.delete(fid)
    live.client.fine_tuning.jobs.cancel(job.id)
    assert live.client.files.delete(fid).deleted


def test_api_key_is_required_when_set(_isolated_home, tmp_path):
    from jobs_helpers import start_uvicorn
    from tunesmith.jobs.store import open_store
    from tunesmith.serve.jobs_api import JobsService, create_jobs_app

    url, stop = start_uvicorn(create_jobs_app(JobsService(open_store(), workers=0), api_key="s3cret"))
    try:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).files.list()
        assert openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret", max_retries=0).files.list().data == []
    finally:
        stop()


def test_a_server_restart_loses_no_file_job_or_event(jobs_server, tmp_path, tiny_model_dir):
    live = jobs_server(workers=0)
    data = write_chat_jsonl(tmp_path / "t.jsonl")
    fid = _upload(live, data)
    job = live.client.fine_tuning.jobs.create(model=str(tiny_model_dir), training_file=fid, metadata={"k": "v"})
    live.client.fine_tuning.jobs.cancel(job.id)
    before = [e.id for e in live.client.fine_tuning.jobs.list_events(job.id)]
    live.store.close()

    again = jobs_server(workers=0)  # a new server process state on the same $TUNESMITH_HOME
    assert again.client.files.content(fid).read() == data.read_bytes()
    restored = again.client.fine_tuning.jobs.retrieve(job.id)
    assert restored.status == "cancelled" and restored.metadata == {"k": "v"}
    assert [e.id for e in again.client.fine_tuning.jobs.list_events(job.id)] == before


def test_the_api_and_a_worker_on_postgresql(jobs_server, tmp_path, tiny_model_dir, postgres_url):
    live = jobs_server(workers=1, db=postgres_url)
    assert live.store.dialect == "postgresql"
    bad = write_chat_jsonl(tmp_path / "bad.jsonl", n=12, bad_lines={5: "[1, 2]"})
    job = live.client.fine_tuning.jobs.create(model=str(tiny_model_dir), training_file=_upload(live, bad))
    job = wait_for(lambda: (j := live.client.fine_tuning.jobs.retrieve(job.id)).status == "failed" and j, 60,
                   "the job to fail on PostgreSQL")
    assert "line 5" in job.error.message
    assert [j.id for j in live.client.fine_tuning.jobs.list()] == [job.id]
