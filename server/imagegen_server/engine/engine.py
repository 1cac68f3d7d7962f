"""The engine: the only owner of the model. Every method runs on the one engine thread.

It runs its own denoising loop from the pipeline's components (never `pipe(...)`, whose scheduler
holds per-call state). Rows (one per image) live in batches keyed by what must be equal to share
a transformer call; each row has its own seed, sigma schedule and position in it, so rows join and
leave a batch at any step boundary without changing anyone's pixels.

Call order (from the batcher): `add` puts admitted requests into a batch (`admission`: their
prompts and init images encoded, one row per image); `step` runs one denoising step of one
batch; `cancel` drops a request's rows at a step boundary; `has_work` tells whether any batch
holds rows. Start-up (`startup`) builds the engine, then compiles and probes it (`probes`).

A step has three phases:
1. select: the rows that step (all, or those of the requests the scheduler picked; the others
   keep their latents and wait);
2. advance: one transformer call for them and the per-row Euler update (`denoise`). A failing
   call does not sink its batch: it is retried on each half of the rows, down to single rows, so
   only a row that fails alone is lost. An out-of-memory error also reports the largest call
   that fit, so the scheduler can cap the batch;
3. apply: a request lives or dies whole, so the rows of a request that lost one are dropped;
   the others take their new latents (and previews), finished rows decode (in as many VAE calls
   as fit; a call that fails is retried row by row), and finished and failed rows leave.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection, Hashable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..base.engine_api import (
    AddResult,
    EngineRequest,
    FinishedRequest,
    PromptCacheStats,
    RequestProgress,
    StepResult,
)
from ..base.types import BatchKey, GeneratedImage, GenerationParams, Preview
from .acceleration import TransformerRunner
from .admission import Admission
from .batch import Batch, chunks, count_adapter_rows, count_variant_rows
from .decode import Decoder
from .denoise import Advance, Denoiser, FaultInjection, Row, text_inputs
from .init_image import InitImageEncoder
from .lora import LoraBank
from .memory import MemoryBudget
from .model import LoadedModel
from .prompts import PromptEncoder
from .references import ReferenceEncoder
from .sampling import LatentShape, ScheduleTable
from .variants import VariantTable

log = logging.getLogger(__name__)


@dataclass(slots=True, eq=False)
class _RowOutcome:
    """What this step did to one row that took it, of a request that survived the call."""

    row: Row
    position: int  # in the batch (and its latents) as the step found it
    output: int  # in the advance's latents
    preview: Preview | None = None  # when the row asked for one after this step
    pixels: np.ndarray | None = None  # the image, once decoded (None too if its decode failed)


class Engine:
    """The model, its encoders and the batches of rows being denoised (call order: above)."""

    def __init__(
        self,
        model: LoadedModel,
        prompt_cache_size: int,
        max_prompt_tokens: int,
        faults: FaultInjection | None = None,
        runner: TransformerRunner | None = None,
        vae_tiling_min_pixels: int = 0,
        max_negative_prompt_tokens: int | None = None,  # None: max_prompt_tokens
    ) -> None:
        self.model = model
        pipeline = model.pipeline
        # Validation holds each text to its own field's limit: the encoder needs only the larger.
        self._prompts = PromptEncoder(
            pipeline, prompt_cache_size, max(max_prompt_tokens, max_negative_prompt_tokens or 0)
        )
        self._schedules = ScheduleTable(model.scheduler_config)
        self.variants = VariantTable(self._schedules)  # filled at start-up (`startup`)
        self._batches: dict[Hashable, Batch] = {}
        self.adapters = LoraBank(pipeline.transformer)
        self.runner = runner or TransformerRunner.build(pipeline.transformer, "off", ())
        self._faults = faults or FaultInjection()
        self._denoiser = Denoiser(self.runner, self.adapters, model.device, self._faults)
        # The VAE's two directions, public for the start-up probes (`probes`).
        self.decoder = Decoder(
            pipeline.vae, model.vae_scale_factor, model.device, vae_tiling_min_pixels
        )
        self.init_images = InitImageEncoder(
            pipeline, model.device, model.dtype, vae_tiling_min_pixels
        )
        self._references: ReferenceEncoder | None = None  # edit models only
        if model.max_reference_images:
            self._references = ReferenceEncoder(
                model, prompt_cache_size, self._prompts.stats, vae_tiling_min_pixels
            )
        self._admission = Admission(
            model,
            self._prompts,
            self.variants,
            self.init_images,
            self._rows_per_vae_call,
            self._faults,
            self._references,
        )
        self._vae_budget: tuple[MemoryBudget, int] | None = None  # None: all at once

    # --- facts about the model at a size (start-up, probes, limits) ---

    @property
    def prompt_stats(self) -> PromptCacheStats:
        return self._prompts.stats

    @property
    def max_text_tokens(self) -> int:
        """The most text tokens a row's states can have, prompt or negative."""
        return self._prompts.max_tokens

    def latent_shape(self, width: int, height: int) -> LatentShape:
        """One image's latent grid at this size."""
        return LatentShape.for_image(
            height, width, self.model.latent_channels, self.model.vae_scale_factor
        )

    def tokens_per_row(
        self, width: int, height: int, references: tuple[tuple[int, int], ...] = ()
    ) -> int:
        """The tokens a row attends over at this size, at most: its image tokens, an edit row's
        reference tokens (each reference's VAE size) and the longest text's, prompt or negative,
        with an edit row's vision tokens (what its activation memory grows with)."""
        pictures = self._references.text_tokens(references) if self._references else 0
        text = self.runner.text_tokens(self._prompts.max_tokens + pictures)
        image = self.latent_shape(width, height).seq_len
        return image + sum(self.latent_shape(w, h).seq_len for w, h in references) + text

    def image_tokens(self, width: int, height: int) -> int:
        """Latent tokens of one image at this size (what its VAE decode memory grows with)."""
        return self.latent_shape(width, height).seq_len

    def min_steps(self, width: int, height: int) -> int:
        """The fewest steps a request may take at this size (the scheduler's, `sampling`)."""
        return self._schedules.min_steps(self.latent_shape(width, height).seq_len)

    def limit_vae_calls(self, budget: MemoryBudget, cap: int) -> None:
        """Decodes and encodes at most what `budget` fits (and `cap`) in one VAE call. Until
        this is called (the start-up memory probe does, on CUDA) a batch's finished rows decode
        together, and the init images of the requests admitted together encode together."""
        self._vae_budget = (budget, cap)

    # --- the interface the batcher drives ---

    @torch.inference_mode()
    def add(self, group: Hashable, requests: Sequence[EngineRequest]) -> AddResult:
        """Creates the rows of `requests` in batch `group`.

        All prompts of the admitted requests go through the text encoder in one call (cached
        prompts skip it), and their init images through the VAE encoder in as few calls as fit; if
        that fails, each request is prepared alone and only those that still fail are reported.
        """
        started = time.perf_counter()
        result = AddResult(stage_seconds={})
        try:
            prepared = self._admission.prepare(requests)
        except Exception:
            log.exception("preparing %d requests failed; preparing them one by one", len(requests))
            prepared = []
            for request in requests:
                try:
                    prepared += self._admission.prepare([request])
                except Exception:
                    log.exception("preparing request %s failed", request.request_id)
                    result.failed.append(request.request_id)
        result.stage_seconds["text_encode"] = time.perf_counter() - started
        for ready in prepared:
            self._admission.start_rows(ready, self._batch_for(group, ready.params))
        return result

    @torch.inference_mode()
    def step(self, group: Hashable, only: Collection[str] | None = None) -> StepResult:
        """Runs one denoising step for the rows of batch `group` (of the requests in `only`, or
        every row); decodes rows that finish. Select, advance, apply: the module docstring."""
        batch = self._batches[group]
        selected = _select(batch, only)
        started = time.perf_counter()
        advance = self._advance(batch, selected)
        self._sync()  # the step's time is the device's, not the launches'
        result = self._apply(batch, selected, advance, time.perf_counter() - started)
        if not batch.rows:
            del self._batches[group]
        return result

    def cancel(self, request_id: str) -> bool:
        """Drops the request's rows from its batch; the other rows are untouched."""
        for group, batch in list(self._batches.items()):
            if batch.remove(lambda row: row.request_id == request_id):
                if not batch.rows:
                    del self._batches[group]
                return True
        return False

    def has_work(self, group: Hashable | None = None) -> bool:
        """Whether any batch (or batch `group`) holds rows."""
        return group in self._batches if group is not None else bool(self._batches)

    def run_to_completion(self, request: EngineRequest) -> FinishedRequest:
        """Runs one request alone through add/step (warm-up and tests); the engine must be idle."""
        group = ("solo", request.request_id)
        self.add(group, [request])
        while True:
            result = self.step(group)
            if result.failed:
                raise RuntimeError(f"request {request.request_id} failed; see the log")
            if result.finished:
                return result.finished[0]

    # --- add ---

    def _batch_for(self, group: Hashable, params: GenerationParams) -> Batch:
        batch = self._batches.get(group)
        if batch is None:
            shape = self.latent_shape(params.width, params.height)
            factor = self.model.size_multiple  # pixels per token side
            grids = tuple((1, h // factor, w // factor) for w, h in params.batch_key.references)
            batch = self._batches[group] = Batch(params.batch_key, shape, reference_grids=grids)
        elif batch.key != params.batch_key:
            raise ValueError(f"request of shape {params.batch_key} sent to batch of {batch.key}")
        return batch

    # --- step: advance ---

    def _advance(self, batch: Batch, positions: list[int]) -> Advance:
        """One step for the rows at `positions`; a failing call is retried on each half, so only
        rows that fail alone are lost."""
        assert batch.latents is not None
        rows = [batch.rows[position] for position in positions]
        whole = len(positions) == len(batch.rows)
        try:
            if whole and batch.text is None:
                batch.text = text_inputs(batch.rows, batch.key.cfg)
            return self._denoiser.advance(
                rows,
                positions,
                batch.latents[positions],
                batch.rope_shapes,
                batch.key.cfg,
                batch.text if whole else None,
            )
        except Exception as error:
            out_of_memory = isinstance(error, torch.OutOfMemoryError)
            if out_of_memory and torch.cuda.is_available():
                torch.cuda.empty_cache()
            if len(positions) == 1:
                log.error("step failed for request %s", rows[0].request_id, exc_info=error)
                return Advance(
                    [], None, failed={positions[0]: repr(error)}, out_of_memory=out_of_memory
                )
            half = len(positions) // 2
            merged = Advance.merge(
                self._advance(batch, positions[:half]), self._advance(batch, positions[half:])
            )
            merged.out_of_memory |= out_of_memory
            return merged

    # --- step: apply ---

    def _apply(
        self, batch: Batch, selected: list[int], advance: Advance, denoise_seconds: float
    ) -> StepResult:
        """Applies `advance` to `batch` and reports the step: the surviving rows take their new
        latents and previews, finished rows decode, then finished and failed rows leave."""
        stepping = [batch.rows[position] for position in selected]
        result = StepResult(
            key=batch.key,
            batch_size=len(selected),
            deferred_rows=len(batch.rows) - len(selected),
            progress=[],
            finished=[],
            stage_seconds={"denoise_step": denoise_seconds},
            adapter_rows=count_adapter_rows(stepping),
            variant_rows=count_variant_rows(stepping),
            out_of_memory_rows=advance.largest_call if advance.out_of_memory else None,
        )
        failed = {batch.rows[position].request_id for position in advance.failed}
        outcomes = _survivors(batch, advance, failed)
        self._attach_previews(batch.key, advance, outcomes, result.stage_seconds)
        if advance.latents is not None and outcomes:
            stepped = advance.latents[[outcome.output for outcome in outcomes]]
            batch.update([outcome.position for outcome in outcomes], stepped)
        finished = [outcome for outcome in outcomes if outcome.row.done]
        self._decode(batch, finished, result.stage_seconds)
        failed |= {outcome.row.request_id for outcome in finished if outcome.pixels is None}
        result.progress = _progress(outcomes, failed)
        result.finished = _finished(finished, failed)
        result.failed = sorted(failed)
        # Rows leave last: until here every position is the one the step found.
        batch.remove(lambda row: row.done or row.request_id in failed)
        return result

    def _attach_previews(
        self,
        key: BatchKey,
        advance: Advance,
        outcomes: list[_RowOutcome],
        timings: dict[str, float],
    ) -> None:
        """Gives each row that asked for one its preview (all projected at once)."""
        wanted = [outcome for outcome in outcomes if outcome.position in advance.denoised]
        if not wanted:
            return
        started = time.perf_counter()
        denoised = torch.stack([advance.denoised[outcome.position] for outcome in wanted])
        pixels = self.decoder.previews(denoised, key.height, key.width)
        timings["preview"] = time.perf_counter() - started
        for index, outcome in enumerate(wanted):
            outcome.preview = Preview(outcome.row.image_index, pixels[index])

    def _decode(self, batch: Batch, finished: list[_RowOutcome], timings: dict[str, float]) -> None:
        """Gives the finished rows their pixels, in as few VAE calls as fit; a row whose decode
        fails alone keeps None."""
        if not finished:
            return
        assert batch.latents is not None
        started = time.perf_counter()
        chunk = self._rows_per_vae_call("decode", batch.key.width, batch.key.height)
        for part in chunks(finished, chunk):
            decoded = self._decode_chunk(batch, [outcome.position for outcome in part])
            for outcome, pixels in zip(part, decoded, strict=True):
                outcome.pixels = pixels
        timings["vae_decode"] = time.perf_counter() - started

    def _rows_per_vae_call(self, kind: str, width: int, height: int) -> int | None:
        """Images per VAE `kind` call ("decode", "encode") at this size; None = no limit."""
        if self._vae_budget is None:
            return None
        budget, cap = self._vae_budget
        return budget.max_vae_rows(kind, self.image_tokens(width, height), cap)

    def _decode_chunk(self, batch: Batch, positions: list[int]) -> list[np.ndarray | None]:
        """One VAE call for `positions`; on failure, one call per row, so a row fails alone."""
        try:
            return list(self._decode_rows(batch, positions))
        except Exception as error:
            log.exception("VAE decode failed for %d rows; decoding them one by one", len(positions))
            out_of_memory = isinstance(error, torch.OutOfMemoryError)
        if out_of_memory and torch.cuda.is_available():  # once the error freed the call's blocks
            torch.cuda.empty_cache()
        decoded: list[np.ndarray | None] = []
        for position in positions:
            try:
                decoded += self._decode_rows(batch, [position])
            except Exception:
                log.exception("VAE decode failed for request %s", batch.rows[position].request_id)
                decoded.append(None)
        return decoded

    def _decode_rows(self, batch: Batch, positions: list[int]) -> list[np.ndarray]:
        assert batch.latents is not None
        self._faults.check_stage("vae_decode", [batch.rows[p].request_id for p in positions])
        return self.decoder.images(
            batch.latents[positions],
            batch.key.height,
            batch.key.width,
            [batch.rows[position].float_output for position in positions],
        )

    def _sync(self) -> None:
        if self.model.device.type == "cuda":
            torch.cuda.synchronize(self.model.device)


def _select(batch: Batch, only: Collection[str] | None) -> list[int]:
    """The positions of the rows that step: those of the requests in `only`, or every row."""
    return [
        position
        for position, row in enumerate(batch.rows)
        if only is None or row.request_id in only
    ]


def _survivors(batch: Batch, advance: Advance, failed: set[str]) -> list[_RowOutcome]:
    """The rows that stepped, in batch order, less those of `failed` requests: a request lives
    or dies whole, so a row that stepped fine still leaves with its request."""
    return [
        _RowOutcome(batch.rows[position], position, output)
        for output, position in enumerate(advance.indices)
        if batch.rows[position].request_id not in failed
    ]


def _progress(outcomes: list[_RowOutcome], failed: set[str]) -> list[RequestProgress]:
    """Each surviving request's step count and its rows' previews, in batch order."""
    by_request: dict[str, RequestProgress] = {}
    for outcome in outcomes:
        row = outcome.row
        if row.request_id in failed:
            continue
        progress = by_request.get(row.request_id)
        if progress is None:
            progress = by_request[row.request_id] = RequestProgress(
                row.request_id, row.step, len(row.schedule)
            )
        if outcome.preview is not None:
            progress.previews.append(outcome.preview)
    return list(by_request.values())


def _finished(finished: list[_RowOutcome], failed: set[str]) -> list[FinishedRequest]:
    """The images of the requests that finished whole, in batch order."""
    by_request: dict[str, FinishedRequest] = {}
    for outcome in finished:
        row = outcome.row
        if row.request_id in failed or outcome.pixels is None:
            continue
        request = by_request.setdefault(row.request_id, FinishedRequest(row.request_id, []))
        request.images.append(GeneratedImage(pixels=outcome.pixels, seed=row.seed))
    return list(by_request.values())
