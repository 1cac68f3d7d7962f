"""The engine's interface as the batcher sees it: what goes in, what comes out of a step.

The batcher (batching layer) and the engine (engine layer) are independent; both read these
types. Nothing here imports torch.
"""

from __future__ import annotations

from collections.abc import Collection, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from .types import BatchKey, GeneratedImage, GenerationParams, Preview


@dataclass(slots=True)
class EngineRequest:
    """A request as the engine sees it: a view of `base.request.Request` (`engine_request`)."""

    request_id: str  # the server's ticket (`Request.ticket`), unique; not the client's id
    params: GenerationParams


@dataclass(slots=True)
class RequestProgress:
    request_id: str
    step: int  # steps done, 1..total_steps
    total_steps: int
    previews: list[Preview] = field(default_factory=list)


@dataclass(slots=True)
class FinishedRequest:
    request_id: str
    images: list[GeneratedImage]


@dataclass(slots=True)
class AddResult:
    stage_seconds: dict[str, float]
    failed: list[str] = field(default_factory=list)  # requests whose prompts could not be encoded


@dataclass(slots=True)
class StepResult:
    key: BatchKey
    batch_size: int  # rows in this step's transformer call (CFG not counted twice)
    deferred_rows: int  # rows of the batch that sat this step out
    progress: list[RequestProgress]
    finished: list[FinishedRequest]
    stage_seconds: dict[str, float]  # denoise_step / vae_decode / preview
    adapter_rows: dict[str, int] = field(default_factory=dict)  # rows that used each adapter
    variant_rows: dict[str, int] = field(default_factory=dict)  # rows that ran as each variant
    failed: list[str] = field(default_factory=list)  # requests lost to a model error
    out_of_memory_rows: int | None = None  # after out-of-memory: the largest call that fit


@dataclass(slots=True)
class PromptCacheStats:
    hits: int = 0
    misses: int = 0  # prompts that went through the text encoder


class EngineLike(Protocol):
    """What the batcher needs from the engine; `engine.engine.Engine` implements it.

    Every call happens on the engine thread: `add` when the scheduler admits requests into a
    batch, `step` once per step boundary for the batch the plan chose, `cancel` when a running
    request leaves early, `has_work` to learn whether a batch still holds rows.
    """

    @property
    def prompt_stats(self) -> PromptCacheStats: ...

    def add(self, group: Hashable, requests: Sequence[EngineRequest]) -> AddResult: ...

    def step(self, group: Hashable, only: Collection[str] | None = None) -> StepResult: ...

    def cancel(self, request_id: str) -> bool: ...

    def has_work(self, group: Hashable | None = None) -> bool: ...
