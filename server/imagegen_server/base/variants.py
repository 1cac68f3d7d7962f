"""Variants: named configurations of the served model that a request picks by name.

A variant is configuration, not a model: its LoRA files with their scales, its scheduler preset,
its default steps and guidance, and the step range a request may ask for. The setting `variants`
lists them (`VariantConfig`); every field is checked at start-up and a mistake names the entry
(`variants[1] ('lightning-8')`) and the field. Once the engine has loaded the LoRAs and knows
each schedule's fewest steps, each variant is described by a `Variant`: what validation holds a
request to and what GetServerInfo reports.

Nothing here imports torch: the engine loads the files (`engine.variants`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .adapter_files import NAME_PATTERN as ADAPTER_NAME_PATTERN
from .adapter_files import SUFFIX as ADAPTER_SUFFIX

VARIANT_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# Steps of a variant that gives none, by scheduler preset (the setting `default_steps` too).
PRESET_DEFAULT_STEPS = {"lightning": 8, "default": 30}


class VariantLora(BaseModel):
    """One LoRA of a variant: a file and the scale its delta is applied with."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    file: str = Field(description="a .safetensors path, or an adapter name in adapter_dir")
    scale: float = Field(1.0, allow_inf_nan=False, description="multiplier of its delta")

    @model_validator(mode="before")
    @classmethod
    def _from_text(cls, value: Any) -> Any:
        """`FILE` or `FILE@SCALE`, as the setting `lora` takes them, also work."""
        if not isinstance(value, str):
            return value
        file, at, scale = value.rpartition("@")
        return {"file": file, "scale": scale} if at else {"file": value}

    @property
    def by_name(self) -> bool:
        """An adapter name in adapter_dir rather than a path."""
        return bool(ADAPTER_NAME_PATTERN.fullmatch(self.file)) and not self.file.endswith(
            ADAPTER_SUFFIX
        )

    def path(self, adapter_dir: Path | None) -> Path:
        """The file this entry means.

        Raises:
            ValueError: a name with no adapter_dir, or a file that does not exist.
        """
        if self.by_name:
            if adapter_dir is None:
                raise ValueError(f"{self.file!r} is an adapter name, and adapter_dir is not set")
            path = adapter_dir / f"{self.file}{ADAPTER_SUFFIX}"
        else:
            path = Path(self.file)
        if not path.is_file():
            raise ValueError(f"file not found: {path}")
        return path

    @property
    def label(self) -> str:
        """How GetServerInfo names it: the adapter name, or the file's name."""
        return self.file if self.by_name else Path(self.file).name


class VariantConfig(BaseModel):
    """One entry of the setting `variants`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="what GenerateRequest.variant names; 1-64 of [A-Za-z0-9._-]")
    loras: tuple[VariantLora, ...] = Field((), description="applied to its rows, in this order")
    scheduler_preset: Literal["default", "lightning"] = "default"
    default_steps: int | None = Field(
        None, ge=1, description="steps of requests that give none; unset = 8 lightning, 30 default"
    )
    default_guidance_scale: float = Field(1.0, allow_inf_nan=False, description="1.0 = CFG off")
    min_steps: int | None = Field(None, ge=1, description="unset = the fewest its schedule allows")
    max_steps: int | None = Field(None, ge=1, description="unset = the setting max_steps")
    default: bool = Field(False, description="used when a request names no variant")

    @property
    def resolved_default_steps(self) -> int:
        if self.default_steps is not None:
            return self.default_steps
        return PRESET_DEFAULT_STEPS[self.scheduler_preset]


@dataclass(frozen=True, slots=True)
class Variant:
    """A variant as the server runs it: what validation checks and GetServerInfo reports."""

    name: str
    loras: tuple[tuple[str, float], ...]  # (label, scale) of each LoRA, in order
    scheduler_preset: str  # "default" or "lightning"
    default_steps: int  # of a request that gives none
    default_guidance_scale: float  # of a request that gives none; 1.0 = CFG off
    min_steps: int  # the range a request's num_inference_steps must lie in
    max_steps: int
    is_default: bool  # used when a request names no variant


def variant_problems(
    variants: list[VariantConfig],
    max_steps: int,
    guidance: tuple[float, float],
    adapter_dir: Path | None,
) -> list[str]:
    """Every mistake in the setting `variants`, each naming the entry and its field."""
    problems: list[str] = []
    seen: set[str] = set()
    for index, variant in enumerate(variants):
        where = f"variants[{index}] ({variant.name!r})"
        if not VARIANT_NAME_PATTERN.fullmatch(variant.name):
            problems.append(f"{where}: name must be 1-64 of [A-Za-z0-9._-], starting alphanumeric")
        if variant.name in seen:
            problems.append(f"{where}: name is used by an earlier entry")
        seen.add(variant.name)
        problems += [f"{where}: {problem}" for problem in _entry_problems(variant, max_steps)]
        low, high = guidance
        if not low <= variant.default_guidance_scale <= high:
            problems.append(
                f"{where}: default_guidance_scale {variant.default_guidance_scale} outside"
                f" [min_guidance_scale {low}, max_guidance_scale {high}]"
            )
        for lora_index, lora in enumerate(variant.loras):
            try:
                lora.path(adapter_dir)
            except ValueError as error:
                problems.append(f"{where}: loras[{lora_index}]: {error}")
    if sum(variant.default for variant in variants) > 1:
        marked = [variant.name for variant in variants if variant.default]
        problems.append(f"variants: only one entry may set default: true (set on {marked})")
    return problems


def _entry_problems(variant: VariantConfig, max_steps: int) -> list[str]:
    """A variant's step range against itself and the server's max_steps."""
    problems = []
    high = variant.max_steps if variant.max_steps is not None else max_steps
    low = variant.min_steps if variant.min_steps is not None else 1
    if high > max_steps:
        problems.append(f"max_steps {high} exceeds the setting max_steps ({max_steps})")
    if low > high:
        problems.append(f"min_steps {low} > max_steps {high}")
    default = variant.resolved_default_steps
    if not low <= default <= high:
        problems.append(f"default_steps {default} outside [min_steps {low}, max_steps {high}]")
    return problems


def default_variant(variants: list[VariantConfig]) -> VariantConfig | None:
    """The entry marked `default: true`, else the first; None when there are none."""
    marked = [variant for variant in variants if variant.default]
    chosen = marked or variants
    return chosen[0] if chosen else None
