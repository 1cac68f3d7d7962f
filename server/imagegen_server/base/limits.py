"""The ranges a request must respect, listed once.

`RequestLimits` is the one list: its values come from the settings of the same name (plus the
loaded model's facts), and GetServerInfo's `Limits` message is filled from it field by field
(`api.service`; a test fails if the two lists differ). Adding a limit is a setting, its name
here, and the proto field.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from .config import Settings

# Settings whose value must be a multiple of the model's size multiple.
_SIZE_SETTINGS = (
    "min_width",
    "max_width",
    "min_height",
    "max_height",
    "default_width",
    "default_height",
)


@dataclass(frozen=True, slots=True)
class RequestLimits:
    """The ranges a request must respect; GetServerInfo reports every field."""

    size_multiple: int
    min_width: int
    max_width: int
    min_height: int
    max_height: int
    max_pixels: int
    default_width: int
    default_height: int
    min_steps: int
    max_steps: int
    default_steps: int
    max_num_images: int
    max_prompt_chars: int
    max_prompt_tokens: int
    max_negative_prompt_chars: int
    max_negative_prompt_tokens: int
    min_guidance_scale: float
    max_guidance_scale: float
    min_seed: int
    max_seed: int
    max_adapters_per_request: int
    min_adapter_scale: float
    max_adapter_scale: float
    min_preview_every_n_steps: int
    max_request_bytes: int
    max_init_image_pixels: int
    default_strength: float
    priority_levels: int
    default_priority: int
    default_output_quality: int
    max_reference_images: int  # 0: the model is not an edit model

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        size_multiple: int,
        min_steps: int,
        max_reference_images: int = 0,
    ) -> RequestLimits:
        """The configured limits with the model's facts: its size multiple, its step minimum and
        how many reference images it takes.

        Raises:
            ValueError: a configured size is not a multiple of the model's size multiple.
        """
        for name in _SIZE_SETTINGS:
            if getattr(settings, name) % size_multiple:
                raise ValueError(
                    f"{name} ({getattr(settings, name)}) must be a multiple of {size_multiple}"
                    " for this model"
                )
        from_model = {
            "size_multiple": size_multiple,
            "min_steps": min_steps,
            "default_steps": settings.resolved_default_steps,
            "max_reference_images": max_reference_images,
        }
        return cls(
            **{
                field.name: from_model[field.name]
                if field.name in from_model
                else getattr(settings, field.name)
                for field in fields(cls)
            }
        )
