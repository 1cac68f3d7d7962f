"""The variants on the engine: each one's LoRAs in the LoRA bank and its sigma schedules.

A variant's rows share transformer calls with every other row of their batch key: its LoRAs are
applied per row by the bank (`lora`), like a request's adapters, and its scheduler preset gives
its rows their own schedules (`sampling.ScheduleTable`, one per preset). A request's own
adapters apply on top of its variant's LoRAs; the deltas add, as `set_adapters` with several
adapters does in diffusers. Everything here runs on the engine thread.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..base.types import AdapterSpec
from ..base.variants import Variant, VariantConfig, VariantLora, default_variant
from .lora import LoraBank
from .sampling import LIGHTNING_SCHEDULER_OVERRIDES, ScheduleTable

# Bank names of variant LoRAs start with this, and its ':' is in no adapter name
# (`adapter_files`): a request can never name one, and the adapter registry never evicts one.
BANK_PREFIX = "variant-lora:"


@dataclass(frozen=True, slots=True)
class _EngineVariant:
    loras: tuple[AdapterSpec, ...]  # bank names and scales, applied to every row of it
    schedules: ScheduleTable  # its preset's schedules (shared by variants of one preset)


class VariantTable:
    """Variants by name; the name "" (a server without variants) is the model as loaded."""

    def __init__(self, default_schedules: ScheduleTable) -> None:
        self._default = _EngineVariant((), default_schedules)
        self._variants: dict[str, _EngineVariant] = {}

    def schedules(self, name: str) -> ScheduleTable:
        return self._get(name).schedules

    def loras(self, name: str) -> tuple[AdapterSpec, ...]:
        return self._get(name).loras

    def all_loras(self) -> tuple[AdapterSpec, ...]:
        """Every variant's LoRAs, each once: what the memory probe puts on every row, so the
        batch limits hold whatever mix of variants a batch has."""
        unique = {spec.name: spec for variant in self._variants.values() for spec in variant.loras}
        return tuple(unique.values())

    def load(
        self,
        configs: list[VariantConfig],
        adapter_dir: Path | None,
        bank: LoraBank,
        image_seq_len: int,
        max_steps: int,
    ) -> list[Variant]:
        """Loads every variant's LoRAs into `bank` (a file used twice is loaded once) and
        returns the variants as served, with each one's step range resolved.

        Raises:
            ValueError: naming the entry and field: a LoRA that is not one for this model, or a
                min_steps (or default_steps) below what the variant's schedule allows.
        """
        tables = {"default": self._default.schedules}
        tables["lightning"] = ScheduleTable(
            {**dict(self._default.schedules.config), **LIGHTNING_SCHEDULER_OVERRIDES}
        )
        bank_names: dict[Path, str] = {}
        described = []
        first = default_variant(configs)
        for index, config in enumerate(configs):
            where = f"variants[{index}] ({config.name!r})"
            loras = tuple(
                AdapterSpec(self._load_lora(lora, where, adapter_dir, bank, bank_names), lora.scale)
                for lora in config.loras
            )
            schedules = tables[config.scheduler_preset]
            fewest = schedules.min_steps(image_seq_len)
            low = config.min_steps if config.min_steps is not None else fewest
            if low < fewest or config.resolved_default_steps < fewest:
                field = "min_steps" if low < fewest else "default_steps"
                raise ValueError(
                    f"{where}: {field} is below {fewest}, the fewest steps its scheduler"
                    f" ({config.scheduler_preset}) gives a finite schedule for"
                )
            self._variants[config.name] = _EngineVariant(loras, schedules)
            high = config.max_steps if config.max_steps is not None else max_steps
            described.append(_describe(config, config is first, low, high))
        return described

    def _load_lora(
        self,
        lora: VariantLora,
        variant: str,
        adapter_dir: Path | None,
        bank: LoraBank,
        bank_names: dict[Path, str],
    ) -> str:
        """The bank name of one of a variant's LoRAs, loading the file if no variant did yet."""
        where = f"{variant}: loras {lora.file!r}"
        try:
            path = lora.path(adapter_dir).resolve()
        except ValueError as error:
            raise ValueError(f"{where}: {error}") from error
        if path not in bank_names:
            name = f"{BANK_PREFIX}{len(bank_names)}:{path.name}"
            try:
                bank.load(name, path)
            except ValueError as error:
                raise ValueError(f"{where}: not a LoRA for this model: {error}") from error
            bank_names[path] = name
        return bank_names[path]

    def _get(self, name: str) -> _EngineVariant:
        return self._variants[name] if name else self._default


def _describe(config: VariantConfig, is_default: bool, low: int, high: int) -> Variant:
    return Variant(
        name=config.name,
        loras=tuple((lora.label, lora.scale) for lora in config.loras),
        scheduler_preset=config.scheduler_preset,
        default_steps=config.resolved_default_steps,
        default_guidance_scale=config.default_guidance_scale,
        min_steps=low,
        max_steps=high,
        is_default=is_default,
    )
