"""Per-row LoRA: several adapters, each on its own rows and scale, inside one transformer call.

Adapter files (Kohya `lora_down`/`lora_up`/`alpha`, or diffusers/PEFT `lora_A`/`lora_B`) are read
with diffusers' own `QwenImagePipeline.lora_state_dict`, which normalises both formats and folds
Kohya's alpha into the weights; a PEFT file's adapter metadata (`lora_alpha`, `r` and their
per-layer patterns) gives each layer PEFT's `alpha / r` scale, folded in here. Each targeted
Linear of the transformer is wrapped once; during a call its output gets, for every active
adapter, `scale[row] * B(A(x[row]))` on the rows that use that adapter, which is PEFT's LoRA
forward applied row by row. Rows without adapters pay nothing but the wrapper's check.
Everything here runs on the engine thread.

Under `torch.compile` the deltas run outside the compiled graphs: a graph sees only whether any
adapter is active, so it has two variants (none, some), both compiled at start-up, instead of
one per mix of adapters, ranks and rows, each compiled the first time a request brings it. For
the same reason a compiled server wraps every Linear before compiling (`wrap_all`): a layer
wrapped later would change the module the graphs were traced from. The price is in the "some"
variant: every wrapped Linear breaks the graph there (`_add_deltas` is never compiled), so a
Qwen-Image block, with 14 Linears, runs as 15 compiled pieces with the deltas run eagerly
between them. What that costs on a GPU is not measured yet.

Adapters whose forward is more than `B(A(x))` times a scale (DoRA's magnitude vector, a bias on
lora_B) are refused when loaded: the per-row forward here would silently drop those parts.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import QwenImagePipeline
from peft import LoraConfig
from peft.utils.other import get_pattern_key
from torch import nn

from ..base.types import AdapterSpec
from .acceleration import host_to_device

TRANSFORMER_PREFIX = "transformer."
# LoRA variants refused at load (see the module docstring), by state-dict key part and by PEFT
# `LoraConfig` option.
VARIANT_KEYS = {"lora_magnitude_vector": "DoRA", ".lora_B.bias": "a bias on lora_B"}
VARIANT_OPTIONS = {"use_dora": "DoRA", "lora_bias": "a bias on lora_B"}
UNSUPPORTED = "is not supported: only scale * B(A(x)) is added per row"


@dataclass(frozen=True, slots=True)
class _Pair:
    down: torch.Tensor  # A: [rank, in_features]
    up: torch.Tensor  # B: [out_features, rank]


@dataclass(slots=True)
class _Active:
    """One adapter in the current call: its weights by layer and the rows it applies to."""

    layers: dict[str, _Pair]  # by the wrapped layer's module path
    rows: torch.Tensor  # long [n] row indices with a non-zero scale
    scales: torch.Tensor  # [n] float32, multiplied into the delta in place (one rounding)


@dataclass(slots=True)
class _CallState:
    """Shared by every wrapped layer: what applies during the transformer call in progress."""

    active: list[_Active] = field(default_factory=list)  # the adapters some row of the call uses
    any_active: bool = False  # all a compiled graph depends on (see the module docstring)


class MultiLoraLinear(nn.Module):
    """Wraps a Linear (or a PEFT LoRA layer) and adds the active adapters' deltas per row."""

    def __init__(self, base: nn.Module, path: str, state: _CallState) -> None:
        super().__init__()
        self.base = base
        self.path = path
        self._state = state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output: torch.Tensor = self.base(x)
        if self._state.any_active:
            _add_deltas(self._state, self.path, x, output)
        return output


@torch.compiler.disable  # type: ignore[untyped-decorator]
def _add_deltas(state: _CallState, path: str, x: torch.Tensor, output: torch.Tensor) -> None:
    """Adds each active adapter's delta for layer `path` to its rows of `output`, in place (the
    base layer's output is a fresh tensor; an out-of-place add would copy the whole batch's
    output once per adapter). Never compiled: see the module docstring."""
    for adapter in state.active:
        pair = adapter.layers.get(path)
        if pair is None:
            continue
        rows = x.index_select(0, adapter.rows)
        delta = F.linear(F.linear(rows, pair.down), pair.up)
        # One scale per row, broadcast over whatever the layer's input has after the row
        # dimension: tokens x features for attention and MLP layers, only features for the
        # modulation and timestep layers, which see one vector per row.
        delta.mul_(adapter.scales.view((-1,) + (1,) * (delta.dim() - 1)))
        output.index_add_(0, adapter.rows, delta)


class LoraBank:
    """The loaded adapters' weights on the device, and the wrapped layers that apply them."""

    def __init__(self, transformer: nn.Module) -> None:
        self._transformer = transformer
        self._adapters: dict[str, dict[str, _Pair]] = {}
        self._wrapped: dict[str, MultiLoraLinear] = {}
        self._all_wrapped = False
        self._state = _CallState()

    @property
    def names(self) -> list[str]:
        return list(self._adapters)

    def parameters(self) -> int:
        """Adapter parameters held on the device (for memory accounting)."""
        return sum(
            pair.down.numel() + pair.up.numel()
            for layers in self._adapters.values()
            for pair in layers.values()
        )

    def load(self, name: str, path: Path) -> int:
        """Reads and checks an adapter file, then makes it available; returns parameters held.

        Raises:
            ValueError: the file is not a LoRA for this transformer (nothing changes then).
        """
        layers = self._read(path)
        for layer_path in layers:
            self._wrap(layer_path)
        self._adapters[name] = layers
        return self.parameters()

    def unload(self, name: str) -> int:
        """Drops an adapter's weights; returns the parameters still held."""
        self._adapters.pop(name, None)
        return self.parameters()

    @contextlib.contextmanager
    def applied(self, row_adapters: Sequence[tuple[AdapterSpec, ...]]) -> Iterator[None]:
        """Activates each row's adapters for one transformer call over `row_adapters` rows."""
        by_name: dict[str, tuple[list[int], list[float]]] = {}
        for row, specs in enumerate(row_adapters):
            for spec in specs:
                if spec.scale != 0.0:
                    rows, scales = by_name.setdefault(spec.name, ([], []))
                    rows.append(row)
                    scales.append(spec.scale)
        # On every step: copies that never make the host wait for the device (`host_to_device`).
        device = next(self._transformer.parameters()).device
        self._state.active = [
            _Active(
                layers=self._adapters[name],
                rows=host_to_device(rows, torch.long, device),
                # float32: a bfloat16 scale would round 0.7 to 0.699 before the multiply;
                # PEFT multiplies by the Python float (one rounding, to the delta's dtype).
                scales=host_to_device(scales, torch.float32, device),
            )
            for name, (rows, scales) in by_name.items()
        ]
        self._state.any_active = bool(self._state.active)
        try:
            yield
        finally:
            self._state.active = []
            self._state.any_active = False

    def wrap_all(self) -> None:
        """Wraps every Linear an adapter could target (a Linear, or a PEFT layer around one),
        so that loading adapters later changes no module (see the module docstring)."""
        targets: list[str] = []
        for path, module in self._transformer.named_modules():  # parents before children
            inside = bool(targets) and path.startswith(f"{targets[-1]}.")  # a PEFT layer's own
            target = isinstance(module, MultiLoraLinear) or isinstance(
                getattr(module, "base_layer", module), nn.Linear
            )
            if path and not inside and target:  # a wrapper already there is kept as it is
                targets.append(path)
        for path in targets:
            self._wrap(path)
        self._all_wrapped = True

    @contextlib.contextmanager
    def as_if_active(self) -> Iterator[None]:
        """Calls inside take the compiled variant for active adapters, with no delta to add:
        for compiling that variant at start-up."""
        self._state.any_active = True
        try:
            yield
        finally:
            self._state.any_active = False

    @property
    def all_wrapped(self) -> bool:
        """Whether `wrap_all` ran (a compiled server that takes adapters)."""
        return self._all_wrapped

    def _read(self, path: Path) -> dict[str, _Pair]:
        try:
            state, metadata = QwenImagePipeline.lora_state_dict(
                str(path), return_lora_metadata=True
            )
        except Exception as error:  # safetensors and key-conversion errors alike
            raise ValueError(f"not a readable LoRA file: {error}") from error
        _refuse_variants(state)
        config = _peft_config(metadata)
        modules = dict(self._transformer.named_modules())
        reference = next(self._transformer.parameters())
        layers: dict[str, _Pair] = {}
        for key, down in state.items():
            if not key.endswith(".lora_A.weight"):
                continue
            layer_path = key.removeprefix(TRANSFORMER_PREFIX).removesuffix(".lora_A.weight")
            up = state.get(key.replace(".lora_A.", ".lora_B."))
            target = modules.get(layer_path)
            if isinstance(target, MultiLoraLinear):
                target = target.base
            base = getattr(target, "base_layer", target)  # a PEFT-wrapped base LoRA layer
            if up is None or not isinstance(base, nn.Linear):
                raise ValueError(f"{layer_path}: no Linear layer of that name, or no lora_B weight")
            if down.shape[1] != base.in_features or up.shape[0] != base.out_features:
                raise ValueError(
                    f"{layer_path}: shapes {tuple(down.shape)}/{tuple(up.shape)} do not fit "
                    f"{base.in_features}->{base.out_features}"
                )
            layers[layer_path] = _Pair(
                down.to(reference.device, reference.dtype),
                # Scaled in float32, then cast: one rounding to a bfloat16 model's dtype, not two.
                (up.float() * _scaling(config, layer_path)).to(reference.device, reference.dtype),
            )
        if not layers:
            raise ValueError("no lora_A/lora_B (or lora_down/lora_up) weights found")
        return layers

    def _wrap(self, layer_path: str) -> None:
        if layer_path in self._wrapped:
            return
        parent_path, _, attribute = layer_path.rpartition(".")
        parent = self._transformer.get_submodule(parent_path) if parent_path else self._transformer
        wrapper = MultiLoraLinear(getattr(parent, attribute), layer_path, self._state)
        setattr(parent, attribute, wrapper)
        self._wrapped[layer_path] = wrapper


def _refuse_variants(state: dict[str, torch.Tensor]) -> None:
    """Raises ValueError, naming the key, if the file holds weights of a variant (VARIANT_KEYS)."""
    for key in state:
        for part, variant in VARIANT_KEYS.items():
            if part in key:
                raise ValueError(f"{key}: {variant} {UNSUPPORTED}")


def _peft_config(metadata: object) -> LoraConfig | None:
    """The PEFT `LoraConfig` in a file's adapter metadata, or None if it has none.

    diffusers' `load_lora_weights` builds a `LoraConfig` from the metadata that
    `save_lora_weights` wrote (keys prefixed `transformer.`); so does this.

    Raises:
        ValueError: the metadata is not a `LoraConfig`, or is one of a variant
            (VARIANT_OPTIONS).
    """
    if metadata is not None and not isinstance(metadata, dict):
        raise ValueError(f"adapter metadata is a JSON {type(metadata).__name__}, not an object")
    fields = {
        key.removeprefix(TRANSFORMER_PREFIX): value
        for key, value in (metadata or {}).items()
        if key.startswith(TRANSFORMER_PREFIX)
    }
    if not fields:
        return None
    try:
        config = LoraConfig(**fields)
    except Exception as error:  # unknown fields, or values PEFT refuses
        raise ValueError(f"adapter metadata is not a PEFT LoraConfig: {error}") from error
    for option, variant in VARIANT_OPTIONS.items():
        if getattr(config, option):
            raise ValueError(f"adapter metadata sets {option}: {variant} {UNSUPPORTED}")
    return config


def _scaling(config: LoraConfig | None, layer_path: str) -> float:
    """Layer `layer_path`'s `alpha / r` (PEFT's LoRA scaling), with the rank and alpha PEFT
    picks for it by `rank_pattern`/`alpha_pattern`; the same rules give the same pixels.
    Without metadata the scale is 1, as diffusers infers `lora_alpha = r` then (Kohya's alpha
    is already folded into the weights by `lora_state_dict`).

    Raises:
        ValueError: naming the layer and the metadata field that gives no usable number.
    """
    if config is None:
        return 1.0
    rank = _layer_value(config, "r", "rank_pattern", layer_path, positive=True)
    alpha = _layer_value(config, "lora_alpha", "alpha_pattern", layer_path, positive=False)
    return alpha / math.sqrt(rank) if config.use_rslora else alpha / rank


def _layer_value(
    config: LoraConfig, field: str, patterns_field: str, layer_path: str, positive: bool
) -> float:
    """The value of `field` for one layer: from the first pattern of `patterns_field` that
    matches it (PEFT's `get_pattern_key`), else `field` itself; a finite number (`positive`:
    above 0) or a ValueError naming the layer and the field."""
    patterns = getattr(config, patterns_field)
    try:
        key = get_pattern_key(patterns.keys(), layer_path)
    except (AttributeError, re.error) as error:  # not a dict, or a key that is no regex
        raise ValueError(f"{layer_path}: adapter metadata {patterns_field}: {error}") from error
    source, value = (
        (f"{patterns_field}[{key!r}]", patterns[key])
        if key in patterns
        else (field, getattr(config, field))
    )
    number = not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)
    if not number or (positive and value <= 0):
        wanted = "a positive number" if positive else "a number"
        raise ValueError(f"{layer_path}: adapter metadata {source} = {value!r}, not {wanted}")
    return float(value)
