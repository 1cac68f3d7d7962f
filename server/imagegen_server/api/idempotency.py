"""Idempotency keys: what a valid key is, and the fingerprint that tells a faithful repeat from
a different request under the same key."""

from __future__ import annotations

import hashlib
import re
from dataclasses import fields, is_dataclass
from typing import Any

from PIL.Image import Image as PILImage

from ..base.errors import InvalidArgument
from ..base.types import GenerationParams

KEY_PATTERN = re.compile(r"[\x21-\x7e]{1,255}")  # printable ASCII, no spaces (Stripe's length)
# Parameters that do not change the images: a repeat may differ in them (a unary first call and
# a streaming repeat differ in previews).
UNFINGERPRINTED = frozenset({"request_id", "preview_every_n_steps"})


def check_key(value: str, field_name: str = "idempotency_key") -> str | None:
    """A request's idempotency key, or None when it has none.

    Raises:
        InvalidArgument: not 1-255 printable ASCII characters without spaces.
    """
    if not value:
        return None
    if not KEY_PATTERN.fullmatch(value):
        raise InvalidArgument(field_name, "1-255 printable ASCII characters, no spaces")
    return value


def params_fingerprint(params: GenerationParams) -> str:
    """A digest of everything that makes the images: equal for a faithful repeat."""
    digest = hashlib.sha256()
    for item in fields(params):
        if item.name not in UNFINGERPRINTED:
            digest.update(item.name.encode())
            _feed(digest, getattr(params, item.name))
    return digest.hexdigest()


def _feed(digest: Any, value: object) -> None:
    if isinstance(value, PILImage):
        digest.update(f"{value.mode}{value.size}".encode())
        digest.update(value.tobytes())
    elif is_dataclass(value) and not isinstance(value, type):
        for item in fields(value):
            _feed(digest, getattr(value, item.name))
    elif isinstance(value, (tuple, list)):
        digest.update(b"[")
        for element in value:
            _feed(digest, element)
        digest.update(b"]")
    else:
        digest.update(repr(value).encode())
