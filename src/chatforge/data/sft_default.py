"""`chatforge data sft-default`: the default bilingual SFT demonstration set, with a held-out split.

No instruction dataset can be downloaded here (see shared/docs/data-sources.md), so the set is
built from registry packages and from a teacher model (whose answers come in through the
`teacher` callback of `build_sft_default`: pipelines/teacher.py runs the model, so this module
holds no model code):

    source           lang   from                                       kind
    chatterbot       en zh  PyPI chatterbot-corpus 1.3.3 (YAML)        human-written dialogues
    wordnet          en     Debian wordnet-base                        definitions, synonyms, word-from-definition
    gcide            en     Debian dict-gcide (Webster 1913)           definitions
    tang-poems       zh     npm chinese-poetry (唐诗三百首 + 全唐诗)     next line, author of a poem
    arithmetic       en zh  generated                                  + - x with exact answers
    units            en zh  generated                                  unit conversion
    dates            en zh  generated (Python's calendar)              weekday, days in month, date + n days
    teacher          en     SmolLM2-135M-Instruct answering templated   open-ended answers, labelled
                            open-ended prompts about WordNet words      "generated_by" in metadata

Every record is {"messages": [...], "metadata": {"source", "task", "lang", "split", ...}}; the
known-answer items also carry "answer" (and "answers", every accepted form), which
eval/tasks.py scores by exact match. Items are split by a hash of their key (the poem, the word,
the operands, the date), so a held-out item's poem/word/problem never appears in training, in
either language. Layout:

    OUT/train/{en,zh}/<source>.jsonl   OUT/heldout/{en,zh}/<source>.jsonl   OUT/manifest.json
"""

from __future__ import annotations

import calendar
import datetime
import gzip
import hashlib
import json
import random
import re
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from opencc import OpenCC

from ..config import cache_dir
from .corpus import fetch_deb, fetch_npm, fetch_package, finish_manifest

CHATTERBOT = "chatterbot-corpus==1.3.3"
TEACHER = "smollm2-135m-instruct"
# The teacher: (prompts, cache file) -> each prompt's answer, or None where the answer is unusable.
# Answers are cached in the file by prompt, so an interrupted build does not ask again.
Teacher = Callable[[list[str], Path], dict[str, "str | None"]]


@dataclass
class SFTDefaultConfig:
    out: str = ""  # output folder; empty = <cache>/sft/default
    heldout_pct: int = 10  # percent of items (by key) held out for validation and evaluation
    teacher_prompts: int = 200  # open-ended English prompts answered by the teacher; 0 skips the teacher
    teacher_tokens: int = 128  # max new tokens per teacher answer (a cut answer keeps its complete sentences)
    install: bool = False  # pip-install the teacher model's package if missing
    force: bool = False  # rebuild even if the set is already built
    seed: int = 0  # template choices and sampling of items

    def __post_init__(self) -> None:
        if not 1 <= self.heldout_pct <= 50:
            raise ValueError(f"heldout_pct={self.heldout_pct} must be between 1 and 50")
        if self.teacher_prompts < 0 or self.teacher_tokens < 8:
            raise ValueError(f"teacher_prompts={self.teacher_prompts} must be >= 0 and teacher_tokens={self.teacher_tokens} >= 8")


@dataclass
class Item:
    key: str  # what decides the split: items with the same key land in the same split
    messages: list[dict]
    meta: dict = field(default_factory=dict)


def qa(question: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def split_of(key: str, heldout_pct: int) -> str:
    """A stable split from the key alone (not from the build order or the seed)."""
    h = int(hashlib.sha1(key.encode("utf-8")).hexdigest()[:8], 16)
    return "heldout" if h % 100 < heldout_pct else "train"


# ---- fetching the PyPI package ---------------------------------------------------------------


def fetch_pypi(requirement: str, root: Path) -> tuple[Path, str]:
    """`pip download --no-deps` a wheel and unzip it (nothing is installed); returns (folder, version)."""
    name = requirement.split("==")[0]

    def download(tmp: Path) -> tuple[Path, str]:
        r = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-d", str(tmp), requirement],
            capture_output=True, text=True,
        )
        wheels = sorted(tmp.glob(f"{name.replace('-', '_')}-*.whl"))
        if r.returncode != 0 or not wheels:
            raise ValueError(f"could not download PyPI package {requirement!r}: {r.stderr.strip()[-300:] or 'no wheel produced'}")
        with zipfile.ZipFile(wheels[-1]) as z:
            z.extractall(tmp / "root")
        return tmp / "root", wheels[-1].name.split("-")[1]

    return fetch_package(root / "pypi" / name, download)


# ---- sources -----------------------------------------------------------------------------------


def src_chatterbot(root: Path, lang: str) -> Iterator[Item]:
    """chatterbot-corpus conversations: lists of utterances, read as alternating user/assistant
    turns (a trailing user turn is dropped: there is nothing to answer it with)."""
    import yaml  # PyYAML: installed with gguf, not a dependency chatforge declares

    folder = {"en": "english", "zh": "chinese"}[lang]
    for f in sorted((root / "chatterbot_corpus" / "data" / folder).glob("*.yml")):
        data = yaml.safe_load(f.read_text(encoding="utf-8")) or {}
        for conv in data.get("conversations") or []:
            turns = [str(t).strip() for t in conv if t is not None and str(t).strip()]
            turns = turns[: len(turns) // 2 * 2]
            if not turns:
                continue
            messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]
            # Keyed by the whole conversation: tech_support alone has ~100 variants per opening line.
            yield Item(f"chatterbot:{lang}:{chr(31).join(turns)}", messages, {"task": f"dialogue/{f.stem}"})


POS = {"n": "noun", "v": "verb", "a": "adjective", "s": "adjective", "r": "adverb"}


def wordnet_common(root: Path, min_count: int = 5) -> list[tuple[str, str, list[str], str]]:
    """(word, part of speech, synonyms, definition) of the most frequent sense of each word whose
    first sense was tagged at least `min_count` times in WordNet's sense-tagged corpus."""
    wn = root / "usr/share/wordnet"
    counts: dict[tuple[str, str], int] = {}
    for line in (wn / "cntlist.rev").read_text(encoding="utf-8").splitlines():
        key, sense, n = line.split()
        lemma, rest = key.split("%")
        if sense == "1" and int(n) >= min_count:
            counts[(lemma, "nvars"[int(rest[0]) - 1])] = int(n)
    first: dict[tuple[str, str], str] = {}
    for pos, fname in (("n", "noun"), ("v", "verb"), ("a", "adj"), ("r", "adv")):
        for line in (wn / f"index.{fname}").read_text(encoding="utf-8").splitlines():
            if line.startswith(" "):
                continue
            f = line.split()
            p_cnt = int(f[3])
            offsets = f[6 + p_cnt :]
            for p in (pos, "s") if pos == "a" else (pos,):
                if (f[0], p) in counts and offsets:
                    first[(f[0], pos)] = offsets[0]
    data: dict[str, dict[str, str]] = {}
    for fname in ("noun", "verb", "adj", "adv"):
        data[fname] = {}
        for line in (wn / f"data.{fname}").read_text(encoding="utf-8").splitlines():
            if not line.startswith(" "):
                data[fname][line[:8]] = line
    out = []
    fname_of = {"n": "noun", "v": "verb", "a": "adj", "r": "adv"}
    for (lemma, pos), offset in sorted(first.items()):
        line = data[fname_of[pos]].get(offset)
        if line is None or "|" not in line:
            continue
        head, gloss = line.split("|", 1)
        f = head.split()
        words = [re.sub(r"\(.*\)$", "", f[4 + 2 * i]).replace("_", " ") for i in range(int(f[3], 16))]
        definition = gloss.split(";")[0].strip().strip('"').strip()
        word = lemma.replace("_", " ")
        if len(definition) < 8 or not re.fullmatch(r"[a-z][a-z' -]*", word):
            continue
        out.append((word, POS[f[2]], [w for w in words if w.lower() != word.lower()], definition))
    return out


def src_wordnet(root: Path, rng: random.Random, n_words: int = 2500) -> Iterator[Item]:
    ask_def = ["What does the word '{w}' mean?", "Define '{w}'.", "What is the meaning of the word '{w}'?", "What is a definition of '{w}'?"]
    ask_syn = ["Give a synonym for '{w}'.", "What is another word for '{w}'?", "Name a word that means the same as '{w}'."]
    ask_rev = ["Which word means: {d}?", "What {p} means \"{d}\"?", "Give the word for this definition: {d}."]
    entries = wordnet_common(root)
    for word, pos, syns, definition in sorted(rng.sample(entries, min(n_words, len(entries)))):
        key = f"wordnet:{word}"
        yield Item(key, qa(rng.choice(ask_def).format(w=word), f"'{word}' ({pos}): {definition}."), {"task": "definition"})
        if syns:
            yield Item(key, qa(rng.choice(ask_syn).format(w=word), syns[0]), {"task": "synonym", "answer": syns[0], "answers": syns})
        if word.lower() not in definition.lower() and " " not in word:
            q = rng.choice(ask_rev).format(d=definition, p=pos if pos != "adjective" else "adjective")
            yield Item(key, qa(q, word), {"task": "word-from-definition", "answer": word, "answers": [word] + syns})


GCIDE_ENTRY = re.compile(r"^([A-Za-z]+) \\[^\\\n]+\\(?: \([^)]*\))?, ([a-z. ]+?)(?:\s*\[|\n|$)")


def gcide_definitions(root: Path, words: set[str]) -> Iterator[tuple[str, str, str]]:
    """(word, part of speech, first definition) for single-word GCIDE entries of `words`, kept
    only when the first sense parses to a clean sentence (no unresolved markup or citations)."""
    with gzip.open(root / "usr/share/dictd/gcide.dict.dz", "rt", encoding="utf-8", errors="replace") as f:
        text = f.read()
    seen: set[str] = set()
    for entry in re.split(r"\n\n(?=[A-Z][^\n]*\\)", text):
        m = GCIDE_ENTRY.match(entry)
        if not m or m.group(1).lower() not in words or m.group(1).lower() in seen:
            continue
        block = entry.split("[1913 Webster]")[0]
        body = block.split("\n", 1)[1] if "\n" in block else ""
        body = re.sub(r"\s+", " ", body).strip()
        body = re.sub(r"^\[[^\]]*\]\s*", "", body)  # etymology
        body = re.sub(r"^(?:1\. )?(?:\([A-Z][a-z]+\.?\) )?", "", body)  # sense number, field label
        body = re.sub(r"\s*--[A-Z][\w. ]*\.?$", "", body)  # citation
        body = re.sub(r'\s*"[^"]*"\.?$', "", body)  # a quoted example after the definition
        body = re.sub(r"\{([^}]*)\}", r"\1", body).replace(" [Obs.]", "").strip()
        if not 15 <= len(body) <= 200 or re.search(r"[\[\]\\?{}|]|\ufffd", body) or not body[0].isupper():
            continue
        seen.add(m.group(1).lower())
        yield m.group(1).lower(), m.group(2).strip(), body.rstrip(".") + "."


def src_gcide(root: Path, words: set[str], rng: random.Random, n: int = 1500) -> Iterator[Item]:
    ask = ["What did '{w}' mean in Webster's 1913 dictionary?", "How does Webster's 1913 dictionary define '{w}'?"]
    found = list(gcide_definitions(root, words))
    for word, pos, definition in sorted(rng.sample(found, min(n, len(found)))):
        yield Item(f"wordnet:{word}", qa(rng.choice(ask).format(w=word), f"{word} ({pos}) {definition}"), {"task": "definition-1913"})


CLAUSE = re.compile(r"[^，。？！；、]+")


def tang_poems(root: Path, extra: int = 1500) -> list[tuple[str, str, list[str]]]:
    """(title, author, clauses) of the 320 poems of 唐诗三百首 and the first `extra` poems of
    全唐诗, in simplified script, notes in parentheses removed."""
    t2s = OpenCC("t2s").convert
    dist = root / "package/dist"
    raw = []
    for sec in json.loads((dist / "mengxue/tangshisanbaishou.json").read_text(encoding="utf-8"))["content"]:
        for p in sec["content"]:
            raw.append((p.get("subchapter") or p["chapter"], p["author"], p["paragraphs"]))
    for p in json.loads((dist / "quantangshi/poet.tang.0.json").read_text(encoding="utf-8"))[:extra]:
        raw.append((p["title"], p["author"], p["paragraphs"]))
    out = []
    for title, author, paras in raw:
        text = t2s(re.sub(r"[(（][^)）]*[)）]", "", "".join(paras)))
        clauses = CLAUSE.findall(text)
        if len(clauses) >= 2:
            out.append((t2s(title).split(" / ")[0].strip(), t2s(author), clauses))
    return out


def src_tang(root: Path, rng: random.Random) -> Iterator[Item]:
    ask_next = ["「{a}」的下一句是什么？", "{a}，下一句是？", "请接下一句：{a}"]
    ask_author = ["《{t}》的作者是谁？", "《{t}》是谁写的？"]
    poems = tang_poems(root)
    title_count: dict[str, int] = {}
    for t, _, _ in poems:
        title_count[t] = title_count.get(t, 0) + 1
    for title, author, clauses in poems:
        key = f"tang:{title}:{author}"
        for a, b in zip(clauses, clauses[1:]):
            if len(a) in (5, 7) and len(b) == len(a):
                yield Item(key, qa(rng.choice(ask_next).format(a=a), b), {"task": "next-line", "answer": b})
        if title_count[title] == 1 and len(title) <= 12:
            yield Item(key, qa(rng.choice(ask_author).format(t=title), author), {"task": "poem-author", "answer": author})


def src_arithmetic(lang: str, rng: random.Random, n: int = 2000) -> Iterator[Item]:
    en = {"+": ["What is {a} + {b}?", "Compute {a} + {b}.", "What is {a} plus {b}?"],
          "-": ["What is {a} - {b}?", "Compute {a} - {b}.", "What is {a} minus {b}?"],
          "*": ["What is {a} * {b}?", "What is {a} times {b}?", "Compute {a} x {b}."]}
    zh = {"+": ["{a}加{b}等于多少？", "计算{a}+{b}。", "{a}+{b}=?"],
          "-": ["{a}减{b}等于多少？", "计算{a}-{b}。", "{a}-{b}=?"],
          "*": ["{a}乘以{b}等于多少？", "计算{a}×{b}。", "{a}乘{b}是多少？"]}
    templates = en if lang == "en" else zh
    seen = set()
    # The problems are drawn with the same generator state for both languages: the same (op, a, b).
    draw = random.Random(1234)
    while len(seen) < n:
        op = draw.choice("++--*")
        if op == "*":
            a, b = draw.randint(1, 12), draw.randint(1, 12)
        else:
            a, b = (draw.randint(0, 20), draw.randint(0, 20)) if draw.random() < 0.5 else (draw.randint(10, 99), draw.randint(10, 99))
            if op == "-" and b > a:
                a, b = b, a
        if (op, a, b) in seen:
            continue
        seen.add((op, a, b))
        ans = str(a + b if op == "+" else a - b if op == "-" else a * b)
        yield Item(f"arith:{op}:{a}:{b}", qa(rng.choice(templates[op]).format(a=a, b=b), ans), {"task": "arithmetic", "answer": ans})


UNITS = [  # (big en, small en, factor, big zh, small zh)
    ("meters", "centimeters", 100, "米", "厘米"), ("kilometers", "meters", 1000, "千米", "米"),
    ("centimeters", "millimeters", 10, "厘米", "毫米"), ("kilograms", "grams", 1000, "千克", "克"),
    ("liters", "milliliters", 1000, "升", "毫升"), ("hours", "minutes", 60, "小时", "分钟"),
    ("minutes", "seconds", 60, "分钟", "秒"), ("days", "hours", 24, "天", "小时"), ("weeks", "days", 7, "周", "天"),
    ("years", "months", 12, "年", "个月"), ("feet", "inches", 12, "英尺", "英寸"), ("yards", "feet", 3, "码", "英尺"),
]


def src_units(lang: str, rng: random.Random, max_n: int = 40) -> Iterator[Item]:
    for big, small, factor, big_zh, small_zh in UNITS:
        for n in range(1, max_n + 1):
            ans = str(n * factor)
            if lang == "en":
                b = big[:-1] if n == 1 and big != "feet" else "foot" if n == 1 else big
                q = rng.choice(["How many {s} are in {n} {b}?", "Convert {n} {b} to {s}.", "{n} {b} is how many {s}?"]).format(s=small, n=n, b=b)
            else:
                q = rng.choice(["{n}{b}等于多少{s}？", "{n}{b}是多少{s}？", "把{n}{b}换算成{s}。"]).format(s=small_zh, n=n, b=big_zh)
            yield Item(f"units:{big}:{n}", qa(q, ans), {"task": "unit-conversion", "answer": ans})


WEEKDAYS_ZH = ["星期一", "星期二", "星期三", "星期四", "星期五", "星期六", "星期日"]


def _date_en(d: datetime.date) -> str:
    return f"{calendar.month_name[d.month]} {d.day}, {d.year}"


def _date_zh(d: datetime.date) -> str:
    return f"{d.year}年{d.month}月{d.day}日"


def src_dates(lang: str, rng: random.Random, n: int = 500) -> Iterator[Item]:
    draw = random.Random(4321)  # the same dates in both languages
    for _ in range(n):
        d = datetime.date(1900, 1, 1) + datetime.timedelta(days=draw.randint(0, 130 * 365))
        k = draw.randint(1, 30)
        later = d + datetime.timedelta(days=k)
        days = calendar.monthrange(d.year, d.month)[1]
        if lang == "en":
            wd = calendar.day_name[d.weekday()]
            items = [
                ("weekday", f"What day of the week was {_date_en(d)}?", wd, [wd]),
                ("days-in-month", f"How many days are in {calendar.month_name[d.month]} {d.year}?", str(days), [str(days)]),
                ("date-add", f"What date is {k} days after {_date_en(d)}?", _date_en(later), [_date_en(later)]),
            ]
        else:
            wd = WEEKDAYS_ZH[d.weekday()]
            items = [
                ("weekday", f"{_date_zh(d)}是星期几？", wd, [wd] + (["星期天"] if d.weekday() == 6 else [])),
                ("days-in-month", f"{d.year}年{d.month}月有多少天？", str(days), [str(days), f"{days}天"]),
                ("date-add", f"{_date_zh(d)}之后{k}天是哪一天？", _date_zh(later), [_date_zh(later)]),
            ]
        for task, q, a, answers in items:
            yield Item(f"dates:{task}:{d.isoformat()}:{k}", qa(q, a), {"task": task, "answer": a, "answers": answers})


TEACHER_TEMPLATES = [
    "Explain what {a} {w} is in simple words.",
    "Write one sentence that uses the word '{w}'.",
    "Why is {a} {w} useful? Answer briefly.",
    "Describe {a} {w} in two sentences.",
    "Give me one interesting fact about {a} {w}.",
]


def teacher_prompts(root: Path, n: int, rng: random.Random) -> list[tuple[str, str]]:
    """(word, prompt) pairs: open-ended prompts about common concrete-ish English nouns."""
    nouns = [w for w, pos, _, _ in wordnet_common(root, min_count=10) if pos == "noun" and w.isalpha() and w.islower()]
    rng.shuffle(nouns)
    out = []
    for w in nouns[:n]:
        a = "an" if w[0] in "aeiou" else "a"
        out.append((w, rng.choice(TEACHER_TEMPLATES).format(a=a, w=w)))
    return out


# ---- prompts with verifiable answers for RL ----------------------------------------------------


def verifiable_items(split: str, heldout_pct: int = 10, scale: int = 3) -> list[dict]:
    """Prompts with answer keys ({"messages", "gold": {"task", "answers", "lang"}}) for the
    families train/verify.py checks: arithmetic, unit conversion, weekday, days in a month,
    date + n days, English and Chinese, from the generators above with `scale` times as many
    problems as the SFT set draws (the first draws are the SFT set's, the rest are fresh). Split
    by the same hash of the key as the SFT set: no item of the held-out split is ever in "train",
    whatever the scale."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split={split!r}: expected train or heldout")
    out, held = [], set()
    for lang in ("en", "zh"):
        rng = random.Random(f"verifiable:{lang}")  # template choices only; the problems are drawn by the generators' own seeds
        for it in [*src_arithmetic(lang, rng, 2000 * scale), *src_units(lang, rng, 40 * scale), *src_dates(lang, rng, 500 * scale)]:
            m = it.meta
            item = {"messages": it.messages[:-1], "gold": {"task": m["task"], "answers": m.get("answers") or [m["answer"]], "lang": lang}}
            if split_of(it.key, heldout_pct) == "heldout":
                held.add(_problem(item))
            if split_of(it.key, heldout_pct) == split:
                out.append(item)
    if split == "train":
        # The split keys a date question by (date, n days), so the weekday of a date, or the days
        # in its month, can also be asked under a held-out key: such train items are dropped
        # (with a few look-alikes: 2 + 2 and 2 x 2; dropping a train item costs nothing).
        out = [it for it in out if _problem(it) not in held]
    return out


def _problem(item: dict) -> tuple:
    """What decides a generated problem's answer: the task, the answer and the numbers asked about."""
    g = item["gold"]
    return g["lang"], g["task"], g["answers"][0], tuple(re.findall(r"\d+", item["messages"][-1]["content"]))


# ---- building --------------------------------------------------------------------------------


def default_sft_dir() -> Path:
    return cache_dir() / "sft" / "default"


def build_sft_default(cfg: SFTDefaultConfig, teacher: Teacher | None = None) -> Path:
    """Fetch the packages, build every source, split, write JSONL and the manifest. `teacher`
    answers the open-ended prompts (needed when cfg.teacher_prompts > 0)."""
    out = Path(cfg.out) if cfg.out else default_sft_dir()
    manifest_path = out / "manifest.json"
    if manifest_path.is_file() and not cfg.force:
        m = json.loads(manifest_path.read_text(encoding="utf-8"))
        print(f"data sft-default: already built at {out} ({m['total']['conversations']:,} conversations); --force rebuilds", file=sys.stderr)
        return out
    if cfg.teacher_prompts and teacher is None:
        raise ValueError(f"SFTDefaultConfig.teacher_prompts={cfg.teacher_prompts} needs a teacher to answer them "
                         "(`chatforge data sft-default` runs one: pipelines.teacher.sft_default); or set teacher_prompts=0")
    t0 = time.time()
    pkgs = cache_dir() / "packages"
    rng = random.Random(cfg.seed)

    def fetch(kind: str, name: str) -> tuple[Path, str]:
        print(f"data sft-default: fetching {kind} package {name} ...", file=sys.stderr, flush=True)
        return {"deb": fetch_deb, "npm": fetch_npm, "pypi": fetch_pypi}[kind](name, pkgs)

    bot_root, bot_v = fetch("pypi", CHATTERBOT)
    wn_root, wn_v = fetch("deb", "wordnet-base")
    gc_root, gc_v = fetch("deb", "dict-gcide")
    cp_root, cp_v = fetch("npm", "chinese-poetry")
    common = {w for w, _, _, _ in wordnet_common(wn_root)}

    # (source, lang, package@version, items)
    sources: list[tuple[str, str, str, list[Item]]] = [
        ("chatterbot", "en", f"pypi:{CHATTERBOT}", list(src_chatterbot(bot_root, "en"))),
        ("chatterbot", "zh", f"pypi:{CHATTERBOT}", list(src_chatterbot(bot_root, "zh"))),
        ("wordnet", "en", f"deb:wordnet-base {wn_v}", list(src_wordnet(wn_root, rng))),
        ("gcide", "en", f"deb:dict-gcide {gc_v}", list(src_gcide(gc_root, common, rng))),
        ("tang-poems", "zh", f"npm:chinese-poetry {cp_v}", list(src_tang(cp_root, rng))),
        ("arithmetic", "en", "generated", list(src_arithmetic("en", rng))),
        ("arithmetic", "zh", "generated", list(src_arithmetic("zh", rng))),
        ("units", "en", "generated", list(src_units("en", rng))),
        ("units", "zh", "generated", list(src_units("zh", rng))),
        ("dates", "en", "generated", list(src_dates("en", rng))),
        ("dates", "zh", "generated", list(src_dates("zh", rng))),
    ]
    if cfg.teacher_prompts:
        pairs = teacher_prompts(wn_root, cfg.teacher_prompts, rng)
        answers = teacher([p for _, p in pairs], out.parent / f"{out.name}-teacher-cache.jsonl")
        items = [Item(f"wordnet:{w}", qa(p, answers[p]), {"task": "open-ended", "generated_by": "SmolLM2-135M-Instruct (teacher)"})
                 for w, p in pairs if answers.get(p)]
        print(f"data sft-default: teacher kept {len(items)}/{len(pairs)} answers (the rest were cut mid-sentence)", file=sys.stderr)
        sources.append(("teacher", "en", f"model:{TEACHER}", items))

    manifest: dict = {"built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "heldout_pct": cfg.heldout_pct, "sources": {}}
    for split in ("train", "heldout"):
        for lang in ("en", "zh"):
            (out / split / lang).mkdir(parents=True, exist_ok=True)
    for name, lang, package, items in sources:
        counts = {"train": 0, "heldout": 0}
        known = {"train": 0, "heldout": 0}
        chars = 0
        seen: set[str] = set()
        files = {s: open(out / s / lang / f"{name}.jsonl.tmp", "w", encoding="utf-8") for s in counts}
        try:
            for it in items:
                text = json.dumps(it.messages, ensure_ascii=False)
                if text in seen:  # the same conversation twice (chatterbot repeats some) is one item
                    continue
                seen.add(text)
                split = split_of(it.key, cfg.heldout_pct)
                meta = {"source": name, "lang": lang, "split": split, **it.meta}
                files[split].write(json.dumps({"messages": it.messages, "metadata": meta}, ensure_ascii=False) + "\n")
                counts[split] += 1
                known[split] += "answer" in it.meta
                chars += sum(len(m["content"]) for m in it.messages)
        finally:
            for f in files.values():
                f.close()
        for s in counts:
            (out / s / lang / f"{name}.jsonl.tmp").replace(out / s / lang / f"{name}.jsonl")
        tasks = sorted({it.meta.get("task", "") for it in items})
        manifest["sources"][f"{lang}/{name}"] = dict(
            language=lang, package=package, tasks=tasks, train=counts["train"], heldout=counts["heldout"],
            known_answer_train=known["train"], known_answer_heldout=known["heldout"], chars=chars,
        )
        print(
            f"data sft-default: {lang}/{name:11s} {counts['train']:6,} train {counts['heldout']:5,} held out "
            f"({known['heldout']:,} known-answer), {chars / 1e3:7.0f}k chars  [{package}]",
            file=sys.stderr,
        )
    t = finish_manifest(manifest, manifest_path, t0, ("train", "heldout", "known_answer_heldout", "chars"),
                        ("train", "heldout", "known_answer_heldout"),
                        conversations=sum(s["train"] + s["heldout"] for s in manifest["sources"].values()))
    print(
        f"data sft-default: {t['conversations']:,} conversations ({t['train']:,} train, {t['heldout']:,} held out, "
        f"{t['known_answer_heldout']:,} held-out known-answer items) in {manifest['seconds']}s -> {out}",
        file=sys.stderr,
    )
    return out
