"""Where a job trains: the `tunesmith train` flags each executor gives a job's n_workers and
gpus_per_worker, and the options' checks (the Ray runs themselves: test_ray_executor.py)."""

from __future__ import annotations

import pytest

from tunesmith.errors import UsageError
from tunesmith.jobs.ray_executor import ray_available
from tunesmith.jobs.worker import Executor


def test_local_executor_turns_n_workers_into_nproc():
    assert Executor().train_flags({"n_workers": 3}) == ["--nproc", "3"]
    assert Executor().train_flags({}) == []  # one process: no launcher


def test_ray_executor_places_the_job_on_the_cluster():
    flags = Executor("ray", "head:6379", "s3://bucket/ray").train_flags({"n_workers": 4, "gpus_per_worker": 1})
    assert flags == ["--ray-address", "head:6379", "--ray-workers", "4", "--ray-gpus-per-worker", "1.0",
                     "--ray-storage", "s3://bucket/ray"]
    assert Executor("ray").train_flags({})[:4] == ["--ray-address", "auto", "--ray-workers", "1"]


@pytest.mark.parametrize("executor, says", [
    (Executor("slurm"), "give local or ray"),
    (Executor("local", ray_address="head:6379"), "need --executor ray"),
])
def test_bad_executor_options_get_a_sentence(executor, says):
    with pytest.raises(UsageError, match=says):
        executor.check()


def test_executor_ray_without_ray_says_how_to_install():
    if ray_available():
        pytest.skip("Ray is installed here: the refusal is for installs without the ray extra")
    with pytest.raises(UsageError, match=r"pip install 'tunesmith\[ray\]'"):
        Executor("ray").check()
