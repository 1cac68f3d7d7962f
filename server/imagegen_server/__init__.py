"""imagegen-serve: a gRPC server for Qwen-Image text-to-image diffusion with step-level batching."""

__version__ = "0.1.0"
