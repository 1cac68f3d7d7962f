"""Server settings: one pydantic-settings object, from CLI flags, `IMAGEGEN_*` variables and YAML.

Precedence: CLI flags > environment > YAML file (`--config` / `IMAGEGEN_CONFIG`) > defaults.
Every setting is validated once, at start-up, with a message that says what to change.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from PIL import Image
from pydantic import Field, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    CliSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from .config_checks import settings_problems
from .variants import PRESET_DEFAULT_STEPS, VariantConfig, default_variant

MAX_INT64 = 2**63 - 1
MAX_MESSAGE_BYTES = 2**31 - 1  # gRPC's message length is a signed 32-bit int
LIGHTNING_DEFAULT_STEPS = PRESET_DEFAULT_STEPS["lightning"]
# The lowest image-to-image strength: a round bound well above where strength x steps rounds to
# no step at all (about 1e-16, types.strength_steps).
MIN_STRENGTH = 1e-6
# QwenImagePipeline's max_sequence_length: the most text tokens it encodes, so the most a prompt
# or negative prompt may have.
MAX_TEXT_TOKENS = 512
BASE_DEFAULT_STEPS = PRESET_DEFAULT_STEPS["default"]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="IMAGEGEN_", extra="forbid")

    # --- model ---
    model: str = Field(description="diffusers-format Qwen-Image directory or hub id")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto = bfloat16 on CUDA, float32 on CPU"
    )
    scheduler_preset: Literal["default", "lightning"] = Field(
        "default",
        description="lightning = Qwen-Image-Lightning's FlowMatch settings (shift ln 3)",
    )
    lora: list[str] = Field(
        default_factory=list,
        description="base LoRA files loaded at start-up with load_lora_weights: PATH or PATH@SCALE",
    )
    fuse_lora: bool = Field(True, description="fuse base LoRAs into the weights (faster steps)")
    adapter_dir: Path | None = Field(
        None, description="directory of per-request adapters (<name>.safetensors, Kohya or PEFT)"
    )
    max_loaded_adapters: int = Field(
        8, ge=1, description="most adapters loaded at once; the least recently used idle one goes"
    )
    preload_adapters: list[str] = Field(
        default_factory=list, description="adapter names loaded at start-up"
    )
    # NoDecode: a flag or variable is YAML text (JSON is YAML too), read by _variants_yaml.
    variants: Annotated[list[VariantConfig], NoDecode] = Field(
        default_factory=list,
        description="named variants a request picks (GenerateRequest.variant), a YAML list: "
        "name, loras (FILE or FILE@SCALE, or {file, scale}; FILE a path or an adapter name), "
        "scheduler_preset, default_steps, default_guidance_scale, min_steps, max_steps, default"
        " (the first entry unless one sets default: true); see README, Variants",
    )
    torch_threads: int = Field(0, ge=0, description="CPU threads for torch; 0 = torch's default")
    compile: Literal["off", "buckets", "dynamic"] = Field(
        "off",
        description="torch.compile the transformer: buckets = pad batches to compile_buckets "
        "and prompts to 128/256/512 tokens (one specialised graph each, all compiled at start-up "
        "for the default size); dynamic = one graph for any batch and prompt length",
    )
    compile_buckets: list[int] = Field(
        default_factory=lambda: [1, 2, 4, 8], description="batch sizes compiled in buckets mode"
    )
    compile_scope: Literal["blocks", "model"] = Field(
        "blocks",
        description="what compile covers: blocks = each transformer block (regional, one graph "
        "shared by all blocks, fast start-up); model = the whole transformer as one graph",
    )
    attention_backend: str | None = Field(
        None,
        description="diffusers attention backend taking masks (e.g. _native_cudnn); unset = SDPA",
    )
    memory_probe: bool = Field(
        True, description="CUDA: measure per-row memory at start-up and cap batches to fit"
    )
    memory_probe_sizes: list[str] = Field(
        default_factory=list,
        description="WIDTHxHEIGHT sizes the probe measures; empty = the default and largest size",
    )
    memory_reserve_fraction: float = Field(
        0.1, ge=0, lt=1, description="share of free device memory the batch caps leave unused"
    )
    vae_tiling_min_pixels: int = Field(
        0,
        ge=0,
        description="encode and decode images of at least this many pixels in tiles; 0 = never",
    )
    warmup: bool = Field(True, description="run one batch before reporting SERVING")

    # --- network ---
    host: str = Field("127.0.0.1", description="gRPC bind address (0.0.0.0 in containers)")
    port: int = Field(50051, ge=0, le=65535, description="gRPC port; 0 = any free port")
    http_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="port of the OpenAI-compatible HTTP API (/v1/images/...), on host, with the "
        "gRPC port's TLS and tokens; 0 = any free port; unset = off",
    )
    metrics_host: str | None = Field(None, description="metrics bind address; default = host")
    metrics_port: int = Field(9090, ge=0, le=65535, description="Prometheus port; 0 = any free")
    health_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="extra plaintext port serving only grpc.health.v1 (for kubelet probes when "
        "the main port uses TLS); unset = none",
    )
    max_connection_age_s: float = Field(
        0.0,
        ge=0,
        description="close client connections after this long (a GOAWAY; clients reconnect and "
        "round-robin reaches new replicas); 0 = never",
    )

    # --- security ---
    auth_tokens_file: Path | None = Field(
        None,
        description="bearer tokens: one `role:token` per line (role client or admin, # comments),"
        " or YAML with a policy per token and tenants (docs/security.md); re-read on SIGHUP;"
        " unset = no authentication",
    )
    auth_tokens_poll_s: float = Field(
        10.0,
        ge=0,
        description="check the tokens file for changes this often and reload it (a mounted Secret"
        " updates in place); 0 = only on SIGHUP",
    )
    quota_store: str = Field(
        "memory",
        pattern=r"^(memory|sqlite:.+|rediss?://.+|unix://.+)$",
        description="where tenants' quota state lives: memory (this process), sqlite:PATH"
        " (survives restarts) or redis://HOST:PORT/DB (shared by every replica)",
    )
    quota_store_failure: Literal["open", "closed"] = Field(
        "open",
        description="when the quota store cannot be reached: open = admit without charging (logged"
        " and counted), closed = refuse with UNAVAILABLE",
    )
    auth_exempt_health: bool = Field(True, description="health checks need no token")
    auth_exempt_reflection: bool = Field(True, description="server reflection needs no token")
    tls_cert_file: Path | None = Field(None, description="PEM server certificate (enables TLS)")
    tls_key_file: Path | None = Field(None, description="PEM private key of the certificate")
    tls_client_ca_file: Path | None = Field(
        None, description="PEM CA that client certificates must chain to (enables mutual TLS)"
    )
    rate_limit_rps: float = Field(
        0.0, ge=0, description="generation requests per second per client (token or peer); 0 = off"
    )
    rate_limit_burst: int = Field(10, ge=1, description="requests a client may send at once")
    rate_limit_clients: int = Field(
        10000, ge=1, description="clients whose buckets are kept (least recently seen go first)"
    )

    # --- batching (Triton's meaning where the names match) ---
    batching: Literal["step", "request"] = Field(
        "step", description="step = rows join and leave at step boundaries; request = Triton-style"
    )
    adapter_batching: Literal["shared", "separate"] = Field(
        "shared",
        description="shared = rows with different adapters share transformer calls; separate ="
        " one adapter set per batch, like servers that swap adapters (for comparison)",
    )
    max_batch_size: int = Field(8, ge=1, description="most images in one denoising step")
    max_queue_delay_ms: float = Field(
        5.0, ge=0, description="longest a new batch waits to fill before it starts"
    )
    preferred_batch_sizes: list[int] = Field(
        default_factory=list, description="batch sizes a new batch tries to reach (Triton)"
    )
    max_queue_size: int = Field(64, ge=0, description="most queued requests; 0 = unbounded")
    priority_levels: int = Field(3, ge=1, le=100, description="1 = highest priority")
    default_priority: int = Field(2, ge=1, description="level of requests that give none")
    default_queue_timeout_ms: float = Field(
        0.0, ge=0, description="longest a request may wait queued; 0 = only its own deadline"
    )
    max_active_batches: int = Field(
        2, ge=1, description="step batching: batches of different shapes in flight at once"
    )
    row_selection: Literal["cost", "all"] = Field(
        "cost",
        description="step batching: cost = when nothing waits, a step may leave out requests with"
        " more steps to go if measured step times grow with rows; all = every row, every step",
    )
    prompt_cache_size: int = Field(256, ge=0, description="prompt embeddings kept (LRU); 0 = off")

    # --- safe retries (idempotency keys) ---
    idempotency_window_s: float = Field(
        600.0,
        ge=0,
        description="how long a finished request's images wait for a repeat of its idempotency"
        " key (the repeat gets them without computing again); 0 = only while in flight",
    )
    idempotency_max_entries: int = Field(
        1024,
        ge=1,
        description="most idempotency keys remembered (in flight and finished); the oldest"
        " finished ones are evicted first",
    )
    idempotency_max_bytes: int = Field(
        256 * 1024 * 1024,
        ge=0,
        description="most encoded image bytes kept for repeats; the oldest finished results are"
        " evicted first",
    )

    # --- request limits (reported by GetServerInfo) ---
    max_request_bytes: int = Field(
        32 * 1024 * 1024,
        ge=1024,
        le=MAX_MESSAGE_BYTES,
        description="largest request message (init images too), bytes",
    )
    max_init_image_pixels: int = Field(
        4096 * 4096,
        ge=1,
        # Pillow's decompression-bomb threshold: above it Pillow, not this limit, would refuse.
        le=Image.MAX_IMAGE_PIXELS,
        description="largest init or mask image accepted, width x height",
    )
    default_strength: float = Field(
        0.6, ge=MIN_STRENGTH, le=1, description="image-to-image strength of requests that give none"
    )
    min_width: int = Field(256, ge=1, description="narrowest image, pixels")
    max_width: int = Field(2048, ge=1, description="widest image, pixels")
    min_height: int = Field(256, ge=1, description="shortest image, pixels")
    max_height: int = Field(2048, ge=1, description="tallest image, pixels")
    max_pixels: int = Field(2048 * 2048, ge=1, description="most width x height")
    default_width: int = Field(1024, ge=1, description="width of requests that give none")
    default_height: int = Field(1024, ge=1, description="height of requests that give none")
    max_steps: int = Field(50, ge=1, description="most denoising steps per request")
    default_steps: int | None = Field(
        None,
        ge=1,
        description=f"steps of requests that give none; unset = {LIGHTNING_DEFAULT_STEPS} "
        f"(lightning) or {BASE_DEFAULT_STEPS} (default preset)",
    )
    max_num_images: int = Field(4, ge=1, description="most images per request")
    max_prompt_chars: int = Field(4000, ge=1, description="longest prompt, characters")
    max_prompt_tokens: int = Field(
        512, ge=1, le=MAX_TEXT_TOKENS, description="longest prompt, text-encoder tokens"
    )
    max_negative_prompt_chars: int = Field(4000, ge=1, description="longest negative prompt")
    max_negative_prompt_tokens: int = Field(
        512, ge=1, le=MAX_TEXT_TOKENS, description="longest negative prompt, tokens"
    )
    min_guidance_scale: float = Field(1.0, ge=0, description="lowest true-CFG scale")
    max_guidance_scale: float = Field(20.0, ge=1, description="highest true-CFG scale")
    min_seed: int = Field(0, ge=0, le=MAX_INT64, description="lowest seed")
    max_seed: int = Field(MAX_INT64, ge=0, le=MAX_INT64, description="highest seed (+ images - 1)")
    max_adapters_per_request: int = Field(4, ge=0, description="most adapters on one request")
    min_adapter_scale: float = Field(-4.0, description="lowest per-request adapter scale")
    max_adapter_scale: float = Field(4.0, description="highest per-request adapter scale")
    min_preview_every_n_steps: int = Field(1, ge=1, description="most frequent preview allowed")
    default_output_quality: int = Field(90, ge=1, le=100, description="JPEG/WebP quality")

    # --- operations ---
    drain_timeout_s: float = Field(30.0, ge=0, description="bound on finishing work at SIGTERM")
    row_limit_recovery_s: float = Field(
        60.0,
        gt=0,
        description="after out-of-memory: a key's lowered batch cap doubles every this many"
        " seconds, up to what fits on the device",
    )
    log_format: Literal["text", "json"] = Field(
        "text", description="server log and access log lines: text, or one JSON object per line"
    )
    log_prompts: bool = Field(
        False, description="include prompt text in access log lines (off: prompts stay private)"
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="server log level"
    )
    config: Path | None = Field(None, description="YAML file with any of these settings")

    # --- testing only: make the model fail on purpose ---
    fault_injection_request_marker: str | None = Field(
        None,
        description="TESTING ONLY: requests whose id contains this fail in the"
        " fault_injection_stage call",
    )
    fault_injection_stage: Literal["denoise", "text_encode", "image_encode", "vae_decode"] = Field(
        "denoise", description="TESTING ONLY: the model call fault_injection_request_marker fails"
    )
    fault_injection_oom_rows: int = Field(
        0, ge=0, description="TESTING ONLY: transformer calls above this many rows raise OOM"
    )

    @field_validator("variants", mode="before")
    @classmethod
    def _variants_yaml(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                return yaml.safe_load(value) or []
            except yaml.YAMLError as error:
                raise ValueError(f"not a YAML list: {error}") from error
        return value

    @model_validator(mode="after")
    def _check_consistency(self) -> Settings:
        problems = settings_problems(self)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def resolved_default_steps(self) -> int:
        variant = default_variant(self.variants)
        if variant is not None:
            return variant.resolved_default_steps
        if self.default_steps is not None:
            return self.default_steps
        if self.scheduler_preset == "lightning":
            return LIGHTNING_DEFAULT_STEPS
        return BASE_DEFAULT_STEPS

    @property
    def resolved_metrics_host(self) -> str:
        return self.metrics_host or self.host

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # CLI values arrive as init kwargs (see load_settings), so they outrank the environment.
        return (init_settings, env_settings, YamlConfigSettingsSource(settings_cls))


def add_settings_arguments(parser: argparse.ArgumentParser) -> CliSettingsSource[Settings]:
    """Adds one `--kebab-case` flag per setting to `parser`; returns the source that parses them."""
    return CliSettingsSource(
        Settings, root_parser=parser, cli_kebab_case=True, cli_implicit_flags=True
    )


def load_settings(
    cli_source: CliSettingsSource[Settings] | None = None,
    args: argparse.Namespace | None = None,
    **overrides: Any,
) -> Settings:
    """Builds the settings from CLI args (if given), `IMAGEGEN_*` variables and the YAML file.

    Raises:
        pydantic.ValidationError: a setting is missing or invalid (the message names it).
    """
    values: dict[str, Any] = {}
    if cli_source is not None and args is not None:
        values = cli_source(parsed_args=args)()
    values.update(overrides)
    config_path = values.get("config") or os.environ.get("IMAGEGEN_CONFIG")
    settings_cls: type[Settings] = Settings
    if config_path:
        if not Path(config_path).is_file():
            raise FileNotFoundError(f"config file not found: {config_path}")
        # The YAML source reads its path from model_config, so bind it on a throwaway subclass.
        settings_cls = type(
            "Settings",
            (Settings,),
            {"model_config": {**Settings.model_config, "yaml_file": config_path}},
        )
    return settings_cls(**values)
