"""The keyed-job memory on its own, on a fake clock: window, bounds, eviction order, tombstones;
keys and fingerprints."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import pytest
from imagegen_server.api.idempotency import (
    JobSettings,
    KeyedJobs,
    check_key,
    params_fingerprint,
)
from imagegen_server.base.errors import FailedPrecondition, InvalidArgument
from imagegen_server.base.metrics import Metrics
from PIL import Image
from support import engine_params


@dataclass
class Result:
    size_bytes: int


@dataclass
class FakeJob:
    """What KeyedJobs reads of a job."""

    scope: str
    key: str
    fingerprint: str = "f"
    result: Result | None = None
    finished_at: float | None = None

    @property
    def ended(self) -> bool:
        return self.finished_at is not None


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def memory(window_s: float = 60, entries: int = 10, size: int = 1000) -> tuple[KeyedJobs, Clock]:
    clock = Clock()
    return KeyedJobs(JobSettings(window_s, entries, size), Metrics(), clock), clock


def finish(jobs: KeyedJobs, job: Any, clock: Clock, size: int = 100) -> None:
    job.result, job.finished_at = Result(size), clock.now
    jobs.ended(job)


def test_a_finished_result_is_found_until_its_window_passes() -> None:
    jobs, clock = memory(window_s=60)
    job = FakeJob("alice", "k")
    jobs.add(job)  # type: ignore[arg-type]
    assert jobs.lookup("alice", "k", "f") is job  # in flight: joined
    finish(jobs, job, clock)
    clock.now = 59.999
    assert jobs.lookup("alice", "k", "f") is job  # replayed
    clock.now = 60.0
    assert jobs.lookup("alice", "k", "f") is None  # a new request now


def test_keys_are_per_scope_and_other_parameters_are_refused() -> None:
    jobs, _clock = memory()
    jobs.add(FakeJob("alice", "k"))  # type: ignore[arg-type]
    assert jobs.lookup("bob", "k", "other") is None
    with pytest.raises(FailedPrecondition, match="idempotency_key: already used"):
        jobs.lookup("alice", "k", "other")


def test_the_oldest_finished_result_goes_first_and_leaves_a_tombstone() -> None:
    jobs, clock = memory(window_s=60, entries=2)
    first, second, running = FakeJob("a", "1"), FakeJob("a", "2"), FakeJob("a", "3")
    for job in (first, second):
        jobs.add(job)  # type: ignore[arg-type]
    finish(jobs, second, clock)  # finished first: the oldest result, though added second
    finish(jobs, first, clock)
    jobs.add(running)  # type: ignore[arg-type]
    assert jobs.lookup("a", "1", "f") is first
    with pytest.raises(FailedPrecondition, match="evicted"):
        jobs.lookup("a", "2", "f")
    clock.now = 60.0  # the tombstone lasts the evicted result's window
    assert jobs.lookup("a", "2", "f") is None


def test_the_byte_bound_never_evicts_a_job_in_flight() -> None:
    jobs, clock = memory(size=150)
    done, in_flight = FakeJob("a", "done"), FakeJob("a", "flight")
    jobs.add(in_flight)  # type: ignore[arg-type]
    jobs.add(done)  # type: ignore[arg-type]
    finish(jobs, done, clock, size=200)  # alone over the bound: evicted at once
    assert jobs.lookup("a", "flight", "f") is in_flight
    with pytest.raises(FailedPrecondition, match="evicted"):
        jobs.lookup("a", "done", "f")


def test_a_failed_job_frees_its_key() -> None:
    jobs, clock = memory()
    job = FakeJob("a", "k")
    jobs.add(job)  # type: ignore[arg-type]
    job.finished_at = clock.now
    jobs.ended(job)  # type: ignore[arg-type]
    assert jobs.lookup("a", "k", "other") is None


@pytest.mark.parametrize("key", ["", "x" * 256, "has space", "naïve"])
def test_malformed_keys_name_the_field(key: str) -> None:
    if not key:
        assert check_key(key) is None
        return
    with pytest.raises(InvalidArgument, match=r"^Idempotency-Key: "):
        check_key(key, "Idempotency-Key")


def test_the_fingerprint_ignores_the_correlation_id_and_previews_only() -> None:
    params = engine_params("one", seed=1)
    same = dataclasses.replace(params, request_id="two", preview_every_n_steps=2)
    assert params_fingerprint(params) == params_fingerprint(same)
    for change in ({"seed": 2}, {"prompt": "other"}, {"priority": 3}, {"num_images": 2}):
        assert params_fingerprint(dataclasses.replace(params, **change)) != params_fingerprint(
            params
        )


def test_the_fingerprint_reads_init_images_by_their_pixels() -> None:
    from imagegen_server.base.types import InitImage

    def with_image(colour: tuple[int, int, int]) -> Any:
        image = InitImage(Image.new("RGB", (8, 8), colour), strength=0.5, mask=None)
        return dataclasses.replace(engine_params("x"), init_image=image)

    assert params_fingerprint(with_image((1, 2, 3))) == params_fingerprint(with_image((1, 2, 3)))
    assert params_fingerprint(with_image((1, 2, 3))) != params_fingerprint(with_image((1, 2, 4)))
