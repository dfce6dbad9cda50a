"""The simplest correct sampler: recompute the whole sequence for every new token.

Slow on purpose: it is the reference the KV-cache engine is tested against, and what training
stages use to print a few continuations while they run.
"""

from __future__ import annotations

import torch

from .engine.sampling import top_k_probs
from .model import GPT


@torch.inference_mode()
def sample_tokens(
    model: GPT,
    prompt_ids: list[int],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
    stop_ids: tuple[int, ...] = (),
    lockstep: bool = False,
) -> list[int]:
    """New token ids after `prompt_ids` (greedy when temperature == 0), up to the first of
    `stop_ids`. The context keeps its last max_seq_len tokens. `lockstep`: run all
    max_new_tokens forwards even after a stop token, for a model sharded over processes (FSDP),
    whose forwards are collectives that every process must join the same number of times; the
    processes need not agree on when a sample stops."""
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0")
    if not prompt_ids:
        raise ValueError("the prompt is empty; give at least one token")
    device = next(model.parameters()).device
    gen = torch.Generator(device=device)
    gen.manual_seed(0 if seed is None else seed)
    ids = list(prompt_ids)
    out: list[int] = []
    ctx = model.cfg.max_seq_len
    stopped = False
    for _ in range(max_new_tokens):
        x = torch.tensor([ids[-ctx:]], device=device)
        logits = model(x)[0, -1].float()
        if stopped:
            continue
        if temperature == 0:
            nxt = int(logits.argmax())
        else:
            nxt = int(torch.multinomial(top_k_probs(logits, temperature, top_k), 1, generator=gen))
        if nxt in stop_ids:
            if not lockstep:
                break
            stopped = True
            continue
        ids.append(nxt)
        out.append(nxt)
    return out
