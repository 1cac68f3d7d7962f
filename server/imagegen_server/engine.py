"""The engine: the only owner of the model. Every method runs on the one engine thread.

It runs its own denoising loop from the pipeline's components (never `pipe(...)`, whose scheduler
holds per-call state). Rows (one per image) live in batches keyed by what must be equal to share
a transformer call; each row has its own seed, sigma schedule and position in it, so rows join and
leave a batch at any step boundary without changing anyone's pixels.

Call order (from the batcher): `add` puts admitted requests into a batch, `step` runs one
denoising step of one batch and returns progress and finished images, `cancel` drops a request's
rows at the boundary, `has_work` tells whether any batch holds rows.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .lora import LoraBank
from .model import LoadedModel
from .preview import PreviewProjector, denormalize
from .prompts import PromptCacheStats, PromptEncoder, pad_embeddings
from .sampling import LatentShape, ScheduleTable, SigmaSchedule, initial_noise, unpack
from .types import AdapterSpec, BatchKey, GeneratedImage, GenerationParams, Preview

log = logging.getLogger(__name__)


@dataclass(slots=True)
class EngineRequest:
    request_id: str
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
class StepResult:
    batch_size: int  # rows in this step's transformer call (CFG not counted twice)
    progress: list[RequestProgress]
    finished: list[FinishedRequest]
    stage_seconds: dict[str, float]  # text_encode / denoise_step / vae_decode / preview
    adapter_rows: dict[str, int] = field(default_factory=dict)  # rows that used each adapter


@dataclass(slots=True, eq=False)
class _Row:
    """One image being denoised."""

    request_id: str
    image_index: int
    seed: int
    schedule: SigmaSchedule
    prompt: torch.Tensor  # [tokens, dim] text-encoder states
    negative: torch.Tensor | None  # the same for the negative prompt when CFG is on
    guidance: float
    adapters: tuple[AdapterSpec, ...]  # per-request LoRAs and their scales
    preview_every: int  # 0 = none
    float_output: bool  # decode to float32 (NPY) instead of uint8
    step: int = 0  # index of the next step in `schedule`

    @property
    def done(self) -> bool:
        return self.step >= len(self.schedule)


@dataclass(slots=True, eq=False)
class _Batch:
    key: BatchKey
    shape: LatentShape
    rows: list[_Row] = field(default_factory=list)
    latents: torch.Tensor | None = None  # [rows, seq, channels * 4], in row order
    text: tuple[torch.Tensor, torch.Tensor] | None = None  # padded states + mask, rebuilt on change

    def keep(self, keep: list[int]) -> None:
        assert self.latents is not None
        self.rows = [self.rows[index] for index in keep]
        self.latents = self.latents[keep] if keep else None
        self.text = None


class Engine:
    def __init__(self, model: LoadedModel, prompt_cache_size: int, max_prompt_tokens: int) -> None:
        self.model = model
        pipeline = model.pipeline
        self._transformer = pipeline.transformer
        self._vae = pipeline.vae
        self._prompts = PromptEncoder(pipeline, prompt_cache_size, max_prompt_tokens)
        self._schedules = ScheduleTable(model.scheduler_config)
        self._batches: dict[Hashable, _Batch] = {}
        self.adapters = LoraBank(self._transformer)
        self._projector = PreviewProjector.fit(self._vae, model.vae_scale_factor, model.device)

    @property
    def prompt_stats(self) -> PromptCacheStats:
        return self._prompts.stats

    def min_steps(self, width: int, height: int) -> int:
        shape = LatentShape.for_image(
            height, width, self.model.latent_channels, self.model.vae_scale_factor
        )
        return self._schedules.min_steps(shape.seq_len)

    # --- the interface the batcher drives ---

    @torch.inference_mode()
    def add(self, group: Hashable, requests: Sequence[EngineRequest]) -> dict[str, float]:
        """Creates the rows of `requests` in batch `group`; returns the stage timings.

        All prompts of the admitted requests go through the text encoder in one call (cached
        prompts skip it).
        """
        started = time.perf_counter()
        prompts = [request.params.prompt for request in requests]
        negatives = [request.params.negative_prompt for request in requests if request.params.cfg]
        encoded = self._prompts.encode(prompts + negatives, self.model.device, self.model.dtype)
        prompt_states = dict(zip(prompts, encoded[: len(prompts)], strict=True))
        negative_states = dict(zip(negatives, encoded[len(prompts) :], strict=True))
        text_seconds = time.perf_counter() - started
        for request in requests:
            params = request.params
            batch = self._batch_for(group, params)
            schedule = self._schedules.get(params.steps, batch.shape.seq_len)
            new_latents = []
            for index in range(params.num_images):
                batch.rows.append(
                    _Row(
                        request_id=request.request_id,
                        image_index=index,
                        seed=params.seed + index,
                        schedule=schedule,
                        prompt=prompt_states[params.prompt],
                        negative=negative_states[params.negative_prompt] if params.cfg else None,
                        guidance=params.guidance_scale,
                        adapters=params.adapters,
                        preview_every=params.preview_every_n_steps,
                        float_output=params.output_format.is_float,
                    )
                )
                new_latents.append(
                    initial_noise(
                        batch.shape, params.seed + index, self.model.dtype, self.model.device
                    )
                )
            parts = [batch.latents] if batch.latents is not None else []
            batch.latents = torch.cat(parts + new_latents)
            batch.text = None
        return {"text_encode": text_seconds}

    @torch.inference_mode()
    def step(self, group: Hashable) -> StepResult:
        """Runs one denoising step for every row of batch `group`; decodes rows that finish."""
        batch = self._batches[group]
        assert batch.latents is not None
        timings: dict[str, float] = {}
        started = time.perf_counter()
        velocity = self._predict(batch)
        latents = batch.latents
        sigmas = self._per_row([row.schedule.sigmas[row.step] for row in batch.rows])
        dts = self._per_row([row.schedule.dts[row.step] for row in batch.rows])
        # x0 estimates for previews come from the state before the update.
        preview_rows = [i for i, row in enumerate(batch.rows) if self._wants_preview(row)]
        denoised = (
            latents[preview_rows].float() - sigmas[preview_rows] * velocity[preview_rows].float()
        )
        # Per-row Euler step, in float32 like FlowMatchEulerDiscreteScheduler.step.
        batch.latents = (latents.float() + dts * velocity).to(velocity.dtype)
        for row in batch.rows:
            row.step += 1
        self._sync()
        timings["denoise_step"] = time.perf_counter() - started

        previews = self._previews(batch, preview_rows, denoised, timings)
        finished_rows = [index for index, row in enumerate(batch.rows) if row.done]
        images = self._decode(batch, finished_rows, timings) if finished_rows else {}
        result = StepResult(
            batch_size=len(batch.rows),
            progress=self._progress(batch, previews),
            finished=self._collect_finished(batch, finished_rows, images),
            stage_seconds=timings,
            adapter_rows=_count_adapter_rows(batch.rows),
        )
        batch.keep([index for index, row in enumerate(batch.rows) if not row.done])
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

    def has_work(self) -> bool:
        return bool(self._batches)

    def run_to_completion(self, request: EngineRequest) -> FinishedRequest:
        """Runs one request alone through add/step (warm-up and tests); the engine must be idle."""
        group = ("solo", request.request_id)
        self.add(group, [request])
        while True:
            result = self.step(group)
            if result.finished:
                return result.finished[0]

    # --- one step, piece by piece ---

    def _batch_for(self, group: Hashable, params: GenerationParams) -> _Batch:
        batch = self._batches.get(group)
        if batch is None:
            shape = LatentShape.for_image(
                params.height, params.width, self.model.latent_channels, self.model.vae_scale_factor
            )
            batch = self._batches[group] = _Batch(key=params.batch_key, shape=shape)
        elif batch.key != params.batch_key:
            raise ValueError(f"request of shape {params.batch_key} sent to batch of {batch.key}")
        return batch

    def _predict(self, batch: _Batch) -> torch.Tensor:
        """The transformer's velocity for every row, with true CFG in the same call."""
        assert batch.latents is not None
        rows = batch.rows
        if batch.text is None:
            states = [row.prompt for row in rows]
            if batch.key.cfg:
                states += [row.negative for row in rows]  # type: ignore[misc]
            batch.text = pad_embeddings(states)
        text, mask = batch.text
        timesteps = self._per_row([row.schedule.timesteps[row.step] for row in rows]).view(-1)
        # As QwenImagePipeline: the timestep is cast to the latents' dtype, then scaled to [0, 1].
        timesteps = timesteps.to(batch.latents.dtype) / 1000
        hidden = batch.latents
        row_adapters = [row.adapters for row in rows]
        if batch.key.cfg:
            hidden, timesteps = torch.cat([hidden, hidden]), torch.cat([timesteps, timesteps])
            row_adapters += row_adapters  # the unconditional half uses the same adapters
        with self.adapters.applied(row_adapters, hidden.dtype):
            output: torch.Tensor = self._transformer(
                hidden_states=hidden,
                timestep=timesteps,
                encoder_hidden_states=text,
                encoder_hidden_states_mask=mask,
                img_shapes=[[batch.shape.rope_shape]] * hidden.shape[0],
                return_dict=False,
            )[0]
        if not batch.key.cfg:
            return output
        cond, uncond = output.chunk(2)
        scale = self._per_row([row.guidance for row in rows])
        combined = uncond + scale * (cond - uncond)
        # Qwen-Image rescales the guided velocity to the conditional one's norm, per token.
        rescale = torch.norm(cond, dim=-1, keepdim=True) / torch.norm(
            combined, dim=-1, keepdim=True
        )
        guided: torch.Tensor = (combined * rescale).to(output.dtype)
        return guided

    def _wants_preview(self, row: _Row) -> bool:
        next_step = row.step + 1
        return (
            row.preview_every > 0
            and next_step % row.preview_every == 0
            and next_step < len(row.schedule)
        )

    def _previews(
        self, batch: _Batch, rows: list[int], denoised: torch.Tensor, timings: dict[str, float]
    ) -> dict[int, Preview]:
        if not rows:
            return {}
        started = time.perf_counter()
        latents = unpack(denoised, batch.key.height, batch.key.width, self.model.vae_scale_factor)
        pixels = self._projector.project(denormalize(latents, self._vae))
        timings["preview"] = time.perf_counter() - started
        return {
            row: Preview(image_index=batch.rows[row].image_index, pixels=pixels[i])
            for i, row in enumerate(rows)
        }

    def _decode(
        self, batch: _Batch, rows: list[int], timings: dict[str, float]
    ) -> dict[int, np.ndarray]:
        """Decodes the finished rows in one VAE call, as QwenImagePipeline does per call."""
        assert batch.latents is not None
        started = time.perf_counter()
        latents = unpack(
            batch.latents[rows], batch.key.height, batch.key.width, self.model.vae_scale_factor
        )
        latents = denormalize(latents.to(self._vae.dtype), self._vae)
        decoded = self._vae.decode(latents, return_dict=False)[0][:, :, 0]
        images = (decoded.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)  # [n, H, W, 3]
        as_uint8 = (images * 255).round().to(torch.uint8)
        result = {}
        for i, row in enumerate(rows):
            source = images[i] if batch.rows[row].float_output else as_uint8[i]
            result[row] = source.cpu().numpy()
        timings["vae_decode"] = time.perf_counter() - started
        return result

    def _progress(self, batch: _Batch, previews: dict[int, Preview]) -> list[RequestProgress]:
        by_request: dict[str, RequestProgress] = {}
        for index, row in enumerate(batch.rows):
            progress = by_request.get(row.request_id)
            if progress is None:
                progress = by_request[row.request_id] = RequestProgress(
                    row.request_id, row.step, len(row.schedule)
                )
            if index in previews:
                progress.previews.append(previews[index])
        return list(by_request.values())

    def _collect_finished(
        self, batch: _Batch, rows: list[int], images: dict[int, np.ndarray]
    ) -> list[FinishedRequest]:
        by_request: dict[str, FinishedRequest] = {}
        for index in rows:
            row = batch.rows[index]
            finished = by_request.setdefault(row.request_id, FinishedRequest(row.request_id, []))
            finished.images.append(GeneratedImage(pixels=images[index], seed=row.seed))
        return list(by_request.values())

    def _per_row(self, values: list[float]) -> torch.Tensor:
        """[rows, 1, 1] float32 column on the device (exact: float32 values round-trip)."""
        return torch.tensor(values, dtype=torch.float32, device=self.model.device).view(-1, 1, 1)

    def _sync(self) -> None:
        if self.model.device.type == "cuda":
            torch.cuda.synchronize(self.model.device)


def _count_adapter_rows(rows: list[_Row]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for row in rows:
        for spec in row.adapters:
            counts[spec.name] = counts.get(spec.name, 0) + 1
    return counts
