"""Adapter files: which `<name>.safetensors` files an adapter name may refer to, and what their
headers say (format, rank, size) without loading weights.

Names are checked (no path separators, no traversal, no file outside the directory).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open

from .errors import InvalidArgument, NotFound

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
SUFFIX = ".safetensors"


@dataclass(frozen=True, slots=True)
class AdapterFile:
    name: str
    path: Path
    format: str  # "kohya" or "peft"
    rank: int
    parameters: int
    size_bytes: int


class AdapterDirectory:
    """The files an adapter name may refer to."""

    def __init__(self, directory: Path | None) -> None:
        self._directory = directory.resolve() if directory is not None else None

    def resolve(self, name: str) -> Path:
        """The file for `name`.

        Raises:
            InvalidArgument: the name is malformed or points outside the directory.
            NotFound: no such adapter file (or no adapter directory configured).
        """
        if not NAME_PATTERN.fullmatch(name) or name.endswith(SUFFIX):
            raise InvalidArgument(
                "name", f"{name!r} is not an adapter name (1-64 of [A-Za-z0-9._-], no extension)"
            )
        if self._directory is None:
            raise NotFound(f"name: no adapter directory is configured; {name!r} cannot be loaded")
        path = (self._directory / f"{name}{SUFFIX}").resolve()
        if path.parent != self._directory:  # a symlink leading out of the directory
            raise InvalidArgument("name", f"{name!r} resolves outside the adapter directory")
        if not path.is_file():
            raise NotFound(f"name: no adapter {name!r} in the adapter directory")
        return path

    def has_file(self, name: str) -> bool:
        """Whether `name` is a valid adapter name with a file in the directory."""
        try:
            self.resolve(name)
        except (InvalidArgument, NotFound):
            return False
        return True

    def describe(self, name: str) -> AdapterFile:
        """Reads only the file's header: format, rank and size, without loading weights.

        Raises:
            InvalidArgument: the file is not a safetensors LoRA file.
        """
        path = self.resolve(name)
        try:
            with safe_open(str(path), framework="pt") as handle:
                keys = list(handle.keys())
                downs = [
                    key for key in keys if key.endswith((".lora_down.weight", ".lora_A.weight"))
                ]
                rank = handle.get_slice(downs[0]).get_shape()[0] if downs else 0
                parameters = sum(_numel(handle.get_slice(key).get_shape()) for key in keys)
        except Exception as error:
            raise InvalidArgument(
                "name", f"{name!r} is not a readable safetensors file: {error}"
            ) from error
        if not downs:
            raise InvalidArgument("name", f"{name!r} has no lora_down/lora_A weights")
        kohya = any(key.endswith(".lora_down.weight") for key in keys)
        return AdapterFile(
            name, path, "kohya" if kohya else "peft", rank, parameters, path.stat().st_size
        )

    def names(self) -> list[str]:
        if self._directory is None or not self._directory.is_dir():
            return []
        return sorted(
            path.name.removesuffix(SUFFIX)
            for path in self._directory.glob(f"*{SUFFIX}")
            if NAME_PATTERN.fullmatch(path.name.removesuffix(SUFFIX))
        )


def _numel(shape: list[int]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count
