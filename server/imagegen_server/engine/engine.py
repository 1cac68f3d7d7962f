"""The engine: the only owner of the model. Every method runs on the one engine thread.

It runs its own denoising loop from the pipeline's components (never `pipe(...)`, whose scheduler
holds per-call state). Rows (one per image) live in batches keyed by what must be equal to share
a transformer call; each row has its own seed, sigma schedule and position in it, so rows join and
leave a batch at any step boundary without changing anyone's pixels.

A failing call does not sink its batch: the step is retried on each half of the rows, down to
single rows, so only a row that fails alone is lost (its request gets INTERNAL). An
out-of-memory error also reports the largest call that fit, so the scheduler can cap the batch.

Call order (from the batcher): `add` puts admitted requests into a batch, `step` runs one
denoising step of one batch (of all its rows, or of the requests the scheduler picked; the
others keep their latents and wait) and returns progress, finished images and failures, `cancel`
drops a request's rows at the boundary, `has_work` tells whether any batch holds rows.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Collection, Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

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
from .decode import Decoder
from .denoise import Advance, Denoiser, FaultInjection, Row, text_inputs
from .init_image import InitImageEncoder
from .lora import LoraBank
from .memory import MemoryBudget, OutOfMemory
from .model import LoadedModel
from .prompts import PromptEncoder
from .sampling import LatentShape, ScheduleTable, initial_noise

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True, slots=True, eq=False)
class _Conditioning:
    """What a request's rows are conditioned on, computed once per request."""

    prompt: torch.Tensor  # [tokens, dim]
    negative: torch.Tensor | None  # when CFG is on
    posterior: DiagonalGaussianDistribution | None  # the init image's, for image-to-image


@dataclass(slots=True, eq=False)
class _Batch:
    key: BatchKey
    shape: LatentShape
    rows: list[Row] = field(default_factory=list)
    latents: torch.Tensor | None = None  # [rows, seq, channels * 4], in row order
    # Padded states + mask (None: no padding), rebuilt when the rows change.
    text: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def keep(self, keep: list[int]) -> None:
        """Keeps the rows at positions `keep`, with their latents."""
        if len(keep) == len(self.rows):
            return
        self.text = None
        self.rows = [self.rows[index] for index in keep]
        self.latents = self.latents[keep] if keep and self.latents is not None else None

    def update(self, positions: list[int], latents: torch.Tensor) -> None:
        """The rows at `positions` took a step to `latents`."""
        assert self.latents is not None
        if len(positions) == len(self.rows):  # positions are in batch order: every row
            self.latents = latents
        else:
            self.latents[positions] = latents
        for position in positions:
            self.rows[position].step += 1


class Engine:
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
        self._batches: dict[Hashable, _Batch] = {}
        self.adapters = LoraBank(pipeline.transformer)
        self.runner = runner or TransformerRunner.build(pipeline.transformer, "off", ())
        self._denoiser = Denoiser(self.runner, self.adapters, model.device, faults)
        self._decoder = Decoder(
            pipeline.vae, model.vae_scale_factor, model.device, vae_tiling_min_pixels
        )
        self._init_images = InitImageEncoder(
            pipeline, model.device, model.dtype, vae_tiling_min_pixels
        )
        self._vae_budget: tuple[MemoryBudget, int] | None = None  # None: all at once

    @property
    def prompt_stats(self) -> PromptCacheStats:
        return self._prompts.stats

    def precompile(self, width: int, height: int) -> float:
        """Compiles the transformer for `width` x `height` before serving (and, when adapters
        may come, its variant with adapters active: lora.py); returns seconds."""
        transformer = self.model.pipeline.transformer
        shape = self._shape(height, width)

        def compile_shapes() -> float:
            return self.runner.precompile(
                shape.seq_len,
                shape.channels * 4,
                transformer.config.joint_attention_dim,
                shape.rope_shape,
                self._prompts.max_tokens,
                self.model.dtype,
                self.model.device,
            )

        seconds = compile_shapes()
        if self.adapters.all_wrapped:
            with self.adapters.as_if_active():
                seconds += compile_shapes()
            # Once a graph broke at the adapters' deltas, Dynamo runs each wrapped layer as a
            # frame of its own, which calls without adapters would compile again while serving:
            # the shapes run once more with adapters off (no new block graphs, only those).
            seconds += compile_shapes()
        return seconds

    def tokens_per_row(self, width: int, height: int) -> int:
        """The tokens a row attends over at this size, at most: its image tokens and the
        longest text's, prompt or negative (what its activation memory grows with)."""
        text = self.runner.text_tokens(self._prompts.max_tokens)
        return self._shape(height, width).seq_len + text

    @torch.inference_mode()
    def peak_step_bytes(self, width: int, height: int, rows: int) -> int:
        """CUDA memory a denoising call of `rows` rows with the longest text (prompt or
        negative) takes above what is allocated now.

        Raises:
            memory.OutOfMemory: the call does not fit.
        """
        device = self.model.device
        shape = self._shape(height, width)
        dim = self.model.pipeline.transformer.config.joint_attention_dim
        text = self._prompts.max_tokens
        with _peak_memory(device) as peak:
            latents = torch.zeros(
                rows, shape.seq_len, shape.channels * 4, dtype=self.model.dtype, device=device
            )
            self.runner(
                latents,
                torch.full((rows,), 0.5, dtype=self.model.dtype, device=device),
                torch.zeros(rows, text, dim, dtype=self.model.dtype, device=device),
                torch.ones(rows, text, dtype=torch.long, device=device),
                shape.rope_shape,
            )
        return peak.bytes

    @torch.inference_mode()
    def peak_decode_bytes(self, width: int, height: int, rows: int) -> int:
        """CUDA memory one VAE decode of `rows` images takes above what is allocated now.

        Raises:
            memory.OutOfMemory: the decode does not fit.
        """
        device = self.model.device
        shape = self._shape(height, width)
        with _peak_memory(device) as peak:
            latents = torch.zeros(
                rows, shape.seq_len, shape.channels * 4, dtype=self.model.dtype, device=device
            )
            self._decoder.images(latents, height, width, [False] * rows)
        return peak.bytes

    @torch.inference_mode()
    def peak_encode_bytes(self, width: int, height: int, rows: int) -> int:
        """CUDA memory one VAE encode of `rows` init images takes above what is allocated now.

        Raises:
            memory.OutOfMemory: the encode does not fit.
        """
        with _peak_memory(self.model.device) as peak:
            pixels = torch.zeros(rows, 3, 1, height, width, dtype=self.model.dtype)
            self._init_images.posteriors(pixels.to(self.model.device), height, width)
        return peak.bytes

    def image_tokens(self, width: int, height: int) -> int:
        """Latent tokens of one image at this size (what its VAE decode memory grows with)."""
        return self._shape(height, width).seq_len

    def limit_vae_calls(self, budget: MemoryBudget, cap: int) -> None:
        """Decodes and encodes at most what `budget` fits (and `cap`) in one VAE call. Until
        this is called (the start-up memory probe does, on CUDA) a batch's finished rows decode
        together, and the init images of the requests admitted together encode together."""
        self._vae_budget = (budget, cap)

    def min_steps(self, width: int, height: int) -> int:
        return self._schedules.min_steps(self._shape(height, width).seq_len)

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
            prepared = self._prepare(requests)
        except Exception:
            log.exception("preparing %d requests failed; preparing them one by one", len(requests))
            prepared = []
            for request in requests:
                try:
                    prepared += self._prepare([request])
                except Exception:
                    log.exception("preparing request %s failed", request.request_id)
                    result.failed.append(request.request_id)
        result.stage_seconds["text_encode"] = time.perf_counter() - started
        for request, conditioning in prepared:
            self._add_rows(group, request, conditioning)
        return result

    @torch.inference_mode()
    def step(self, group: Hashable, only: Collection[str] | None = None) -> StepResult:
        """Runs one denoising step for the rows of batch `group` (of the requests in `only`, or
        every row); decodes rows that finish."""
        batch = self._batches[group]
        timings: dict[str, float] = {}
        stepping = [
            index for index, row in enumerate(batch.rows) if only is None or row.request_id in only
        ]
        started = time.perf_counter()
        advance = self._advance(batch, stepping)
        self._sync()
        timings["denoise_step"] = time.perf_counter() - started
        result = StepResult(
            key=batch.key,
            batch_size=len(stepping),
            deferred_rows=len(batch.rows) - len(stepping),
            progress=[],
            finished=[],
            stage_seconds=timings,
            adapter_rows=_count_adapter_rows([batch.rows[index] for index in stepping]),
            out_of_memory_rows=advance.largest_call if advance.out_of_memory else None,
        )
        failed = {batch.rows[index].request_id for index in advance.failed}
        # A request lives or dies whole: drop every row of a request that lost one.
        survivors = [
            (index, position)
            for position, index in enumerate(advance.indices)
            if batch.rows[index].request_id not in failed
        ]
        previews = self._previews(batch, advance, [index for index, _ in survivors], timings)
        if advance.latents is not None and survivors:
            batch.update(
                [index for index, _ in survivors],
                advance.latents[[position for _, position in survivors]],
            )
        stepped_rows = [batch.rows[index] for index, _ in survivors]
        batch.keep([i for i, row in enumerate(batch.rows) if row.request_id not in failed])
        images = self._decode(batch, [row for row in stepped_rows if row.done], timings)
        failed |= {row.request_id for row, pixels in images.items() if pixels is None}
        result.progress = self._progress(stepped_rows, previews, failed)
        result.finished = self._collect_finished(batch, images, failed)
        result.failed = sorted(failed)
        batch.keep(
            [i for i, row in enumerate(batch.rows) if not row.done and row.request_id not in failed]
        )
        if not batch.rows:
            del self._batches[group]
        return result

    def cancel(self, request_id: str) -> bool:
        """Drops the request's rows from its batch; the other rows are untouched."""
        for group, batch in list(self._batches.items()):
            keep = [index for index, row in enumerate(batch.rows) if row.request_id != request_id]
            if len(keep) != len(batch.rows):
                batch.keep(keep)
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

    # --- pieces of a step ---

    def _shape(self, height: int, width: int) -> LatentShape:
        return LatentShape.for_image(
            height, width, self.model.latent_channels, self.model.vae_scale_factor
        )

    def _batch_for(self, group: Hashable, params: GenerationParams) -> _Batch:
        batch = self._batches.get(group)
        if batch is None:
            shape = self._shape(params.height, params.width)
            batch = self._batches[group] = _Batch(key=params.batch_key, shape=shape)
        elif batch.key != params.batch_key:
            raise ValueError(f"request of shape {params.batch_key} sent to batch of {batch.key}")
        return batch

    def _prepare(
        self, requests: Sequence[EngineRequest]
    ) -> list[tuple[EngineRequest, _Conditioning]]:
        """Text states for every request and VAE posteriors for those with an init image."""
        prompts = [request.params.prompt for request in requests]
        negatives = [r.params.negative_prompt for r in requests if r.params.cfg]
        # One encoder call for both.
        states = self._prompts.encode(prompts + negatives, self.model.device, self.model.dtype)
        negative_states = iter(states[len(prompts) :])
        posteriors = iter(self._encode_init_images(requests))
        return [
            (
                request,
                _Conditioning(
                    prompt=states[index],
                    negative=next(negative_states) if request.params.cfg else None,
                    posterior=next(posteriors) if request.params.init_image else None,
                ),
            )
            for index, request in enumerate(requests)
        ]

    def _encode_init_images(
        self, requests: Sequence[EngineRequest]
    ) -> list[DiagonalGaussianDistribution]:
        """The VAE posteriors of the requests' init images, in as few calls as fit (the
        requests admitted together share one size)."""
        images = [r.params.init_image for r in requests if r.params.init_image is not None]
        if not images:
            return []
        width, height = requests[0].params.width, requests[0].params.height
        chunk = self._rows_per_vae_call("encode", width, height)
        return [
            posterior
            for part in _chunks(images, chunk)
            for posterior in self._init_images.encode(part, height, width)
        ]

    def _add_rows(
        self, group: Hashable, request: EngineRequest, conditioning: _Conditioning
    ) -> None:
        params = request.params
        batch = self._batch_for(group, params)
        full_schedule = self._schedules.get(
            params.schedule_steps or params.steps, batch.shape.seq_len
        )
        schedule = full_schedule.tail(params.steps)  # image-to-image starts part way
        starts = []
        for index in range(params.num_images):
            seed = params.seed + index
            inpaint = None
            if params.init_image is not None and conditioning.posterior is not None:
                latents, inpaint = self._init_images.start(
                    conditioning.posterior,
                    params.init_image,
                    seed,
                    batch.shape,
                    schedule,
                    params.height,
                    params.width,
                )
            else:
                generator = torch.Generator("cpu").manual_seed(seed)
                latents = initial_noise(batch.shape, generator, self.model.dtype, self.model.device)
            starts.append(latents)
            batch.rows.append(
                Row(
                    request_id=request.request_id,
                    image_index=index,
                    seed=seed,
                    schedule=schedule,
                    prompt=conditioning.prompt,
                    negative=conditioning.negative,
                    guidance=params.guidance_scale,
                    adapters=params.adapters,
                    preview_every=params.preview_every_n_steps,
                    float_output=params.output_format.is_float,
                    inpaint=inpaint,
                )
            )
        batch.latents = torch.cat(([batch.latents] if batch.latents is not None else []) + starts)
        batch.text = None

    def _advance(self, batch: _Batch, indices: list[int]) -> Advance:
        """One step for the rows at `indices`; a failing call is retried on each half, so only
        rows that fail alone are lost."""
        assert batch.latents is not None
        rows = [batch.rows[index] for index in indices]
        whole = len(indices) == len(batch.rows)
        try:
            if whole and batch.text is None:
                batch.text = text_inputs(batch.rows, batch.key.cfg)
            return self._denoiser.advance(
                rows,
                indices,
                batch.latents[indices],
                batch.shape,
                batch.key.cfg,
                batch.text if whole else None,
            )
        except Exception as error:
            out_of_memory = isinstance(error, torch.OutOfMemoryError)
            if out_of_memory and torch.cuda.is_available():
                torch.cuda.empty_cache()
            if len(indices) == 1:
                log.error("step failed for request %s", rows[0].request_id, exc_info=error)
                return Advance(
                    [], None, failed={indices[0]: repr(error)}, out_of_memory=out_of_memory
                )
            half = len(indices) // 2
            merged = Advance.merge(
                self._advance(batch, indices[:half]), self._advance(batch, indices[half:])
            )
            merged.out_of_memory |= out_of_memory
            return merged

    def _previews(
        self, batch: _Batch, advance: Advance, survivors: list[int], timings: dict[str, float]
    ) -> dict[int, Preview]:
        """Previews of the surviving rows that asked for one, keyed by the row's id()."""
        wanted = [index for index in survivors if index in advance.denoised]
        if not wanted:
            return {}
        started = time.perf_counter()
        denoised = torch.stack([advance.denoised[index] for index in wanted])
        pixels = self._decoder.previews(denoised, batch.key.height, batch.key.width)
        timings["preview"] = time.perf_counter() - started
        return {
            id(batch.rows[index]): Preview(batch.rows[index].image_index, pixels[i])
            for i, index in enumerate(wanted)
        }

    def _decode(
        self, batch: _Batch, rows: list[Row], timings: dict[str, float]
    ) -> dict[Row, np.ndarray | None]:
        """Pixels of the finished rows, decoded together; None for a row that fails alone."""
        if not rows:
            return {}
        assert batch.latents is not None
        started = time.perf_counter()
        positions = [batch.rows.index(row) for row in rows]
        chunk = self._rows_per_vae_call("decode", batch.key.width, batch.key.height)
        decoded = [
            pixels
            for part in _chunks(positions, chunk)
            for pixels in self._decode_chunk(batch, part)
        ]
        timings["vae_decode"] = time.perf_counter() - started
        return dict(zip(rows, decoded, strict=True))

    def _rows_per_vae_call(self, kind: str, width: int, height: int) -> int | None:
        """Images per VAE `kind` call ("decode", "encode") at this size; None = no limit."""
        if self._vae_budget is None:
            return None
        budget, cap = self._vae_budget
        return budget.max_vae_rows(kind, self.image_tokens(width, height), cap)

    def _decode_chunk(self, batch: _Batch, positions: list[int]) -> list[np.ndarray | None]:
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

    def _decode_rows(self, batch: _Batch, positions: list[int]) -> list[np.ndarray]:
        assert batch.latents is not None
        return self._decoder.images(
            batch.latents[positions],
            batch.key.height,
            batch.key.width,
            [batch.rows[position].float_output for position in positions],
        )

    def _progress(
        self, rows: list[Row], previews: dict[int, Preview], failed: set[str]
    ) -> list[RequestProgress]:
        by_request: dict[str, RequestProgress] = {}
        for row in rows:
            if row.request_id in failed:
                continue
            progress = by_request.get(row.request_id)
            if progress is None:
                progress = by_request[row.request_id] = RequestProgress(
                    row.request_id, row.step, len(row.schedule)
                )
            if id(row) in previews:
                progress.previews.append(previews[id(row)])
        return list(by_request.values())

    def _collect_finished(
        self, batch: _Batch, images: dict[Row, np.ndarray | None], failed: set[str]
    ) -> list[FinishedRequest]:
        by_request: dict[str, FinishedRequest] = {}
        for row, pixels in images.items():
            if row.request_id in failed or pixels is None:
                continue
            finished = by_request.setdefault(row.request_id, FinishedRequest(row.request_id, []))
            finished.images.append(GeneratedImage(pixels=pixels, seed=row.seed))
        return list(by_request.values())

    def _sync(self) -> None:
        if self.model.device.type == "cuda":
            torch.cuda.synchronize(self.model.device)


def _count_adapter_rows(rows: list[Row]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for row in rows:
        for spec in row.adapters:
            counts[spec.name] = counts.get(spec.name, 0) + 1
    return counts


def _chunks(items: list[T], size: int | None) -> Iterator[list[T]]:
    """`items` in consecutive pieces of at most `size` (None: all in one)."""
    step = size or len(items)
    for start in range(0, len(items), step):
        yield items[start : start + step]


@dataclass(slots=True)
class _Peak:
    bytes: int = 0


@contextlib.contextmanager
def _peak_memory(device: torch.device) -> Iterator[_Peak]:
    """The peak CUDA memory the block allocates above what was allocated before it; an
    out-of-memory error in it becomes memory.OutOfMemory."""
    peak = _Peak()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    try:
        yield peak
    except torch.OutOfMemoryError as error:
        raise OutOfMemory(str(error)) from error
    peak.bytes = int(torch.cuda.max_memory_allocated(device) - before)
