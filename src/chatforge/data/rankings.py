"""Preference and prompt files for the reward model, DPO, PPO and the labeling tools (JSON Lines).

    rankings   {"messages": [...prompt turns...], "responses": ["...", ...], "ranking": [2, 0, 1]}
               K >= 2 responses, ranking = every response index exactly once, best first
               (InstructGPT's labelers rank K = 4..9 samples of one prompt).
    pairwise   {"prompt" | "messages": ..., "chosen": "...", "rejected": "..."}: a ranking of K = 2.
               "prompt" may be a string (one user turn) or a list of messages; "chosen"/"rejected"
               may be strings or a list holding one assistant message (TRL's conversational form).
    samples    a rankings line without "ranking": what `chatforge label sample` writes for people
               (or the gold labeler) to rank.
    prompts    {"messages": [...]} or {"prompt": "..."}: what PPO rolls out from.

Prompt turns must end with a user turn (the model answers next). Other keys of a line (an id, or
the "gold" answer key that only the gold labeler reads) are kept in `extra`, never interpreted
here. A bad line is a ValueError naming the file and the line; blank lines are the only lines
skipped.

Token ids: a prompt is rendered by the tokenizer's one chat template with the generation prompt,
and a response is `encode(text) + [end of turn]`, exactly the tokens the engine produces when
it samples that answer, so the reward model scores samples the way PPO will show them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from ..tokenizer import Tokenizer, check_messages


@dataclass
class Prompt:
    messages: list[dict]  # the conversation so far, ending with a user turn
    extra: dict = field(default_factory=dict)  # other keys of the line, kept verbatim
    source: str = ""  # "file:line", for error messages


@dataclass
class Ranking:
    messages: list[dict]  # the prompt turns
    responses: list[str]  # K >= 2 candidate answers
    ranking: list[int]  # response indices, best first; [] for unranked samples
    extra: dict = field(default_factory=dict)
    source: str = ""

    def to_json(self) -> dict:
        out = {"messages": self.messages, "responses": self.responses}
        if self.ranking:
            out["ranking"] = self.ranking
        out.update(self.extra)
        return out


def _lines(path: Path) -> Iterator[tuple[str, dict]]:
    """(where, object) for every non-blank line; bad JSON or a non-object is a ValueError."""
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            yield where, obj


def _prompt_messages(obj: dict, where: str) -> list[dict]:
    if "messages" in obj and "prompt" in obj:
        raise ValueError(f"{where}: has both 'messages' and 'prompt'; keep one")
    if "messages" in obj:
        msgs = obj["messages"]
    elif "prompt" in obj:
        p = obj["prompt"]
        msgs = [{"role": "user", "content": p}] if isinstance(p, str) else p
    else:
        raise ValueError(f"{where}: needs 'messages' (a list of turns) or 'prompt'")
    try:
        check_messages(msgs)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    if msgs[-1]["role"] != "user":
        raise ValueError(f"{where}: the prompt ends with a {msgs[-1]['role']!r} turn; it must end with a user turn")
    return [{"role": m["role"], "content": m["content"]} for m in msgs]


def _response_text(v: object, key: str, where: str) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, list) and len(v) == 1 and isinstance(v[0], dict) and v[0].get("role") == "assistant" and isinstance(v[0].get("content"), str):
        return v[0]["content"]
    raise ValueError(f"{where}: '{key}' must be a string or a list with one assistant message")


def parse_ranking(obj: dict, where: str, require_ranking: bool = True) -> Ranking:
    """One line of the rankings, pairwise or samples form."""
    messages = _prompt_messages(obj, where)
    if "chosen" in obj or "rejected" in obj:
        if "responses" in obj:
            raise ValueError(f"{where}: mixes the pairwise keys (chosen/rejected) with 'responses'; use one form")
        for key in ("chosen", "rejected"):
            if key not in obj:
                raise ValueError(f"{where}: pairwise line without '{key}'")
        responses = [_response_text(obj["chosen"], "chosen", where), _response_text(obj["rejected"], "rejected", where)]
        if responses[0] == responses[1]:
            raise ValueError(f"{where}: 'chosen' and 'rejected' are the same text; a preference needs two different answers")
        extra = {k: v for k, v in obj.items() if k not in ("messages", "prompt", "chosen", "rejected")}
        return Ranking(messages, responses, [0, 1], extra, where)
    if "responses" not in obj:
        raise ValueError(f"{where}: needs 'responses' + 'ranking' (or the pairwise 'chosen' + 'rejected')")
    responses = obj["responses"]
    if not isinstance(responses, list) or len(responses) < 2 or not all(isinstance(r, str) for r in responses):
        raise ValueError(f"{where}: 'responses' must be a list of at least 2 strings")
    ranking = obj.get("ranking")
    if ranking is None:
        if require_ranking:
            raise ValueError(f"{where}: no 'ranking'; rank the samples first (`chatforge label rank`)")
        ranking = []
    else:
        ranking = check_ranking(ranking, len(responses), where)
        first = {}
        for i, r in enumerate(responses):  # (a samples file, not yet ranked, may repeat itself: `label rank` drops repeats)
            if r in first:
                raise ValueError(f"{where}: responses {first[r]} and {i} are the same text; a ranking cannot prefer an answer "
                                 "to itself (keep one copy and rank the rest)")
            first[r] = i
    extra = {k: v for k, v in obj.items() if k not in ("messages", "prompt", "responses", "ranking")}
    return Ranking(messages, list(responses), ranking, extra, where)


def distinct_responses(samples: list[Ranking]) -> tuple[list[Ranking], int, int]:
    """Samples with repeated answers collapsed to one copy each (first occurrence kept, in order),
    and those left with fewer than 2 different answers dropped: a ranking of identical texts would
    train the reward model on a preference that is not there. Returns (kept, repeats removed, prompts dropped)."""
    kept, repeats, dropped = [], 0, 0
    for s in samples:
        uniq = list(dict.fromkeys(s.responses))
        repeats += len(s.responses) - len(uniq)
        if len(uniq) < 2:
            dropped += 1
            continue
        kept.append(s if len(uniq) == len(s.responses) else Ranking(s.messages, uniq, [], s.extra, s.source))
    return kept, repeats, dropped


def check_ranking(ranking: object, k: int, where: str) -> list[int]:
    """A ranking must name every response index 0..k-1 exactly once."""
    if not isinstance(ranking, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ranking):
        raise ValueError(f"{where}: 'ranking' must be a list of response indices, got {ranking!r}")
    bad = [i for i in ranking if not 0 <= i < k]
    if bad:
        raise ValueError(f"{where}: ranking {ranking} has indices {bad} outside 0..{k - 1}")
    dup = sorted({i for i in ranking if ranking.count(i) > 1})
    if dup:
        raise ValueError(f"{where}: ranking {ranking} lists {dup} more than once")
    missing = sorted(set(range(k)) - set(ranking))
    if missing:
        raise ValueError(f"{where}: ranking {ranking} leaves out responses {missing}; rank all {k}")
    return list(ranking)


def read_rankings(paths: Iterable[str | Path], require_ranking: bool = True) -> list[Ranking]:
    """Every ranking in the files, in order (pairwise lines become rankings of two)."""
    out = [parse_ranking(obj, where, require_ranking) for p in paths for where, obj in _lines(Path(p))]
    if not out:
        raise ValueError(f"no rankings in {', '.join(map(str, paths))}")
    return out


def read_prompts(paths: Iterable[str | Path]) -> list[Prompt]:
    out = []
    for p in paths:
        for where, obj in _lines(Path(p)):
            msgs = _prompt_messages(obj, where)
            out.append(Prompt(msgs, {k: v for k, v in obj.items() if k not in ("messages", "prompt")}, where))
    if not out:
        raise ValueError(f"no prompts in {', '.join(map(str, paths))}")
    return out


def write_jsonl(path: str | Path, records: Iterable[dict]) -> Path:
    """Write records one per line, atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


# ---- token ids --------------------------------------------------------------------------------


def prompt_ids(tok: Tokenizer, messages: list[dict]) -> list[int]:
    """The prompt as the model sees it before answering: the chat template with the generation prompt."""
    return tok.render(messages, add_generation_prompt=True)[0]


def response_ids(tok: Tokenizer, text: str) -> list[int]:
    """A finished answer as sampled tokens: its text, then the end-of-turn token."""
    return tok.encode(text) + [tok.eot_id]


def fit(prompt: list[int], response: list[int], max_len: int) -> tuple[list[int], list[int], bool]:
    """Cut a (prompt, response) pair to `max_len` tokens: the prompt's start first (the question
    is at its end), then the response's end. Returns (prompt, response, truncated)."""
    if len(prompt) + len(response) <= max_len:
        return prompt, response, False
    keep_prompt = max(1, min(len(prompt), max_len // 2, max_len - len(response)))
    prompt = prompt[len(prompt) - keep_prompt :]
    return prompt, response[: max_len - len(prompt)], True
