"""The inference engine: token ids in, a stream of tokens out. Knows nothing of HTTP.

sampling.py  SamplingParams, per-request state, penalties, top-k/top-p, stop strings
cache.py     the slot KV cache, the prompt prefix cache, the decode-attention kernel choice
linears.py   FastLinears: weight copies (oneDNN-packed, bf16/fp16/int8/int4 for decode steps)
engine.py    Engine: continuous batching, prefill/decode steps, detokenization, generate/complete/score
compiled.py  CompiledDecode: the decode step as torch.compile'd graphs, one per slot bucket (opt-in)
loop.py      EngineLoop: the scheduler in a background thread with per-request event queues (serving)
"""

from .engine import Completion, Engine, Event
from .linears import FEW_ROWS, FastLinears
from .loop import EngineLoop, QueueFull, RequestHandle
from .sampling import SamplingParams

__all__ = ["Completion", "Engine", "EngineLoop", "Event", "FEW_ROWS", "FastLinears", "QueueFull", "RequestHandle", "SamplingParams"]
