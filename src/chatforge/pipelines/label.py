"""`chatforge label`: comparisons for the reward model. Sample K answers per prompt, rank them (a
person at the terminal, or the programmatic gold labeler of eval/gold.py), and judge policies
on held-out prompts by gold score.

    chatforge label prompts --out DIR                                       prompts with answer keys (data/prompts.py)
    chatforge label sample --policy CKPT --prompts FILE --k K --out FILE   K answers per prompt
    chatforge label rank FILE [--oracle NAME]                               rankings, best first
    chatforge label judge CKPT... --prompts FILE                            mean gold score

The gold labeler's rankings are SYNTHETIC PREFERENCES (eval/gold.py says why and how); the answer
key it reads is dropped from every rankings line written here, so the reward model never sees it.
"""

from __future__ import annotations

import random
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .. import checkpoint as ckpt_io
from ..config import load_json, mix_seed, save_json
from ..convert.registry import resolve
from ..data.rankings import Prompt, Ranking, check_ranking, distinct_responses, prompt_ids, read_prompts, read_rankings, write_jsonl
from ..engine import Engine, SamplingParams
from ..eval.gold import GoldLabeler, format_group_table, get_oracle, judge_answers, paired_difference, paired_difference_by_group
from ..train.common import pick_device

# ---- label sample ---------------------------------------------------------------------------


@dataclass
class SampleConfig:
    policy: str = ""  # checkpoint folder or known model name to sample from
    prompts: list[str] = field(default_factory=list)  # prompt JSONL files ({"messages"} or {"prompt"})
    out: str = "samples.jsonl"  # where to write {"messages", "responses", ...} lines
    k: int = 4  # answers per prompt (InstructGPT: 4 to 9)
    max_prompts: int = 0  # use at most this many prompts (0 = all)
    max_new_tokens: int = 64  # answer length limit
    temperature: float = 1.0  # sampling temperature (1 = the policy's own distribution)
    top_p: float = 1.0  # nucleus sampling
    max_batch: int = 32  # sequences decoded together
    seed: int = 0  # sampling seeds derive from it
    device: str = "auto"  # "auto", "cpu", "cuda"

    def __post_init__(self) -> None:
        if not self.policy:
            raise ValueError("SampleConfig.policy is required: a checkpoint folder or known model name")
        if not self.prompts:
            raise ValueError("SampleConfig.prompts is required: one or more prompt JSONL files")
        if self.k < 2:
            raise ValueError(f"SampleConfig.k={self.k}: a ranking needs at least 2 answers")
        if self.max_new_tokens < 1 or self.max_batch < 1:
            raise ValueError("max_new_tokens and max_batch must be >= 1")


def sample_answers(model, tok, prompts: list[Prompt], k: int, max_new_tokens: int, temperature: float, top_p: float, seed: int, max_batch: int,
                   label: str = "") -> list[list[str]]:
    """K sampled answers for every prompt; answer j of prompt i uses the seed (seed, i, j)."""
    engine = Engine(model, tok, max_batch=max_batch, prefix_cache=model.cfg.max_seq_len)  # the weights stay put while it samples
    ids, sps = [], []
    for i, p in enumerate(prompts):
        pid = prompt_ids(tok, p.messages)
        if len(pid) + 1 >= engine.max_len:
            raise ValueError(f"{p.source}: the prompt ({len(pid)} tokens) does not fit the context window of {engine.max_len}")
        for j in range(k):
            ids.append(pid)
            sps.append(SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=mix_seed(seed, i, j)))
    texts = [c.text for c in engine.complete(ids, sps, progress=label)]
    return [texts[i * k : (i + 1) * k] for i in range(len(prompts))]


def load_policy(name_or_path: str, device: str = "auto"):
    """A policy to sample from: a checkpoint folder or known model name, in fp32 on `device`."""
    return ckpt_io.load(resolve(name_or_path), device=pick_device(device), dtype=torch.float32)


def sample(cfg: SampleConfig) -> Path:
    """`chatforge label sample`: K answers per prompt, written in the samples format."""
    prompts = read_prompts(cfg.prompts)
    if cfg.max_prompts:
        prompts = prompts[: cfg.max_prompts]
    ck = load_policy(cfg.policy, cfg.device)
    t0 = time.time()
    print(f"label sample: {len(prompts)} prompts x {cfg.k} answers from {cfg.policy}", file=sys.stderr, flush=True)
    answers = sample_answers(ck.model, ck.tokenizer, prompts, cfg.k, cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.seed, cfg.max_batch, "label sample")
    records = [{"messages": p.messages, "responses": a, **p.extra, "policy": str(cfg.policy)} for p, a in zip(prompts, answers)]
    out = write_jsonl(cfg.out, records)
    n = len(prompts) * cfg.k
    print(f"label sample: wrote {n} answers to {out} in {time.time() - t0:.1f}s ({n / max(1e-9, time.time() - t0):.1f} answers/s)", file=sys.stderr)
    return out


# ---- label rank -----------------------------------------------------------------------------


def _distinct(samples: list[Ranking]) -> list[Ranking]:
    """The samples with repeated answers removed (rankings.distinct_responses), saying how many."""
    kept, repeats, dropped = distinct_responses(samples)
    if repeats:
        print(f"label rank: {repeats} repeated answers left out (a ranking cannot prefer a text to itself); "
              f"{dropped} prompts had fewer than 2 different answers and are not ranked", file=sys.stderr)
    return kept


def rank_with_oracle(samples: list[Ranking], oracle: GoldLabeler, seed: int) -> list[dict]:
    """Rankings lines for every sample, ranked by the gold labeler. The answer key ("gold") is
    left out of the output: the reward model must never see it."""
    samples = _distinct(samples)
    rng = random.Random(seed)
    out = []
    for s in samples:
        ranking = oracle.rank(s.messages, s.responses, s.extra.get("gold"), rng)
        extra = {k: v for k, v in s.extra.items() if k not in ("gold", "decline")}
        out.append(Ranking(s.messages, s.responses, ranking, {**extra, "labeler": oracle.name}).to_json())
    return out


def parse_order(text: str, k: int) -> list[int]:
    """A typed ranking: response numbers best first, separated by spaces or commas ("2 0 1"),
    or K digits run together ("201") when K <= 10."""
    text = text.strip()
    parts = [p for p in re.split(r"[\s,>]+", text) if p]
    if len(parts) == 1 and len(text) == k and text.isdigit() and k <= 10:
        parts = list(text)
    try:
        order = [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"{text!r}: type response numbers, best first, e.g. {' '.join(map(str, range(k)))}") from None
    return check_ranking(order, k, "your ranking")


def rank_interactive(
    samples: list[Ranking], done: dict[int, dict], save: Callable[[dict[int, dict]], None], ask: Callable[[str], str] = input, show: Callable[[str], None] = print
) -> dict[int, dict]:
    """A terminal ranking session: for each unranked sample show the prompt and its K answers,
    read an order (best first). Commands: s = skip, q = save and quit. Saves after every answer,
    so an interrupted session resumes where it stopped."""
    todo = [i for i in range(len(samples)) if i not in done]
    show(f"{len(done)} of {len(samples)} ranked; {len(todo)} to go. Type the answer numbers best first (e.g. 2 0 1), s to skip, q to quit.")
    for n, i in enumerate(todo, start=1):
        s = samples[i]
        show("\n" + "=" * 72 + f"\n[{n}/{len(todo)}] {s.source}")
        for m in s.messages:
            show(f"{m['role']}: {m['content']}")
        for j, r in enumerate(s.responses):
            show(f"--- answer {j} ---\n{r if r.strip() else '(empty)'}")
        while True:
            reply = ask("ranking> ").strip()
            if reply.lower() in ("q", "quit"):
                return done
            if reply.lower() in ("s", "skip"):
                break
            try:
                order = parse_order(reply, len(s.responses))
            except ValueError as e:
                show(f"  {e}")
                continue
            extra = {k: v for k, v in s.extra.items() if k not in ("gold", "decline")}
            done[i] = Ranking(s.messages, s.responses, order, {**extra, "labeler": "human"}).to_json()
            save(done)
            break
    return done


def rank(path: str, out: str | None = None, oracle: str | None = None, disagreement: float | None = None, seed: int = 0) -> Path:
    """`chatforge label rank`: rank a samples file by hand (terminal) or with a gold oracle."""
    samples = read_rankings([path], require_ranking=False)
    out_path = Path(out) if out else Path(path).with_name(Path(path).stem + ".ranked.jsonl")
    if oracle:
        records = rank_with_oracle(samples, get_oracle(oracle, disagreement), seed)
        write_jsonl(out_path, records)
        print(f"label rank: {len(records)} rankings by the {oracle} labeler (synthetic preferences) -> {out_path}", file=sys.stderr)
        return out_path
    samples = _distinct(samples)
    done: dict[int, dict] = {}
    if out_path.is_file():
        # Resume: lines already ranked are matched back to their samples by content.
        key = {(repr(s.messages), tuple(s.responses)): i for i, s in enumerate(samples)}
        for r in read_rankings([out_path]):
            i = key.get((repr(r.messages), tuple(r.responses)))
            if i is not None:
                done[i] = r.to_json()
    order = lambda d: [d[i] for i in sorted(d)]  # noqa: E731 - keep the input's order in the output
    rank_interactive(samples, done, lambda d: write_jsonl(out_path, order(d)))
    print(f"label rank: {len(done)} of {len(samples)} ranked -> {out_path}", file=sys.stderr)
    return out_path


# ---- label judge ----------------------------------------------------------------------------


def judge(policies: list[str], prompts_files: list[str], samples: int = 1, temperature: float = 1.0, max_new_tokens: int = 64,
          max_prompts: int = 0, seed: int = 1234, device: str = "auto", out: str | None = None) -> dict:
    """`chatforge label judge`: answers of each policy to held-out prompts, scored by the gold
    labeler (never by a reward model), with the same prompts and seeds for every policy."""
    prompts = read_prompts(prompts_files)
    if max_prompts:
        prompts = prompts[:max_prompts]
    if not any("gold" in p.extra for p in prompts):
        raise ValueError(f"{prompts_files}: no prompt carries a 'gold' answer key; judge needs the default held-out prompts")
    results = {}
    for pol in policies:
        ck = load_policy(pol, device)
        answers = sample_answers(ck.model, ck.tokenizer, prompts, samples, max_new_tokens, temperature, 1.0, seed, 32, f"judge {pol}")
        r = judge_answers(prompts, answers)
        r["examples"] = [{"prompt": p.messages[-1]["content"], "answer": a[0]} for p, a in list(zip(prompts, answers))[:5]]
        results[pol] = r
        print(f"{pol}: gold {r['gold_score']:.4f} ± {r['stderr']:.4f} (n={r['n']}), "
              + ", ".join(f"{k} {v:.3f}" for k, v in r["parts"].items()) + f", {r['mean_chars']:.0f} chars", flush=True)
        if pol != policies[0]:
            r["vs_first"] = d = paired_difference(r, results[policies[0]])
            print(f"  vs {policies[0]}: {d['mean']:+.4f} ± {d['stderr']:.4f} per prompt (paired), better on {d['better']}, "
                  f"worse on {d['worse']} of {d['n']} prompts", flush=True)
            r["vs_first_by_group"] = table = paired_difference_by_group(r, results[policies[0]])
            print(format_group_table(table, policies[0], pol), flush=True)
    if out:
        save_json(results, out)
    return results


def judged(policy: str, out: str | Path, prompts_files: list[str], **judge_kw) -> dict:
    """`policy`'s gold-labeler result from the judge file `out`, judging it first when the file
    lacks it: not made yet, or made before the run's folder was moved or copied (judge files are
    keyed by the policy's path, so a resumed pipeline in its new place judges again)."""
    p = Path(out)
    results = load_json(p) if p.is_file() else {}
    if policy not in results:
        results = judge([policy], prompts_files, out=str(p), **judge_kw)
    return results[policy]
