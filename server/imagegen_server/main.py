"""`imagegen-server`: `serve` runs the server; `tiny-model DIR` writes the random-weight model."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from pydantic import ValidationError

from .config import add_settings_arguments, load_settings


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
    tiny.add_argument("--preset", choices=("tiny", "bench"), default="tiny")
    tiny.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    if args.command == "tiny-model":
        return _tiny_model(args.directory, args.preset, args.seed)
    try:
        settings = load_settings(cli_source, args)
    except (ValidationError, ValueError, FileNotFoundError) as error:
        print(f"imagegen-server: invalid settings:\n{error}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger(__name__).info("settings: %s", settings.model_dump_json())
    from .server import serve  # torch and diffusers load only when serving

    return asyncio.run(serve(settings))


def _tiny_model(directory: Path, preset: str, seed: int) -> int:
    from .tiny_model import write_tiny_model

    write_tiny_model(directory, preset=preset, seed=seed)
    print(f"wrote the {preset} random-weight Qwen-Image pipeline to {directory}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
