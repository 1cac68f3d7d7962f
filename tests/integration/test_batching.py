"""Batching through the real server: requests share steps, join at boundaries, leave cleanly.

The engine is held at a step boundary (`set_step_budget`) to place requests at exact steps, so
nothing here depends on timing.
"""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from imagegen_client import Completed, OutputFormat, Started, Step
from support import ALL_ROWS, StreamWatcher, assert_same_image, pixels

NPY = OutputFormat.NPY


def release(server: Any) -> None:
    server.batcher.set_step_budget(None)


def run_steps(server: Any, watcher: StreamWatcher, steps: int) -> None:
    """Lets the engine run exactly `steps` more steps, observed through `watcher`'s stream."""
    already = max((e.step for e in watcher.seen if isinstance(e, Step)), default=0)
    server.batcher.set_step_budget(steps)
    watcher.step(already + steps)


def test_concurrent_requests_of_one_key_share_transformer_batches(server_factory: Any) -> None:
    server = server_factory(step_budget=0, max_batch_size=8, **ALL_ROWS)
    client = server.client()
    watchers = [StreamWatcher(client, f"prompt {i}", seed=i, steps=4) for i in range(8)]
    for watcher in watchers:
        watcher.queued()
    release(server)
    results = [watcher.completed().result for watcher in watchers]
    assert {result.batch_size for result in results} == {8}
    metrics = server.metrics()
    # 8 requests x 4 steps ran as 4 transformer calls of 8 rows, not 32 calls of 1.
    assert metrics["imagegen_batch_size_count"] == 4
    assert metrics['imagegen_batch_size_bucket{le="6.0"}'] == 0


def test_requests_of_two_shapes_never_share_a_batch(server_factory: Any) -> None:
    server = server_factory(step_budget=0, max_batch_size=8, max_active_batches=2, **ALL_ROWS)
    client = server.client()
    square = [
        StreamWatcher(client, f"square {i}", seed=i, width=64, height=64, output_format=NPY)
        for i in range(3)
    ]
    wide = [
        StreamWatcher(client, f"wide {i}", seed=i, width=128, height=64, output_format=NPY)
        for i in range(2)
    ]
    for watcher in square + wide:
        watcher.queued()
    release(server)
    for watchers, size, shape in ((square, 3, (64, 64, 3)), (wide, 2, (64, 128, 3))):
        for watcher in watchers:
            result = watcher.completed().result
            assert result.batch_size == size
            assert pixels(result).shape == shape


@pytest.mark.parametrize("join_at", [0, 3, 6])
def test_joining_a_running_batch_at_any_step_changes_no_pixels(
    server_factory: Any, join_at: int
) -> None:
    server = server_factory(step_budget=0, max_batch_size=8, **ALL_ROWS)
    client = server.client()
    running = StreamWatcher(client, "an eight-step castle", seed=11, steps=8, output_format=NPY)
    running.queued()
    if join_at:
        run_steps(server, running, join_at)
    joiners = [
        StreamWatcher(client, "a four-step boat", seed=12, steps=4, output_format=NPY),
        StreamWatcher(
            client, "an eight-step bridge", seed=13, steps=8, output_format=NPY, num_images=2
        ),
    ]
    for watcher in joiners:
        watcher.queued()
    release(server)
    batched = [running.completed().result] + [watcher.completed().result for watcher in joiners]
    assert batched[1].batch_size == 4  # really ran beside the others (1 + 1 + 2 rows)

    alone = [
        client.generate("an eight-step castle", seed=11, steps=8, output_format=NPY),
        client.generate("a four-step boat", seed=12, steps=4, output_format=NPY),
        client.generate("an eight-step bridge", seed=13, steps=8, output_format=NPY, num_images=2),
    ]
    for together, solo in zip(batched, alone, strict=True):
        for index in range(len(solo.images)):
            assert_same_image(pixels(together, index), pixels(solo, index))


def test_a_short_request_finishes_while_a_longer_batch_runs(server_factory: Any) -> None:
    server = server_factory(step_budget=0, **ALL_ROWS)
    client = server.client()
    long = StreamWatcher(client, "eight steps", seed=1, steps=8)
    long.queued()
    run_steps(server, long, 2)
    short = StreamWatcher(client, "four steps", seed=2, steps=4)
    short.queued()
    run_steps(server, short, 4)  # four more steps: the short one is done, the long one is not
    assert isinstance(short.completed(), Completed)
    assert max(e.step for e in long.seen if isinstance(e, Step)) <= 6
    release(server)
    assert long.completed().result.batch_size == 2


def test_request_level_batching_makes_the_short_request_wait(server_factory: Any) -> None:
    server = server_factory(step_budget=0, batching="request", **ALL_ROWS)
    client = server.client()
    long = StreamWatcher(client, "eight steps", seed=1, steps=8)
    long.queued()
    run_steps(server, long, 2)
    short = StreamWatcher(client, "four steps", seed=2, steps=4)
    short.queued()
    run_steps(server, long, 6)  # the long batch runs to its end; the short one never joined
    long.completed()
    release(server)
    result = short.completed().result
    assert result.batch_size == 1


def test_cost_aware_selection_runs_a_short_request_ahead_with_the_same_pixels(
    server_factory: Any,
) -> None:
    from imagegen_server.base.types import BatchKey

    server = server_factory(step_budget=0, row_selection="cost")
    for rows in (1, 2, 4, 8):  # step times as a large model's: every row costs alike
        server.batcher.scheduler.costs.observe(BatchKey(64, 64, cfg=False), rows, 10.0 * rows)
    client = server.client()
    long = StreamWatcher(client, "a long castle", seed=21, steps=8, output_format=NPY)
    short = StreamWatcher(client, "a short boat", seed=22, steps=2, output_format=NPY)
    for watcher in (long, short):
        watcher.queued()
    deferred_before = server.metrics()["imagegen_deferred_rows_total"]
    release(server)
    together = [watcher.completed().result for watcher in (long, short)]
    # The short request stepped alone, twice, while the long one sat out; then the long one ran.
    assert [result.batch_size for result in together] == [1, 1]
    assert server.metrics()["imagegen_deferred_rows_total"] - deferred_before == 2
    alone = [
        client.generate("a long castle", seed=21, steps=8, output_format=NPY),
        client.generate("a short boat", seed=22, steps=2, output_format=NPY),
    ]
    for result, solo in zip(together, alone, strict=True):
        assert_same_image(pixels(result), pixels(solo))


def test_a_higher_priority_request_starts_first(server_factory: Any) -> None:
    server = server_factory(
        step_budget=0,
        max_batch_size=1,
        max_num_images=1,
        max_active_batches=1,
        priority_levels=2,
        default_priority=2,
        **ALL_ROWS,
    )
    client = server.client()
    low = [StreamWatcher(client, f"low {i}", seed=i) for i in range(3)]
    for watcher in low:
        watcher.queued()
    high = StreamWatcher(client, "high", seed=9, priority=1)
    assert high.queued().position == 0
    server.batcher.set_step_budget(1)  # exactly one step: only one request can have started
    assert isinstance(high.next(), Started)
    release(server)
    for watcher in [*low, high]:
        watcher.completed()


def test_cancelling_mid_run_frees_the_row_and_leaves_the_others_unchanged(
    server_factory: Any,
) -> None:
    server = server_factory(step_budget=0, max_batch_size=2, max_num_images=2, **ALL_ROWS)
    client = server.client()
    keeper = StreamWatcher(client, "the keeper", seed=21, steps=8, output_format=NPY)
    leaver = client.stream("the leaver", seed=22, steps=8)
    keeper.queued()
    next(leaver)  # queued
    run_steps(server, keeper, 3)
    waiting = StreamWatcher(client, "waits for a free row", seed=23, steps=4, output_format=NPY)
    assert waiting.queued().position == 0
    leaver.close()  # the client goes away mid-run
    release(server)
    started = waiting.started()  # takes the freed row in the running batch
    assert started.batch_size == 2
    kept = keeper.completed().result
    assert_same_image(
        pixels(kept), pixels(client.generate("the keeper", seed=21, steps=8, output_format=NPY))
    )
    assert_same_image(
        pixels(waiting.completed().result),
        pixels(client.generate("waits for a free row", seed=23, steps=4, output_format=NPY)),
    )


def test_a_deadline_that_passes_in_the_queue_costs_no_engine_work(server_factory: Any) -> None:
    server = server_factory(step_budget=0)
    client = server.client(retry=None)
    started_before = server.metrics()["imagegen_request_queue_seconds_count"]
    with pytest.raises(grpc.RpcError) as failure:
        client.generate("too late", seed=1, timeout_s=0.5)
    assert failure.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    release(server)
    client.generate("on time", seed=2)
    assert server.metrics()["imagegen_request_queue_seconds_count"] == started_before + 1


def test_the_server_queue_timeout_answers_deadline_exceeded(server_factory: Any) -> None:
    server = server_factory(step_budget=0, default_queue_timeout_ms=300)
    client = server.client()
    with pytest.raises(grpc.RpcError) as failure:
        client.generate("waits too long", seed=1)
    assert failure.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "deadline" in (failure.value.details() or "")
    assert (
        server.metrics().get(
            'imagegen_requests_total{code="DEADLINE_EXCEEDED",protocol="grpc",rpc="Generate"}'
        )
        == 1
    )


def test_a_repeated_prompt_skips_the_text_encoder(server_factory: Any) -> None:
    server = server_factory(prompt_cache_size=8)
    client = server.client()
    first = client.generate("a cached prompt", seed=3, output_format=NPY)
    misses = server.metrics()["imagegen_prompt_cache_misses_total"]
    hits = server.metrics()["imagegen_prompt_cache_hits_total"]
    second = client.generate("a cached prompt", seed=3, output_format=NPY)
    metrics = server.metrics()
    assert metrics["imagegen_prompt_cache_misses_total"] == misses  # no text-encoder call
    assert metrics["imagegen_prompt_cache_hits_total"] == hits + 1
    assert_same_image(pixels(second), pixels(first))
