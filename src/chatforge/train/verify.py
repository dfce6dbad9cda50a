"""Verifiable rewards: a program checks the answer to a generated task (data/sft_default.py's
arithmetic, unit conversion, weekday, days in a month, date + n days, in English and Chinese)
instead of a learned reward model scoring it. RL on small models moves accuracy when the reward
is a checked answer (DeepSeekMath's GRPO, Shao et al. 2024; DeepSeek-R1; nanochat's GSM8K RL),
and a checker cannot be over-optimised the way a reward model can.

Each family has a parser that finds the values of its kind in a response (numbers, weekday
names, dates; both languages), and the response's answer is the LAST one it mentions, so
"3 + 5 = 8" and "The answer is 8." both answer 8 while "8? No, 9." answers 9. A response earns:

- correct  (1.0)             its answer equals the answer key (numbers as numbers; a weekday in
                             either language; a date in either language's format or ISO);
- format   (format_weight)   it is correct AND nothing else: the answer alone, up to spacing,
                             punctuation and the unit word (what eval/tasks.py's exact match wants);
- language (language_weight) it is written in the asker's language (by script; a bare number or
                             date is in either language).

Limits: Chinese numerals are read up to the thousands (一百二十三, 两千零五); a unit named in the
answer is not checked against the unit asked for ("800 meters" answers "how many centimeters"
with 800); numbers with a decimal comma are read as thousands separators.
"""

from __future__ import annotations

import calendar
import datetime
import re
import unicodedata
from dataclasses import dataclass

from ..data.sft_default import UNITS
from ..data.text import script_lang

# ---- values in text: (start, end, value) spans --------------------------------------------------

_ZH_DIGIT = {"零": 0, "〇": 0, "一": 1, "二": 2, "两": 2, "三": 3, "四": 4, "五": 5, "六": 6, "七": 7, "八": 8, "九": 9}
_ZH_UNIT = {"十": 10, "百": 100, "千": 1000}
_ZH_NUM = re.compile(r"[零〇一二两三四五六七八九十百千]+")
_ZH_MEASURES = ("天", "个", "米", "厘米", "毫米", "千米", "克", "千克", "升", "毫升", "小时", "分钟", "秒", "周", "年", "英尺", "英寸", "码")
_NUM = re.compile(r"(?<![\d.])-?\d+(?:,\d{3})*(?:\.\d+)?")


def zh_number(text: str) -> int | None:
    """一百二十三 -> 123, 十五 -> 15, 两千零五 -> 2005, 三一 -> None (digit strings are not numbers here)."""
    total, digit, last_unit = 0, None, 10**9
    for ch in text:
        if ch in "零〇" and last_unit < 10**9 and digit is None:  # 两千零五: 零 only holds an empty place
            continue
        if ch in _ZH_DIGIT:
            if digit is not None:
                return None
            digit = _ZH_DIGIT[ch]
        else:
            unit = _ZH_UNIT[ch]
            if unit >= last_unit:
                return None
            total += (1 if digit is None else digit) * unit
            digit, last_unit = None, unit
    return total + (digit or 0)


def numbers(text: str) -> list[tuple[int, int, float]]:
    """Numbers written with digits (full width too) or as Chinese numerals, in order of position."""
    t = unicodedata.normalize("NFKC", text)  # full-width digits -> ASCII; same length for these characters
    out = [(m.start(), m.end(), float(m.group().replace(",", ""))) for m in _NUM.finditer(t)]
    for m in _ZH_NUM.finditer(t):
        v = zh_number(m.group())
        # A lone numeral character is usually part of a word (一个, 一共, 星期一): only a run with
        # 十/百/千 in it, or one that ends the text or a clause, is read as a number.
        ends = m.end() == len(t) or not t[m.end()].isalnum() or t[m.end():].startswith(_ZH_MEASURES)
        named = t[: m.start()].endswith(("星期", "周", "礼拜", "第"))  # 星期一 is a weekday, 第一 an ordinal
        if v is not None and not named and (any(c in _ZH_UNIT for c in m.group()) or ends):
            out.append((m.start(), m.end(), float(v)))
    return sorted(out)


_WEEKDAYS_EN = [d.lower() for d in calendar.day_name]  # monday .. sunday
_WEEKDAY_ZH = re.compile(r"(?:星期|周|礼拜)([一二三四五六日天])")
_WEEKDAY_EN = re.compile(r"\b(" + "|".join(_WEEKDAYS_EN) + r")\b", re.IGNORECASE)


def weekdays(text: str) -> list[tuple[int, int, int]]:
    """Weekday names, English or Chinese (星期一, 周日, 礼拜天), as 0 = Monday .. 6 = Sunday."""
    out = [(m.start(), m.end(), _WEEKDAYS_EN.index(m.group(1).lower())) for m in _WEEKDAY_EN.finditer(text)]
    out += [(m.start(), m.end(), "一二三四五六日天".index(m.group(1)) if m.group(1) != "天" else 6) for m in _WEEKDAY_ZH.finditer(text)]
    return sorted(out)


_MONTHS = {name.lower(): i for i, name in enumerate(calendar.month_name) if name}
_MONTHS.update({name.lower(): i for i, name in enumerate(calendar.month_abbr) if name})
_MONTH = "(" + "|".join(sorted(_MONTHS, key=len, reverse=True)) + r")\.?"
_DATE_MDY = re.compile(r"\b" + _MONTH + r"\s+(\d{1,2})(?:st|nd|rd|th)?,?\s+(\d{4})\b", re.IGNORECASE)
_DATE_DMY = re.compile(r"\b(\d{1,2})(?:st|nd|rd|th)?\s+(?:of\s+)?" + _MONTH + r",?\s+(\d{4})\b", re.IGNORECASE)
_DATE_ZH = re.compile(r"(\d{4})\s*年\s*(\d{1,2})\s*月\s*(\d{1,2})\s*[日号]")
_DATE_ISO = re.compile(r"\b(\d{4})-(\d{1,2})-(\d{1,2})\b")


def dates(text: str) -> list[tuple[int, int, datetime.date]]:
    """Dates as "March 5, 2001", "5 March 2001", "2001年3月5日" or "2001-03-05" (impossible dates are skipped)."""
    t = unicodedata.normalize("NFKC", text)
    found = []
    for rx, order in ((_DATE_MDY, "mdy"), (_DATE_DMY, "dmy"), (_DATE_ZH, "ymd"), (_DATE_ISO, "ymd")):
        for m in rx.finditer(t):
            g = dict(zip(order, m.groups()))
            month = _MONTHS[g["m"].lower()] if not g["m"].isdigit() else int(g["m"])
            try:
                found.append((m.start(), m.end(), datetime.date(int(g["y"]), month, int(g["d"]))))
            except ValueError:
                pass
    return sorted(found)


def _parse_key(kind: str, answer: str):
    """The answer key's value, with the same parser the responses get."""
    spans = {"number": numbers, "weekday": weekdays, "date": dates}[kind](answer)
    if not spans:
        raise ValueError(f"answer key {answer!r} has no {kind} in it")
    return spans[-1][2]


# ---- families ------------------------------------------------------------------------------------

# Task family (metadata "task" of data/sft_default.py) -> the kind of value its answer is.
FAMILIES = {"arithmetic": "number", "unit-conversion": "number", "days-in-month": "number", "weekday": "weekday", "date-add": "date"}
_PARSERS = {"number": numbers, "weekday": weekdays, "date": dates}


def _unit_words() -> list[str]:
    words = {"day", "days", "天", "foot", "个月"}
    for big, small, _, big_zh, small_zh in UNITS:
        words |= {big, small, big.rstrip("s"), small.rstrip("s"), big_zh, small_zh}
    return sorted(words, key=len, reverse=True)


_FILLER = re.compile(r"[\s\W_]+", re.UNICODE)


@dataclass(frozen=True)
class Verdict:
    correct: bool  # the response's (last) answer equals the key
    format: bool  # correct, and the answer is all there is
    language: bool  # written in the asker's language (or in none: a bare number)

    def reward(self, format_weight: float, language_weight: float) -> float:
        return float(self.correct) + format_weight * float(self.format) + language_weight * float(self.language)


def family_of(gold: dict | None) -> str:
    return ((gold or {}).get("task") or "").split("/")[0]


def verify(response: str, gold: dict, asker_lang: str | None = None) -> Verdict:
    """Check one response against an answer key {"task", "answers", "lang"} (data/prompts.gold_of's form).
    A task family without a verifier is a ValueError naming it."""
    family = family_of(gold)
    if family not in FAMILIES:
        raise ValueError(f"task family {family!r} has no verifier; verifiable families: {', '.join(FAMILIES)}")
    answers = gold.get("answers") or ([gold["answer"]] if gold.get("answer") else [])
    if not answers:
        raise ValueError(f"answer key {gold!r} has no answers")
    kind = FAMILIES[family]
    keys = {_parse_key(kind, str(a)) for a in answers}
    text = unicodedata.normalize("NFKC", response).strip()
    spans = _PARSERS[kind](text)
    correct = bool(spans) and spans[-1][2] in keys
    fmt = False
    if correct:
        rest = text[: spans[-1][0]] + " " + text[spans[-1][1] :]
        if kind == "number":
            rest = re.sub("|".join(re.escape(w) for w in _unit_words()), " ", rest, flags=re.IGNORECASE)
        fmt = not _FILLER.sub("", rest)
    asker = asker_lang or gold.get("lang")
    written = script_lang(text)
    return Verdict(correct, fmt, written is None or asker is None or written == asker)


def check_prompt(gold: dict | None, where: str) -> None:
    """A prompt usable with a verifiable reward: it carries an answer key of a verifiable family."""
    if not gold:
        raise ValueError(f"{where}: no 'gold' answer key ({{\"task\", \"answers\", \"lang\"}}); --reward tasks needs prompts from "
                         "`chatforge label prompts --verifiable` (or any line with a verifiable task family and its answers)")
    family = family_of(gold)
    if family not in FAMILIES:
        raise ValueError(f"{where}: task family {family!r} has no verifier (verifiable: {', '.join(FAMILIES)}); drop such lines or use --reward rm")
    if not (gold.get("answers") or gold.get("answer")):
        raise ValueError(f"{where}: the answer key has no answers")
