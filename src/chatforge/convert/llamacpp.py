"""Run a GGUF file through llama.cpp (the `llama_cpp` module of llama-cpp-python), to compare its
logits with chatforge's forward of the same weights. Optional: llama-cpp-python compiles llama.cpp
from source; `.ci/run` shows the portable flags that build it."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def load(path: str | Path, n_ctx: int = 512, n_threads: int = 2):
    """A llama_cpp.Llama on `path` that keeps every position's logits (logits_all)."""
    try:
        import llama_cpp
    except ImportError as e:
        raise ValueError(f"llama.cpp is not importable ({e}); install llama-cpp-python (see .ci/run for a portable build)") from None
    if not Path(path).is_file():
        raise ValueError(f"{path}: no such file")
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=n_threads, n_threads_batch=n_threads, logits_all=True, verbose=False)


def logits(llm, ids: list[int]) -> np.ndarray:
    """(len(ids), vocab) fp32 logits of llama.cpp for the token ids (no BOS added: pass it in ids)."""
    if len(ids) > llm.n_ctx():
        raise ValueError(f"{len(ids)} tokens do not fit llama.cpp's context of {llm.n_ctx()}")
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)
