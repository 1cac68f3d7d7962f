"""`imagegen-server`: `serve` runs the server; `tiny-model DIR` writes the random-weight model."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

import yaml

from .base.config import add_settings_arguments, load_settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="imagegen-server", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve_parser = commands.add_parser(
        "serve",
        help="serve a Qwen-Image model over gRPC",
        description="Every flag is also an IMAGEGEN_<NAME> environment variable or a key of the "
        "YAML file given by --config; precedence: flags > environment > YAML > defaults.",
    )
    cli_source = add_settings_arguments(serve_parser)
    tiny = commands.add_parser("tiny-model", help="write the deterministic random-weight model")
    tiny.add_argument("directory", type=Path)
    tiny.add_argument(
        "--preset",
        choices=("tiny", "bench", "full"),
        default="tiny",
        help="full: Qwen-Image's real sizes, weights drawn on the serving GPU at load",
    )
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument(
        "--pipeline",
        choices=("text-to-image", "edit", "edit-plus"),
        default="text-to-image",
        help="edit / edit-plus: a Qwen-Image-Edit / Edit-Plus checkpoint (reference images)",
    )
    tiny.add_argument(
        "--weights-at-load",
        action="store_true",
        help="write only configs; the server draws the weights on its device when it loads",
    )
    args = parser.parse_args(argv)

    if args.command == "tiny-model":
        return _tiny_model(
            args.directory, args.preset, args.seed, args.weights_at_load, args.pipeline
        )
    # pydantic's ValidationError is a ValueError; OSError: a config file missing or unreadable.
    try:
        settings = load_settings(cli_source, args)
    except (ValueError, OSError, yaml.YAMLError) as error:
        print(f"imagegen-server: invalid settings:\n{error}", file=sys.stderr)
        return 2
    from .api.access_log import configure_logging  # grpc-free, but the api layer's

    configure_logging(settings.log_level, settings.log_format)
    logging.getLogger(__name__).info("settings: %s", settings.model_dump_json())
    from .api.server import serve  # torch and diffusers load only when serving

    return asyncio.run(serve(settings))


def _tiny_model(
    directory: Path, preset: str, seed: int, weights_at_load: bool, pipeline: str
) -> int:
    import torch

    from .engine.tiny_model import WEIGHTS_AT_LOAD, write_tiny_model

    if preset == "full" and not torch.cuda.is_available():
        print(
            "imagegen-server: --preset full is Qwen-Image's real size (about 57 GB in bfloat16);"
            " it is built on a CUDA device and there is none here. Use --preset tiny or bench.",
            file=sys.stderr,
        )
        return 2
    try:
        write_tiny_model(directory, preset, seed, weights_at_load, pipeline_kind=pipeline)
    except ValueError as error:
        print(f"imagegen-server: {error}", file=sys.stderr)
        return 2
    where = (
        "drawn on the device at load" if weights_at_load or preset in WEIGHTS_AT_LOAD else "saved"
    )
    print(
        f"wrote the {preset} random-weight Qwen-Image {pipeline} pipeline to {directory}"
        f" (weights {where})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
