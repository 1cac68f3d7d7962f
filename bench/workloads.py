"""What the load generators send: request classes (size and step count) and their mixes."""

from __future__ import annotations

import functools
import io
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image


@dataclass(frozen=True, slots=True, order=True)
class RequestClass:
    """One kind of request; every request of a class costs the engine the same."""

    width: int  # pixels
    height: int
    steps: int  # denoising steps
    adapter: str = ""  # LoRA adapter applied at scale 1 ("" = none)
    variant: str = ""  # the server variant it names ("" = the server's default)
    guidance_scale: float = 1.0  # true CFG (1.0 = off)
    references: int = 0  # reference images of an instruction edit (an edit model's server)

    @property
    def label(self) -> str:
        suffix = f"+{self.adapter}" if self.adapter else ""
        suffix += "+cfg" if self.guidance_scale > 1 else ""
        suffix += f"@{self.variant}" if self.variant else ""
        suffix += f"+{self.references}ref" if self.references else ""
        return f"{self.width}x{self.height}/{self.steps}{suffix}"


@functools.cache
def reference_pictures(count: int) -> tuple[bytes, ...]:
    """`count` fixed PNG pictures for edit requests, 640x480 then 480x480 alternately (each is
    VAE-encoded at about one megapixel whatever its size, as the edit pipelines do)."""
    pictures = []
    for index in range(count):
        width, height = (640, 480) if index % 2 == 0 else (480, 480)
        y, x = np.mgrid[0:height, 0:width]
        rgb = np.stack([x / width, y / height, np.full(x.shape, index / max(count, 1))], axis=-1)
        buffer = io.BytesIO()
        Image.fromarray((rgb * 255).astype(np.uint8)).save(buffer, format="PNG")
        pictures.append(buffer.getvalue())
    return tuple(pictures)


@dataclass(frozen=True, slots=True)
class Workload:
    """A named load shape: requests are drawn uniformly from `classes`."""

    name: str  # "single" or "mix"
    classes: tuple[RequestClass, ...]

    @property
    def step_counts(self) -> tuple[int, ...]:
        return tuple(sorted({cls.steps for cls in self.classes}))

    def class_of(self, index: int, seed: int) -> RequestClass:
        """The class of a run's `index`-th request: random, but the same for every system."""
        if len(self.classes) == 1:
            return self.classes[0]
        return random.Random(seed * 1_000_003 + index).choice(self.classes)

    def describe(self) -> str:
        return ", ".join(cls.label for cls in self.classes)


def parse_resolution(text: str) -> tuple[int, int]:
    """`WIDTHxHEIGHT` -> (width, height).

    Raises:
        ValueError: not two positive integers joined by `x`.
    """
    width, sep, height = text.lower().partition("x")
    if not sep or not width.isdigit() or not height.isdigit() or int(width) * int(height) == 0:
        raise ValueError(f"resolution {text!r}: expected WIDTHxHEIGHT, e.g. 256x256")
    return int(width), int(height)


def single_workload(resolution: tuple[int, int], steps: int) -> Workload:
    width, height = resolution
    return Workload("single", (RequestClass(width, height, steps),))


def mix_workload(resolutions: list[tuple[int, int]], step_counts: list[int]) -> Workload:
    """Every resolution with every step count, equally likely (50/50 on each axis for two)."""
    classes = tuple(
        RequestClass(width, height, steps) for width, height in resolutions for steps in step_counts
    )
    return Workload("mix", classes)
