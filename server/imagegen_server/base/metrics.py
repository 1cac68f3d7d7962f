"""Every Prometheus metric the server exports, declared in one place (names prefixed `imagegen_`).

Groups follow the request's path: `*_request_*` (per RPC), `*_queue_*`/`pending` (admission),
`*_batch_*`/`stage` (engine), `prompt_cache`, `adapter`, `variant`. Values are updated at step
and request boundaries, never per pixel. Each server owns its registry (no global state), so
tests can run several servers in one process.
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
        # `protocol` is grpc or http; an HTTP route counts as the RPC it is served as (a unary
        # generation or edit as Generate, a streamed one as StreamProgress, /v1/models as
        # GetServerInfo) with the gRPC status its HTTP status maps from.
        self.requests = Counter(
            "imagegen_requests",
            "Requests finished, by protocol, method and final gRPC status code",
            ["protocol", "rpc", "code"],
            registry=registry,
        )
        self.request_latency = Histogram(
            "imagegen_request_latency_seconds",
            "End-to-end request time, accepted to last byte",
            ["protocol", "rpc"],
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
        self.adapter_load_time = Histogram(
            "imagegen_adapter_load_seconds",
            "Time to load one adapter while serving (admin or on demand): the wait for the next"
            " step boundary, reading the file and attaching its layers",
            buckets=STAGE_BUCKETS,
            registry=registry,
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
        self.load_seconds = Gauge(
            "imagegen_load_seconds",
            "Seconds loading the model onto its device took at start-up (first start-up phase)",
            registry=registry,
        )
        self.memory_probe_seconds = Gauge(
            "imagegen_memory_probe_seconds",
            "Seconds the start-up memory probe took (0 when off or not on CUDA)",
            registry=registry,
        )
        # By variant: the configured names only (validation refuses any other), so the label's
        # values are bounded by the configuration, never by what clients send.
        self.variant_requests = Counter(
            "imagegen_variant_requests",
            "Generation requests accepted into the queue, by the variant they run as",
            ["variant"],
            registry=registry,
        )
        self.variant_images = Counter(
            "imagegen_variant_images",
            "Images returned to clients, by the variant they ran as",
            ["variant"],
            registry=registry,
        )
        self.variant_rows = Counter(
            "imagegen_variant_rows",
            "Rows stepped as each variant (rate / steps = rows per variant per step)",
            ["variant"],
            registry=registry,
        )
        self.idempotency_entries = Gauge(
            "imagegen_idempotency_entries",
            "Idempotency keys remembered: requests in flight and finished results in the window",
            registry=registry,
        )
        self.idempotency_bytes = Gauge(
            "imagegen_idempotency_bytes",
            "Encoded image bytes kept for repeats of idempotency keys",
            registry=registry,
        )
        self.idempotency_lookups = Counter(
            "imagegen_idempotency_lookups",
            "Requests with an idempotency key, by outcome: new, joined (in flight), replayed"
            " (finished, no engine work), conflict (other parameters), evicted (result gone)",
            ["outcome"],
            registry=registry,
        )
        self.idempotency_evictions = Counter(
            "imagegen_idempotency_evictions",
            "Finished results dropped before a repeat came, by reason: expired (window passed),"
            " entries or bytes (the bounds)",
            ["reason"],
            registry=registry,
        )
        self.cancellations = Counter(
            "imagegen_cancellations",
            "Requests cancelled by CancelGeneration, by where they were (queued, running)",
            ["state"],
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
        self.tenant_cost_refunded = Counter(
            "imagegen_tenant_cost_refunded",
            "Cost (megapixel-steps) given back to the tenant's quota: requests charged and then"
            " refused, shed or cancelled before their first step",
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

    def add_variants(self, names: list[str]) -> None:
        """Exports every configured variant's series from the start, at 0."""
        for name in names:
            for counter in (self.variant_requests, self.variant_images, self.variant_rows):
                counter.labels(variant=name)

    def count_request(self, protocol: str, rpc: str, code: str, seconds: float) -> None:
        """One finished request of the API, gRPC or HTTP: its final status and its latency."""
        self.requests.labels(protocol=protocol, rpc=rpc, code=code).inc()
        self.request_latency.labels(protocol=protocol, rpc=rpc).observe(seconds)

    def serve(self, host: str, port: int) -> int:
        """Starts the /metrics HTTP endpoint in a daemon thread; returns the bound port."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return int(server.server_port)
