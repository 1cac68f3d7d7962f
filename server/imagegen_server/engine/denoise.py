"""One denoising step for a set of rows: the transformer call (true CFG in the same call, each
row with its own timestep and adapters) and the per-row flow-matching Euler update.

`Denoiser.advance` changes no state: it returns the rows' next latents, so the engine can retry
a failed call on part of the batch and keep only what succeeded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..base.types import AdapterSpec
from .acceleration import TransformerRunner, host_to_device
from .init_image import InpaintState
from .lora import LoraBank
from .prompts import pad_embeddings
from .sampling import SigmaSchedule


@dataclass(slots=True, eq=False)
class Row:
    """One image being denoised."""

    request_id: str  # the request the row belongs to (`EngineRequest.request_id`)
    image_index: int  # which of the request's images, 0-based
    seed: int  # the request's seed + image_index
    schedule: SigmaSchedule  # the row's own sigmas (image-to-image: the tail of a schedule)
    prompt: torch.Tensor  # [tokens, dim] text-encoder states
    negative: torch.Tensor | None  # the same for the negative prompt when CFG is on
    guidance: float  # true-CFG scale (1.0 = off)
    adapters: tuple[AdapterSpec, ...]  # per-request LoRAs and their scales
    preview_every: int  # 0 = none
    float_output: bool  # decode to float32 (NPY) instead of uint8
    inpaint: InpaintState | None = None  # inpainting: keeps the unmasked region
    # Editing: the references' packed latents [1, tokens, channels * 4] (shared by the rows of
    # a request), after the row's own latents in every transformer call.
    reference: torch.Tensor | None = None
    step: int = 0  # index of the next step in `schedule`
    variant: str = ""  # the variant it runs as ("" = a server without variants)
    variant_loras: tuple[AdapterSpec, ...] = ()  # its variant's LoRAs, applied before `adapters`

    @property
    def done(self) -> bool:
        return self.step >= len(self.schedule)

    @property
    def wants_preview(self) -> bool:
        """A preview after the coming step (not after the last: the image itself follows)."""
        coming = self.step + 1
        return (
            self.preview_every > 0
            and coming % self.preview_every == 0
            and coming < len(self.schedule)
        )


# Where an injected fault strikes (`FaultInjection.stage`): the four model calls a request's
# rows go through.
FAULT_STAGES = ("denoise", "text_encode", "image_encode", "vae_decode")


@dataclass(frozen=True, slots=True)
class FaultInjection:
    """Testing only (settings `fault_injection_*`): make a model call fail on purpose, so the
    tests can prove that every stage's failure stays with the request that caused it."""

    request_marker: str | None = None  # a `stage` call holding such a request id raises
    oom_above_rows: int = 0  # a transformer call with more rows raises out-of-memory; 0 = never
    stage: str = "denoise"  # which call the marker poisons: one of FAULT_STAGES

    def check(self, rows: Sequence[Row]) -> None:
        """Before a transformer call for `rows`."""
        self.check_stage("denoise", [row.request_id for row in rows])
        if self.oom_above_rows and len(rows) > self.oom_above_rows:
            raise torch.OutOfMemoryError(f"injected out-of-memory above {self.oom_above_rows} rows")

    def check_stage(self, stage: str, request_ids: Sequence[str]) -> None:
        """Before a `stage` call for the rows or requests `request_ids`."""
        marker = self.request_marker
        if stage == self.stage and marker and any(marker in rid for rid in request_ids):
            raise RuntimeError(f"injected fault in {stage} (fault_injection_request_marker)")


@dataclass(slots=True)
class Advance:
    """The outcome of one step for some rows of a batch, keyed by row position in the batch."""

    indices: list[int]  # rows that stepped, in batch order
    latents: torch.Tensor | None  # their next latents, [len(indices), seq, channels * 4]
    denoised: dict[int, torch.Tensor] = field(default_factory=dict)  # x0 estimates for previews
    failed: dict[int, str] = field(default_factory=dict)  # row -> why (for the log)
    largest_call: int = 0  # rows in the largest transformer call that succeeded
    out_of_memory: bool = False  # a call ran out of memory (largest_call then is what fit)

    @staticmethod
    def merge(first: Advance, second: Advance) -> Advance:
        parts = [part.latents for part in (first, second) if part.latents is not None]
        return Advance(
            indices=first.indices + second.indices,
            latents=torch.cat(parts) if parts else None,
            denoised={**first.denoised, **second.denoised},
            failed={**first.failed, **second.failed},
            largest_call=max(first.largest_call, second.largest_call),
            out_of_memory=first.out_of_memory or second.out_of_memory,
        )


class Denoiser:
    def __init__(
        self,
        transformer: TransformerRunner,
        adapters: LoraBank,
        device: torch.device,
        faults: FaultInjection | None = None,
    ) -> None:
        self._transformer = transformer
        self._adapters = adapters
        self._device = device
        self._faults = faults or FaultInjection()

    def advance(
        self,
        rows: Sequence[Row],
        indices: list[int],
        latents: torch.Tensor,
        rope_shapes: list[tuple[int, int, int]],
        cfg: bool,
        text: tuple[torch.Tensor, torch.Tensor | None] | None = None,
    ) -> Advance:
        """One step for `rows` (at positions `indices` of their batch) from `latents`;
        `rope_shapes`: the image's token grid, then each reference's (`Batch.rope_shapes`).

        Rows whose result is not finite are reported failed; a model error raises.
        """
        self._faults.check(rows)
        scalars = self._scalars(rows)
        velocity = self._velocity(rows, latents, rope_shapes, cfg, text, scalars)
        sigmas, dts = scalars.sigmas, scalars.dts
        # Per-row Euler step, in float32 like FlowMatchEulerDiscreteScheduler.step.
        stepped = (latents.float() + dts * velocity).to(velocity.dtype)
        for position, row in enumerate(rows):
            if row.inpaint is not None:
                next_sigma = row.schedule.sigmas[row.step + 1]
                stepped[position] = row.inpaint.blend(stepped[position : position + 1], next_sigma)[
                    0
                ]
        finite = torch.isfinite(stepped).flatten(1).all(dim=1).tolist()
        advance = Advance(indices=[], latents=None, largest_call=len(rows))
        keep = []
        for position, (index, row) in enumerate(zip(indices, rows, strict=True)):
            if not finite[position]:
                advance.failed[index] = "non-finite values after the step"
                continue
            keep.append(position)
            advance.indices.append(index)
            if row.wants_preview:  # x0 estimate from the state before the update
                x0 = latents[position].float() - sigmas[position] * velocity[position].float()
                advance.denoised[index] = x0
        advance.latents = stepped[keep] if keep else None
        return advance

    def _velocity(
        self,
        rows: Sequence[Row],
        latents: torch.Tensor,
        rope_shapes: list[tuple[int, int, int]],
        cfg: bool,
        text: tuple[torch.Tensor, torch.Tensor | None] | None,
        scalars: _StepScalars,
    ) -> torch.Tensor:
        """The transformer's velocity for every row, with true CFG in the same call. Edit
        rows' references follow their latents in the sequence; their outputs are dropped."""
        if text is None:
            text = text_inputs(rows, cfg)
        states, mask = text
        # As QwenImagePipeline: the timestep is cast to the latents' dtype, then scaled to [0, 1].
        timesteps = scalars.timesteps.to(latents.dtype) / 1000
        hidden = latents
        if rows[0].reference is not None:  # a batch's rows all edit, or none does (its key)
            references = torch.cat([row.reference for row in rows])  # type: ignore[misc]
            hidden = torch.cat([latents, references], dim=1)
        row_adapters = [row.variant_loras + row.adapters for row in rows]
        if cfg:
            hidden, timesteps = torch.cat([hidden, hidden]), torch.cat([timesteps, timesteps])
            row_adapters += row_adapters  # the unconditional half uses the same adapters
        with self._adapters.applied(row_adapters):
            output = self._transformer(hidden, timesteps, states, mask, rope_shapes)
        output = output[:, : latents.shape[1]]
        if not cfg:
            return output
        cond, uncond = output.chunk(2)
        combined = uncond + scalars.guidance * (cond - uncond)
        # Qwen-Image rescales the guided velocity to the conditional one's norm, per token.
        norms = torch.norm(cond, dim=-1, keepdim=True) / torch.norm(combined, dim=-1, keepdim=True)
        guided: torch.Tensor = (combined * norms).to(output.dtype)
        return guided

    def _scalars(self, rows: Sequence[Row]) -> _StepScalars:
        """Every per-row number of this step in one host-to-device copy that does not make the
        host wait for the device (`host_to_device`)."""
        timesteps, sigmas, dts, guidance = host_to_device(
            [
                [row.schedule.timesteps[row.step] for row in rows],
                [row.schedule.sigmas[row.step] for row in rows],
                [row.schedule.dts[row.step] for row in rows],
                [row.guidance for row in rows],
            ],
            torch.float32,  # exact: the schedule's values are float32 already
            self._device,
        )
        column = (-1, 1, 1)
        return _StepScalars(timesteps, sigmas.view(column), dts.view(column), guidance.view(column))


@dataclass(frozen=True, slots=True)
class _StepScalars:
    """The per-row numbers of one step, on the device."""

    timesteps: torch.Tensor  # [rows] float32
    sigmas: torch.Tensor  # [rows, 1, 1] noise level before the step
    dts: torch.Tensor  # [rows, 1, 1] sigma change of the step
    guidance: torch.Tensor  # [rows, 1, 1] true-CFG scale


def text_inputs(rows: Sequence[Row], cfg: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Prompt states padded to the longest, plus the mask (None: no padding); negatives after
    prompts for CFG."""
    states = [row.prompt for row in rows]
    if cfg:
        states += [row.negative for row in rows if row.negative is not None]
    return pad_embeddings(states)
