"""The server contract that deploy/ relies on, in one place for tests/deploy.

The manifests, dashboard, alert rules and autoscaler rule are checked against these names, and
these names against the server itself where it can be imported without torch (its metrics and
settings). If the server changes one, change it here and the tests point at every deploy file
that still uses the old one.
"""

from __future__ import annotations

GRPC_PORT = 50051  # `serve --port` default; containerPort and Service port named `grpc`
METRICS_PORT = 9090  # `serve --metrics-port` default; port named `metrics`, path /metrics
HTTP_PORT = 8000  # the overlays' `http_port` (off by default in the server); port named `http`

SERVICE_NAME = "imagegen.v1.ImageGeneration"  # gRPC service, also a grpc.health.v1 service name
HEALTH_SERVICES = {"", SERVICE_NAME}  # names the server's health service reports on

APP_UID = 10001  # the image's user; runAsUser in every pod

# Every metric the server exports, by type. Histograms also export _bucket, _sum, _count.
METRICS = {
    "imagegen_requests_total": "counter",
    "imagegen_request_latency_seconds": "histogram",
    "imagegen_request_queue_seconds": "histogram",
    "imagegen_request_compute_seconds": "histogram",
    "imagegen_images_generated_total": "counter",
    "imagegen_batch_size": "histogram",
    "imagegen_pending_requests": "gauge",
    "imagegen_running_rows": "gauge",
    "imagegen_deferred_rows_total": "counter",
    "imagegen_stage_seconds": "histogram",
    "imagegen_prompt_cache_hits_total": "counter",
    "imagegen_prompt_cache_misses_total": "counter",
    "imagegen_loaded_adapters": "gauge",
    "imagegen_adapter_loads_total": "counter",
    "imagegen_adapter_load_seconds": "histogram",
    "imagegen_adapter_evictions_total": "counter",
    "imagegen_adapter_parameters": "gauge",
    "imagegen_adapter_rows_total": "counter",
    "imagegen_load_seconds": "gauge",
    "imagegen_memory_probe_seconds": "gauge",
    "imagegen_variant_requests_total": "counter",
    "imagegen_variant_images_total": "counter",
    "imagegen_variant_rows_total": "counter",
    "imagegen_idempotency_entries": "gauge",
    "imagegen_idempotency_bytes": "gauge",
    "imagegen_idempotency_lookups_total": "counter",
    "imagegen_idempotency_evictions_total": "counter",
    "imagegen_cancellations_total": "counter",
    "imagegen_tenant_cost_admitted_total": "counter",
    "imagegen_tenant_cost_refunded_total": "counter",
    "imagegen_tenant_cost_served_total": "counter",
    "imagegen_tenant_requests_total": "counter",
    "imagegen_tenant_queue_seconds": "histogram",
    "imagegen_quota_store_errors_total": "counter",
    "imagegen_compile_seconds": "gauge",
    "imagegen_warmup_seconds": "gauge",
    "imagegen_max_batch_size": "gauge",
    "imagegen_ready": "gauge",
}

# Series from outside the server that the dashboard and alerts may use: Prometheus' own `up`
# and kube-state-metrics.
STANDARD_METRICS = {
    "up",
    "kube_horizontalpodautoscaler_status_current_replicas",
    "kube_horizontalpodautoscaler_spec_max_replicas",
}

# The metric the HorizontalPodAutoscaler scales on (via prometheus-adapter).
HPA_METRIC = "imagegen_pending_requests"

# Label values the server uses, for the labels that PromQL in deploy/ matches on.
LABEL_VALUES = {
    "protocol": {"grpc", "http"},
    "rpc": {
        "Generate",
        "StreamProgress",
        "GetServerInfo",
        "LoadAdapter",
        "UnloadAdapter",
        "ListAdapters",
    },
    "code": {
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    },
    "stage": {"text_encode", "denoise_step", "vae_decode", "preview", "image_encode"},
}

# `imagegen-server serve` flags as keys of the --config YAML file (flag name in snake_case).
SERVE_SETTINGS = {
    "model",
    "host",
    "port",
    "metrics_host",
    "metrics_port",
    "http_port",
    "device",
    "dtype",
    "scheduler_preset",
    "batching",
    "max_batch_size",
    "max_queue_delay_ms",
    "max_queue_size",
    "drain_timeout_s",
    "adapter_dir",
    "auth_tokens_file",
    "tls_cert_file",
    "tls_key_file",
    "tls_client_ca_file",
    "log_level",
}
SETTING_CHOICES = {
    "device": {"auto", "cpu", "cuda"},
    "dtype": {"auto", "float32", "bfloat16", "float16"},
    "scheduler_preset": {"default", "lightning"},
    "batching": {"step", "request"},
}


def known_series() -> set[str]:
    """Return every series name a PromQL expression in deploy/ may select."""
    names = set(STANDARD_METRICS)
    for name, kind in METRICS.items():
        names.add(name)
        if kind == "histogram":
            names.update(f"{name}_{suffix}" for suffix in ("bucket", "sum", "count"))
    return names
