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
wrapped later would change the module the graphs were traced from.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import QwenImagePipeline
from peft import LoraConfig
from peft.utils.other import get_pattern_key
from torch import nn

from .types import AdapterSpec

TRANSFORMER_PREFIX = "transformer."


@dataclass(frozen=True, slots=True)
class _Pair:
    down: torch.Tensor  # A: [rank, in_features]
    up: torch.Tensor  # B: [out_features, rank]


@dataclass(slots=True)
class _Active:
    """One adapter in the current call: its weights by layer and the rows it applies to."""

    layers: dict[str, _Pair]
    rows: torch.Tensor  # long [n] row indices with a non-zero scale
    scales: torch.Tensor  # [n] in the activation dtype


@dataclass(slots=True)
class _CallState:
    """Shared by every wrapped layer: what applies during the transformer call in progress."""

    active: list[_Active] = field(default_factory=list)
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
    def applied(
        self, row_adapters: Sequence[tuple[AdapterSpec, ...]], dtype: torch.dtype
    ) -> Iterator[None]:
        """Activates each row's adapters for one transformer call over `row_adapters` rows."""
        by_name: dict[str, tuple[list[int], list[float]]] = {}
        for row, specs in enumerate(row_adapters):
            for spec in specs:
                if spec.scale != 0.0:
                    rows, scales = by_name.setdefault(spec.name, ([], []))
                    rows.append(row)
                    scales.append(spec.scale)
        device = next(self._transformer.parameters()).device
        self._state.active = [
            _Active(
                layers=self._adapters[name],
                rows=torch.tensor(rows, dtype=torch.long, device=device),
                scales=torch.tensor(scales, dtype=dtype, device=device),
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
            scaling = _peft_scaling(metadata)
        except Exception as error:  # safetensors, key-conversion, shape and metadata errors alike
            raise ValueError(f"not a readable LoRA file: {error}") from error
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
                up.to(reference.device, reference.dtype) * scaling(layer_path),
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


def _peft_scaling(metadata: dict[str, object] | None) -> Callable[[str], float]:
    """Each layer's `alpha / r` (PEFT's LoRA scaling) from a file's adapter metadata.

    diffusers' `load_lora_weights` builds a `LoraConfig` from the metadata that
    `save_lora_weights` wrote (keys prefixed `transformer.`), and PEFT picks each layer's rank
    and alpha by `rank_pattern`/`alpha_pattern`; the same rules here give the same pixels.
    Without metadata the scale is 1, as diffusers infers `lora_alpha = r` then (Kohya's alpha
    is already folded into the weights by `lora_state_dict`).
    """
    fields = {
        key.removeprefix(TRANSFORMER_PREFIX): value
        for key, value in (metadata or {}).items()
        if key.startswith(TRANSFORMER_PREFIX)
    }
    if not fields:
        return lambda _layer_path: 1.0
    config = LoraConfig(**fields)

    def scaling(layer_path: str) -> float:
        rank = config.rank_pattern.get(
            get_pattern_key(config.rank_pattern.keys(), layer_path), config.r
        )
        alpha = config.alpha_pattern.get(
            get_pattern_key(config.alpha_pattern.keys(), layer_path), config.lora_alpha
        )
        return float(alpha / math.sqrt(rank) if config.use_rslora else alpha / rank)

    return scaling
