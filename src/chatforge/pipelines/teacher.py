"""The teacher step of `chatforge data sft-default`: SmolLM2-135M-Instruct answers open-ended
prompts, and data/sft_default.py turns the answers into demonstrations (it holds no model code;
this module runs the model and hands it the answers through its `teacher` callback)."""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import torch

from .. import checkpoint as ckpt_io
from ..convert.registry import resolve
from ..data.sft_default import TEACHER, SFTDefaultConfig, build_sft_default
from ..engine import Completion, Engine, SamplingParams


def sft_default(cfg: SFTDefaultConfig) -> Path:
    """`chatforge data sft-default`: the default set, its open-ended items answered by the teacher."""
    teacher = functools.partial(run_teacher, max_tokens=cfg.teacher_tokens, install=cfg.install) if cfg.teacher_prompts else None
    return build_sft_default(cfg, teacher)


def complete_sentences(text: str) -> str:
    """An answer cut by the token limit, up to its last full sentence; empty if that loses most of it."""
    ends = [m.end() for m in re.finditer(r"[.!?](?=\s|$)", text)]
    return text[: ends[-1]] if ends and ends[-1] >= len(text) // 2 else ""


def run_teacher(prompts: list[str], cache_file: Path, max_tokens: int, install: bool) -> dict[str, str | None]:
    """Answers of SmolLM2-135M-Instruct (greedy, mild repetition penalty), cached by prompt. An
    answer cut by the token limit keeps its complete sentences, or is recorded as None (not used)."""
    done: dict[str, str | None] = {}
    if cache_file.is_file():
        for line in cache_file.read_text(encoding="utf-8").splitlines():
            r = json.loads(line)
            done[r["prompt"]] = r["answer"]
    todo = [p for p in prompts if p not in done]
    if not todo:
        return done
    ck = ckpt_io.load(resolve(TEACHER, install=install), dtype=torch.bfloat16)
    engine = Engine(ck.model, ck.tokenizer, max_batch=16, max_seq_len=512)
    sp = SamplingParams(temperature=0.0, repetition_penalty=1.1, max_new_tokens=max_tokens)
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    ids = [ck.tokenizer.render([{"role": "user", "content": p}], add_generation_prompt=True)[0] for p in todo]
    # All prompts at once: the engine refills a finished request's slot, so the batch stays full;
    # each answer is appended to the cache as it finishes, so an interrupted build resumes.
    with open(cache_file, "a", encoding="utf-8") as f:

        def keep(i: int, c: Completion) -> None:
            t = c.text.strip()
            done[todo[i]] = (complete_sentences(t) if c.finish_reason == "length" else t) or None
            f.write(json.dumps({"prompt": todo[i], "answer": done[todo[i]]}, ensure_ascii=False) + "\n")
            f.flush()

        engine.complete(ids, sp, progress="data sft-default: teacher", on_done=keep)
    return done
