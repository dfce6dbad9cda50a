"""What every route of one server shares."""

from __future__ import annotations

from dataclasses import dataclass

from ..store import Store
from .config import ServeConfig
from .limits import RateLimiter
from .metrics import Metrics
from .models import ModelRegistry


@dataclass
class ServerState:
    cfg: ServeConfig
    models: ModelRegistry
    store: Store
    limiter: RateLimiter
    metrics: Metrics
