"""Admitting requests into a batch: what `Engine.add` does before any step.

`prepare` conditions the requests admitted together: every prompt and negative prompt goes
through the text encoder in one call (cached texts skip it), every init image through the VAE
encoder in as few calls as fit. `start_rows` then gives each image of a request its row: its own
seed, sigma schedule and starting latents (noise from its seed, or its noised init image), so a
row's pixels never depend on which rows it shares a batch with.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from ..base.engine_api import EngineRequest
from ..base.types import AdapterSpec, GenerationParams
from .batch import Batch, chunks
from .denoise import FaultInjection, Row
from .init_image import InitImageEncoder, InpaintState
from .model import LoadedModel
from .prompts import PromptEncoder
from .sampling import SigmaSchedule, initial_noise
from .variants import VariantTable

# Images one VAE call of a kind ("encode", "decode") takes at a width and height; None: all.
VaeRows = Callable[[str, int, int], int | None]


@dataclass(frozen=True, slots=True, eq=False)
class PreparedRequest:
    """A request with what its rows are conditioned on, computed once for all its images."""

    request: EngineRequest  # as admitted
    prompt: torch.Tensor  # [tokens, dim] the prompt's text-encoder states
    negative: torch.Tensor | None  # the same for the negative prompt, when CFG is on
    posterior: DiagonalGaussianDistribution | None  # the init image's, for image-to-image

    @property
    def params(self) -> GenerationParams:
        return self.request.params


class Admission:
    """Runs the encoders for admitted requests and makes their rows; engine thread only."""

    def __init__(
        self,
        model: LoadedModel,
        prompts: PromptEncoder,
        variants: VariantTable,
        init_images: InitImageEncoder,
        vae_rows: VaeRows,
        faults: FaultInjection | None = None,
    ) -> None:
        self._model = model
        self._prompts = prompts
        self._variants = variants  # each variant's schedules and LoRAs
        self._init_images = init_images
        self._vae_rows = vae_rows  # the memory probe's limit on one VAE call
        self._faults = faults or FaultInjection()  # testing only: poisoned encoder calls

    def prepare(self, requests: Sequence[EngineRequest]) -> list[PreparedRequest]:
        """Text states for every request and VAE posteriors for those with an init image; an
        encoder's error propagates (the engine then prepares the requests one by one)."""
        prompts = [request.params.prompt for request in requests]
        negatives = [r.params.negative_prompt for r in requests if r.params.cfg]
        # One encoder call for both.
        self._faults.check_stage("text_encode", [request.request_id for request in requests])
        states = self._prompts.encode(prompts + negatives, self._model.device, self._model.dtype)
        negative_states = iter(states[len(prompts) :])
        posteriors = iter(self._encode_init_images(requests))
        return [
            PreparedRequest(
                request=request,
                prompt=states[index],
                negative=next(negative_states) if request.params.cfg else None,
                posterior=next(posteriors) if request.params.init_image else None,
            )
            for index, request in enumerate(requests)
        ]

    def start_rows(self, prepared: PreparedRequest, batch: Batch) -> None:
        """Appends one row per image of the request to `batch`, at its starting latents."""
        params = prepared.params
        full_schedule = self._variants.schedules(params.variant).get(
            params.schedule_steps or params.steps, batch.shape.seq_len
        )
        schedule = full_schedule.tail(params.steps)  # image-to-image starts part way
        variant_loras = self._variants.loras(params.variant)
        rows: list[Row] = []
        starts: list[torch.Tensor] = []
        for index in range(params.num_images):
            seed = params.seed + index
            latents, inpaint = self._start_latents(prepared, seed, batch, schedule)
            starts.append(latents)
            rows.append(_row(prepared, index, seed, schedule, inpaint, variant_loras))
        batch.append(rows, starts)

    def _encode_init_images(
        self, requests: Sequence[EngineRequest]
    ) -> list[DiagonalGaussianDistribution]:
        """The VAE posteriors of the requests' init images, in as few calls as fit (the
        requests admitted together share one size)."""
        images = [r.params.init_image for r in requests if r.params.init_image is not None]
        if not images:
            return []
        with_images = [r.request_id for r in requests if r.params.init_image is not None]
        self._faults.check_stage("image_encode", with_images)
        width, height = requests[0].params.width, requests[0].params.height
        chunk = self._vae_rows("encode", width, height)
        return [
            posterior
            for part in chunks(images, chunk)
            for posterior in self._init_images.encode(part, height, width)
        ]

    def _start_latents(
        self, prepared: PreparedRequest, seed: int, batch: Batch, schedule: SigmaSchedule
    ) -> tuple[torch.Tensor, InpaintState | None]:
        """One row's starting latents (and inpainting state), from its own seeded generator."""
        params = prepared.params
        if params.init_image is not None and prepared.posterior is not None:
            return self._init_images.start(
                prepared.posterior,
                params.init_image,
                seed,
                batch.shape,
                schedule,
                params.height,
                params.width,
            )
        generator = torch.Generator("cpu").manual_seed(seed)
        return initial_noise(batch.shape, generator, self._model.dtype, self._model.device), None


def _row(
    prepared: PreparedRequest,
    image_index: int,
    seed: int,
    schedule: SigmaSchedule,
    inpaint: InpaintState | None,
    variant_loras: tuple[AdapterSpec, ...],
) -> Row:
    params = prepared.params
    return Row(
        request_id=prepared.request.request_id,
        image_index=image_index,
        seed=seed,
        schedule=schedule,
        prompt=prepared.prompt,
        negative=prepared.negative,
        guidance=params.guidance_scale,
        adapters=params.adapters,
        preview_every=params.preview_every_n_steps,
        float_output=params.output_format.is_float,
        inpaint=inpaint,
        variant=params.variant,
        variant_loras=variant_loras,
    )
