"""Every Prometheus metric the server exports, declared in one place (names prefixed `imagegen_`).

Groups follow the request's path: `*_request_*` (per RPC), `*_queue_*`/`pending` (admission),
`*_batch_*`/`stage` (engine), `prompt_cache`, `adapter`. Values are updated at step and request
boundaries, never per pixel. Each server owns its registry (no global state), so tests can run
several servers in one process.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
STAGE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self.requests = Counter(
            "imagegen_requests",
            "RPCs finished, by method and final gRPC status code",
            ["rpc", "code"],
            registry=registry,
        )
        self.request_latency = Histogram(
            "imagegen_request_latency_seconds",
            "End-to-end RPC time, accepted to last byte",
            ["rpc"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.queue_time = Histogram(
            "imagegen_request_queue_seconds",
            "Time from acceptance to the request's first denoising step",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.compute_time = Histogram(
            "imagegen_request_compute_seconds",
            "Time from the first denoising step to decoded images",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.images = Counter(
            "imagegen_images_generated", "Images returned to clients", registry=registry
        )
        self.batch_size = Histogram(
            "imagegen_batch_size",
            "Rows (images) in each denoising step",
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self.pending = Gauge(
            "imagegen_pending_requests",
            "Requests accepted and waiting for their first step",
            registry=registry,
        )
        self.running_rows = Gauge(
            "imagegen_running_rows", "Rows in running batches", registry=registry
        )
        self.deferred_rows = Counter(
            "imagegen_deferred_rows",
            "Rows of a running batch that sat a step out (cost-aware row selection)",
            registry=registry,
        )
        self.stage = Histogram(
            "imagegen_stage_seconds",
            "Time per stage call: text_encode, denoise_step, vae_decode, preview, image_encode",
            ["stage"],
            buckets=STAGE_BUCKETS,
            registry=registry,
        )
        self.prompt_cache_hits = Counter(
            "imagegen_prompt_cache_hits",
            "Prompts served from the embedding cache",
            registry=registry,
        )
        self.prompt_cache_misses = Counter(
            "imagegen_prompt_cache_misses",
            "Prompts that went through the text encoder",
            registry=registry,
        )
        self.loaded_adapters = Gauge(
            "imagegen_loaded_adapters", "Adapters loaded and selectable", registry=registry
        )
        self.adapter_loads = Counter(
            "imagegen_adapter_loads", "Adapters loaded at run time", registry=registry
        )
        self.adapter_evictions = Counter(
            "imagegen_adapter_evictions",
            "Idle adapters unloaded to make room for another",
            registry=registry,
        )
        self.adapter_parameters = Gauge(
            "imagegen_adapter_parameters",
            "Parameters of the loaded adapters held on the device",
            registry=registry,
        )
        self.adapter_rows = Counter(
            "imagegen_adapter_rows",
            "Rows stepped with each adapter (rate / steps = rows per adapter per step)",
            ["adapter"],
            registry=registry,
        )
        self.compile_seconds = Gauge(
            "imagegen_compile_seconds",
            "Seconds torch.compile took at start-up (0 when off)",
            registry=registry,
        )
        self.warmup_seconds = Gauge(
            "imagegen_warmup_seconds",
            "Seconds the warm-up batch took at start-up (0 when off); not in the request metrics",
            registry=registry,
        )
        self.max_batch_size = Gauge(
            "imagegen_max_batch_size",
            "Largest batch that fits the device at a resolution (start-up memory probe)",
            ["resolution"],
            registry=registry,
        )
        self.ready = Gauge(
            "imagegen_ready", "1 while the server reports SERVING, else 0", registry=registry
        )
        self._add_tenant_metrics(registry)

    def _add_tenant_metrics(self, registry: CollectorRegistry) -> None:
        """Per tenant: the label is a tenant the tokens file names, or `other` (bounded)."""
        self.tenant_cost_admitted = Counter(
            "imagegen_tenant_cost_admitted",
            "Cost (megapixel-steps) of the requests admitted, charged to the tenant's quota",
            ["tenant"],
            registry=registry,
        )
        self.tenant_cost_served = Counter(
            "imagegen_tenant_cost_served",
            "Cost (megapixel-steps) of the requests that finished with their images",
            ["tenant"],
            registry=registry,
        )
        self.tenant_requests = Counter(
            "imagegen_tenant_requests",
            "Generation RPCs finished, by tenant and final gRPC status code",
            ["tenant", "code"],
            registry=registry,
        )
        self.tenant_queue_time = Histogram(
            "imagegen_tenant_queue_seconds",
            "Time from acceptance to the first denoising step, by tenant",
            ["tenant"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.quota_store_errors = Counter(
            "imagegen_quota_store_errors",
            "Quota checks the store (SQLite, Redis) could not answer",
            registry=registry,
        )

    def serve(self, host: str, port: int) -> int:
        """Starts the /metrics HTTP endpoint in a daemon thread; returns the bound port."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return int(server.server_port)
