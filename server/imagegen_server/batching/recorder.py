"""What the batcher records at step boundaries: Prometheus metrics (declared in base.metrics)
and the running step-time estimate that queue ETAs use.

Called from the engine thread, and from the event loop for the queue gauges; prometheus_client's
metrics are thread-safe.
"""

from __future__ import annotations

from ..base.engine_api import PromptCacheStats, StepResult
from ..base.metrics import Metrics
from ..base.request import Request
from .scheduler import Scheduler

# Weight of the newest step time in the running estimate used for queue ETAs.
STEP_TIME_SMOOTHING = 0.2


class Recorder:
    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._prompt_stats_seen = PromptCacheStats()
        self.step_seconds = 0.0  # smoothed seconds per denoising step; 0 until one ran

    def time_step(self, result: StepResult) -> None:
        """Folds a step's time into the estimate (warm-up steps too: a first guess)."""
        step_s = result.stage_seconds["denoise_step"]
        if self.step_seconds == 0:
            self.step_seconds = step_s
        else:
            self.step_seconds += STEP_TIME_SMOOTHING * (step_s - self.step_seconds)

    def step(self, result: StepResult, prompt_stats: PromptCacheStats) -> None:
        """A serving step: its stages, rows, adapters, variants and the prompt cache since the
        last."""
        self.stages(result.stage_seconds)
        for name, rows in result.adapter_rows.items():
            self._metrics.adapter_rows.labels(adapter=name).inc(rows)
        for name, rows in result.variant_rows.items():
            self._metrics.variant_rows.labels(variant=name).inc(rows)
        self._metrics.batch_size.observe(result.batch_size)
        self._metrics.deferred_rows.inc(result.deferred_rows)
        seen = self._prompt_stats_seen
        self._metrics.prompt_cache_hits.inc(prompt_stats.hits - seen.hits)
        self._metrics.prompt_cache_misses.inc(prompt_stats.misses - seen.misses)
        self._prompt_stats_seen = PromptCacheStats(prompt_stats.hits, prompt_stats.misses)

    def stages(self, stage_seconds: dict[str, float]) -> None:
        for stage, seconds in stage_seconds.items():
            self._metrics.stage.labels(stage=stage).observe(seconds)

    def queue(self, scheduler: Scheduler) -> None:
        """The queue gauges: requests waiting, rows running."""
        self._metrics.pending.set(scheduler.waiting_count)
        self._metrics.running_rows.set(scheduler.running_rows)

    def pending(self, scheduler: Scheduler) -> None:
        self._metrics.pending.set(scheduler.waiting_count)

    def started(self, queued_s: float) -> None:
        self._metrics.queue_time.observe(queued_s)

    def completed(self, request: Request, now: float) -> None:
        started = request.started_at if request.started_at is not None else now
        self._metrics.compute_time.observe(now - started)

    def warmed_up(self, seconds: float) -> None:
        self._metrics.warmup_seconds.set(seconds)
