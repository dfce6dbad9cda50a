"""Document readers, token shards and the corpus extractors (on small inputs shaped like the packages)."""

from __future__ import annotations

import gzip
import json
import random
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from chatforge.data import corpus
from chatforge.data.prepare import prepare
from chatforge.data.text import iter_documents


def test_readers_txt_jsonl_parquet_folder(tmp_path):
    """Guards a format being skipped or read out of order when folders are expanded."""
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("plain document", encoding="utf-8")
    (tmp_path / "d" / "b.jsonl").write_text('{"text": "one"}\n\n{"text": "二"}\n', encoding="utf-8")
    pq.write_table(pa.table({"text": ["p1", "p2"]}), tmp_path / "d" / "c.parquet")
    (tmp_path / "d" / "ignored.md").write_text("not read")
    assert list(iter_documents([tmp_path / "d"])) == ["plain document", "one", "二", "p1", "p2"]


@pytest.mark.parametrize(
    "content, msg",
    [
        (b'{"text": "ok"}\n{bad json}\n', "line 2: invalid JSON"),
        (b'{"text": "ok"}\n{"body": "x"}\n', "line 2: expected an object with a 'text' field"),
        (b'{"text": 5}\n', "line 1: field 'text' must be a string"),
        (b'{"text": "ok"}\n{"text": "\xff"}\n', "line 2, invalid UTF-8 at byte offset 25"),
    ],
)
def test_jsonl_errors_name_file_and_line(tmp_path, content, msg):
    """Guards bad lines being skipped silently or reported without a location."""
    p = tmp_path / "bad.jsonl"
    p.write_bytes(content)
    with pytest.raises(ValueError, match=msg) as e:
        list(iter_documents([p]))
    assert "bad.jsonl" in str(e.value)


def test_txt_non_utf8_offset(tmp_path):
    p = tmp_path / "x.txt"
    p.write_bytes(b"hello \xc3\x28 world")
    with pytest.raises(ValueError, match="byte offset 6"):
        list(iter_documents([p]))


def test_missing_and_empty_inputs(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        list(iter_documents([tmp_path / "nope.txt"]))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no"):
        list(iter_documents([tmp_path / "empty"]))


def test_parquet_missing_column(tmp_path):
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "t.parquet")
    with pytest.raises(ValueError, match="no 'text' column"):
        list(iter_documents([tmp_path / "t.parquet"]))


def test_prepare_shards_decode_to_documents(tmp_path, tok):
    """Guards shards that lose, reorder or merge documents, or miscount tokens/bytes."""
    docs = [f"doc {i} 文档 {'x' * (i % 7)}" for i in range(50)]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    tok.save(tmp_path / "tok")
    meta = prepare([str(tmp_path / "c.jsonl")], tmp_path / "tok", tmp_path / "out", val_fraction=0.2, seed=3)
    got = []
    for split in ("train", "val"):
        arr = np.fromfile(tmp_path / "out" / f"{split}.bin", dtype=meta["dtype"])
        assert arr.size == meta["splits"][split]["tokens"]
        assert arr[-1] == tok.eos_id
        text = tok.decode(arr.tolist())
        parts = text.split("<|endoftext|>")[:-1]
        assert len(parts) == meta["splits"][split]["documents"]
        assert sum(len(p.encode()) for p in parts) == meta["splits"][split]["bytes"]
        got += parts
    assert sorted(got) == sorted(docs)
    assert meta["splits"]["val"]["documents"] >= 1
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    # Same seed, same shards, whatever the batching.
    meta2 = prepare([str(tmp_path / "c.jsonl")], tmp_path / "tok", tmp_path / "out2", val_fraction=0.2, seed=3, batch_docs=7)
    for split in ("train", "val"):
        assert (tmp_path / "out" / f"{split}.bin").read_bytes() == (tmp_path / "out2" / f"{split}.bin").read_bytes()
    assert meta2["splits"] == meta["splits"]


def test_prepare_refusing_its_input_leaves_no_folder(tmp_path, tok):
    """Guards finding 6: `data prepare` left an empty output folder behind when it refused its
    input (an empty file, a bad line); an existing folder and what is in it are kept."""
    tok.save(tmp_path / "tok")
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": \n')
    with pytest.raises(ValueError, match="no documents found"):
        prepare([str(tmp_path / "empty.jsonl")], tmp_path / "tok", tmp_path / "out" / "shards")
    assert not (tmp_path / "out" / "shards").exists()
    with pytest.raises(ValueError, match=r"bad.jsonl: line 2: invalid JSON"):
        prepare([str(tmp_path / "bad.jsonl")], tmp_path / "tok", tmp_path / "out2")
    assert not (tmp_path / "out2").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError):
        prepare([str(tmp_path / "empty.jsonl")], tmp_path / "tok", tmp_path / "mine")
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]


def test_prepare_bad_fraction(tmp_path, tok):
    with pytest.raises(ValueError, match="val_fraction"):
        prepare([str(tmp_path)], tmp_path, tmp_path / "o", val_fraction=0)


# ---- corpus extractors on inputs shaped like the real package files ------------------------


def test_split_fortunes_strips_ansi():
    text = "\x1b[32m《静夜思》\x1b[m\n床前明月光\n%\nSecond one\nline two\n%\n"
    assert list(corpus.split_fortunes(text)) == ["《静夜思》\n床前明月光", "Second one\nline two"]


def test_wordnet_line_format(tmp_path):
    d = tmp_path / "usr/share/wordnet"
    d.mkdir(parents=True)
    header = "  1 This software and database is being provided\n"
    line = "00001740 03 n 02 entity 0 thing 1 003 ~ 00001930 n 0000 | that which is perceived to have its own distinct existence\n"
    (d / "data.noun").write_text(header + line)
    for pos in ("verb", "adj", "adv"):
        (d / f"data.{pos}").write_text(header)
    assert list(corpus.src_wordnet(tmp_path)) == ["entity, thing (noun): that which is perceived to have its own distinct existence"]


def test_troff_to_text():
    """Guards man-page markup leaking into the corpus (macro bodies, layout escapes) or text being
    lost (headings, option tags, bold words), checked against the text `man` shows."""
    src = "\n".join(
        [
            '.\\" comment',
            ".de Vb",  # a macro definition: its body is not text
            "\\$1 \\$2",
            "..",
            ".if n \\{\\",  # a conditional block: layout only
            ".ds Aq '",
            "\\}",
            ".TH LS 1",
            '.SH "名称 NAME"',
            "ls \\- 列出目录内容",
            ".SH 描述",
            ".PP",
            "列出 \\fB文件\\fP 的信息",
            ".B \\-a",
            "以及\\h'-1n'更多\\c",
            ".TP 8",
            ".BR ls (1)",
            "选项\\(emdash and \\[lq]quotes\\[rq], a \\e backslash, 1003\\.2",
            ".nf",
            "line one",
            "line two",
            ".fi",
        ]
    )
    assert corpus.troff_to_text(src) == (
        "名称 NAME\nls - 列出目录内容\n\n描述\n\n列出 文件 的信息 -a 以及更多\nls(1)\n"
        "选项—dash and “quotes”, a \\ backslash, 1003.2\nline one\nline two"
    )


def test_manpages_skip_aliases_and_stubs(tmp_path):
    """Guards duplicate documents from symlinked man pages and near-empty `.so` redirect pages."""
    d = tmp_path / "usr/share/man/zh_CN/man1"
    d.mkdir(parents=True)
    page = ".SH 名称\nbzip2 \\- 块排序文件压缩器\n.SH 描述\n" + "bzip2 使用 Burrows-Wheeler 块排序文本压缩算法压缩文件。\n" * 10
    with gzip.open(d / "bzip2.1.gz", "wt", encoding="utf-8") as f:
        f.write(page)
    (d / "bunzip2.1.gz").symlink_to("bzip2.1.gz")
    with gzip.open(d / "bzcat.1.gz", "wt", encoding="utf-8") as f:
        f.write(".so man1/bzip2.1\n")
    docs = list(corpus.src_manpages_zh(tmp_path))
    assert len(docs) == 1 and docs[0].startswith("名称\nbzip2 - 块排序文件压缩器")


def test_fortune_files_skip_indexes_and_links(tmp_path):
    """Guards the binary .dat indexes or the .u8 symlinks (same text again) entering the corpus."""
    d = tmp_path / "usr/share/games/fortunes"
    d.mkdir(parents=True)
    (d / "tao").write_text("The Tao that can be told\nis not the eternal Tao.\n%\nKnow the male, keep the female.\n%\n")
    (d / "tao.dat").write_bytes(b"\x00\x00\x00\x02\xff\xfe")
    (d / "tao.u8").symlink_to("tao")
    assert list(corpus.src_fortunes(tmp_path)) == [
        "The Tao that can be told\nis not the eternal Tao.",
        "Know the male, keep the female.",
    ]


def test_python_docs_one_document_per_page(tmp_path):
    d = tmp_path / "usr/share/doc/python3.11/html/_sources/library"
    d.mkdir(parents=True)
    (d / "os.rst.txt").write_text(":mod:`os` --- Miscellaneous operating system interfaces\n")
    (d.parent / "index.rst.txt").write_text("Python documentation\n")
    (d / "notes.txt").write_text("not a page")
    assert list(corpus.src_python_docs(tmp_path)) == [
        "Python documentation\n",
        ":mod:`os` --- Miscellaneous operating system interfaces\n",
    ]


def test_bible_chapters_from_listing():
    """Guards verses of different chapters (or books with digits, like 1 Kings) being merged."""
    listing = "Ge1:1 In the beginning.\nGe1:2 And the earth.\nGe2:1 Thus the heavens.\n1Ki1:1 Now king David.\n1Ki1:2 Wherefore.\n\n"
    assert list(corpus.split_bible_chapters(listing)) == [
        "In the beginning.\nAnd the earth.",
        "Thus the heavens.",
        "Now king David.\nWherefore.",
    ]


def test_bible_skipped_when_program_cannot_run(tmp_path):
    """Guards one unrunnable program (other architecture) aborting the whole corpus build."""
    with pytest.raises(corpus.SourceUnavailable, match="bible"):
        list(corpus.src_bible(tmp_path))


def _r_serialize(obj) -> bytes:
    import rdata

    return rdata.unparser.unparse_data(rdata.conversion.convert_python_to_r_data(obj))


def test_jane_austen_from_r_lazyload_db(tmp_path):
    """Guards the R lazy-load decoding (gzipped index, length-prefixed zlib records) and the
    chapter split, on a database laid out like janeaustenr's data/Rdata.rdb/.rdx."""
    body = ["", "It is a truth universally acknowledged, that a single man in possession", ""] * 10
    novels = {
        "emma": ["EMMA", "", "By Jane Austen", "", "VOLUME I", "", "CHAPTER I", *body, "", "VOLUME II", "", "CHAPTER I", *body],
        "persuasion": ["Persuasion", "", "Chapter 1", *body, "Chapter 2", *body],
    }
    rdb, index = b"", {}
    for name, lines in novels.items():
        raw = _r_serialize(np.array(lines))
        record = len(raw).to_bytes(4, "big") + zlib.compress(raw)
        index[name] = np.array([len(rdb), len(record)], dtype=np.int32)
        rdb += record
    d = tmp_path / "usr/lib/R/site-library/janeaustenr/data"
    d.mkdir(parents=True)
    (d / "Rdata.rdb").write_bytes(rdb)
    rdx = {"variables": index, "references": {}, "compressed": np.array([True])}
    (d / "Rdata.rdx").write_bytes(gzip.compress(_r_serialize(rdx)))
    docs = list(corpus.src_jane_austen(tmp_path))
    text = "\n\n".join(["It is a truth universally acknowledged, that a single man in possession"] * 10)
    assert docs == [
        "EMMA\n\nBy Jane Austen\n\nVOLUME I\n\nCHAPTER I\n\n" + text,
        "VOLUME II\n\nCHAPTER I\n\n" + text,
        "Persuasion\n\nChapter 1\n\n" + text,
        "Chapter 2\n\n" + text,
    ]


def test_chinese_poetry_to_simplified(tmp_path):
    d = tmp_path / "package/dist/quantangshi"
    d.mkdir(parents=True)
    poems = [{"author": "李白", "title": "靜夜思", "paragraphs": ["床前明月光，疑是地上霜。", "舉頭望明月，低頭思故鄉。"]}]
    (d / "poet.tang.0.json").write_text(json.dumps(poems, ensure_ascii=False), encoding="utf-8")
    (d / "authors.tang.json").write_text("[]")
    assert list(corpus.src_chinese_poetry(tmp_path)) == ["静夜思\n李白\n床前明月光，疑是地上霜。\n举头望明月，低头思故乡。"]


def test_chunk_paragraphs_regroups():
    text = "\n\n".join(f"para {i} " + "x" * 50 for i in range(10))
    chunks = list(corpus.chunk_paragraphs(text, target_chars=120))
    assert "\n\n".join(chunks) == text
    assert all(len(c) >= 120 for c in chunks[:-1])


def test_gcide_reads_dictzip_with_bad_bytes(tmp_path):
    """Guards the cp1252 bytes in the real GCIDE file stopping the build."""
    d = tmp_path / "usr/share/dictd"
    d.mkdir(parents=True)
    with gzip.open(d / "gcide.dict.dz", "wb") as f:
        f.write(b"header\n\nA\n   The first letter \x92 of the alphabet.\n\nB\n   The second letter.\n")
    out = "\n\n".join(corpus.src_gcide(tmp_path))
    assert "The first letter \ufffd of the alphabet." in out and "The second letter." in out


def test_missing_tool_is_named(monkeypatch, tmp_path):
    """Guards a machine without apt-get getting a traceback instead of a message naming the tool."""
    monkeypatch.setattr(corpus.shutil, "which", lambda name: None)
    with pytest.raises(ValueError, match="`apt-get` is not installed"):
        corpus.fetch_deb("fortunes", tmp_path)
    with pytest.raises(ValueError, match="`npm` is not installed"):
        corpus.fetch_npm("chinese-poetry", tmp_path)


def test_package_publish_keeps_the_first_copy(tmp_path):
    """Guards two `data` commands fetching the same package at once: the second unpacked copy must
    not replace (delete) the folder the first one published and may be reading."""
    dest = tmp_path / "pkgs" / "p"
    dest.parent.mkdir()
    for i in (1, 2):
        tmp = tmp_path / f"unpacked{i}"
        tmp.mkdir()
        (tmp / "file.txt").write_text(f"copy {i}")
        assert corpus.publish_package(tmp, dest, f"1.{i}") == (dest, "1.1")
    assert (dest / "file.txt").read_text() == "copy 1" and not (tmp_path / "unpacked2").exists()


def _fake_sources(monkeypatch, tmp_path, calls):
    """Two tiny sources and a third that is unavailable, with fetchers that unpack nothing."""
    monkeypatch.setenv("CHATFORGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(corpus, "fetch_deb", lambda package, root: (tmp_path, "1.0-" + package))
    monkeypatch.setattr(corpus, "fetch_npm", lambda package, root: (tmp_path, "2.0.1"))

    def en(root):
        calls.append("en")
        yield from ["First doc.", "  ", "Second doc\nwith two lines."]

    def zh(root):
        calls.append("zh")
        yield "床前明月光"

    def broken(root):
        raise corpus.SourceUnavailable("program cannot run")
        yield  # a generator, like the real extractors

    monkeypatch.setattr(
        corpus,
        "SOURCES",
        [("a", "en", "deb", "pkg-a", en), ("b", "zh", "npm", "pkg-b", zh), ("c", "en", "deb", "pkg-c", broken)],
    )
    monkeypatch.setattr(corpus, "EXTRA_DEBS", {})


def test_build_default_corpus_manifest_and_noop(monkeypatch, tmp_path):
    """Guards the manifest miscounting, a re-run redoing the work, --force not rebuilding, an
    outdated corpus being kept, and an unavailable source aborting the build instead of being skipped."""
    calls: list[str] = []
    _fake_sources(monkeypatch, tmp_path, calls)
    out = corpus.build_default_corpus()
    assert out == tmp_path / "cache/corpus/default"
    assert list(iter_documents([out / "en/a.jsonl"])) == ["First doc.", "Second doc\nwith two lines."]
    assert list(iter_documents([out / "zh/b.jsonl"])) == ["床前明月光"]
    assert not (out / "en/c.jsonl").exists()
    m = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert m["sources"]["a"] == {
        "language": "en", "package": "deb:pkg-a", "version": "1.0-pkg-a", "documents": 2, "chars": 36, "bytes": 36
    }  # fmt: skip
    assert m["sources"]["b"]["chars"] == 5 and m["sources"]["b"]["bytes"] == 15
    assert m["skipped"] == {"c": "program cannot run"}
    assert m["total"] == {"documents": 3, "chars": 41, "bytes": 51}
    assert m["zh"] == {"documents": 1, "chars": 5, "bytes": 15}
    assert calls == ["en", "zh"]
    corpus.build_default_corpus()
    assert calls == ["en", "zh"]  # no-op
    corpus.build_default_corpus(force=True)
    assert calls == ["en", "zh"] * 2
    m["corpus_version"] = corpus.CORPUS_VERSION - 1
    (out / "manifest.json").write_text(json.dumps(m))
    corpus.build_default_corpus()
    assert calls == ["en", "zh"] * 3


def test_build_failure_leaves_corpus_unbuilt(monkeypatch, tmp_path):
    """Guards a crash mid-build leaving an old manifest that makes the next run a no-op on a
    half-rewritten corpus, or a half-written source file."""
    calls: list[str] = []
    _fake_sources(monkeypatch, tmp_path, calls)
    out = corpus.build_default_corpus()

    def crashing(root):
        yield "partial"
        raise RuntimeError("disk full")

    monkeypatch.setattr(corpus, "SOURCES", [("a", "en", "deb", "pkg-a", crashing)])
    with pytest.raises(RuntimeError):
        corpus.build_default_corpus(force=True)
    assert not (out / "manifest.json").exists()
    assert list(iter_documents([out / "en/a.jsonl"])) == ["First doc.", "Second doc\nwith two lines."]
    assert not list(out.rglob("*.tmp"))


def test_parquet_row_groups_and_null(tmp_path):
    """Guards row groups being skipped or reordered, and nulls reaching the tokenizer."""
    pq.write_table(pa.table({"id": list(range(10)), "text": [f"row {i}" for i in range(10)]}), tmp_path / "a.parquet", row_group_size=3)
    assert pq.ParquetFile(tmp_path / "a.parquet").num_row_groups == 4
    assert list(iter_documents([tmp_path / "a.parquet"])) == [f"row {i}" for i in range(10)]
    pq.write_table(pa.table({"text": ["ok", None]}), tmp_path / "b.parquet")
    with pytest.raises(ValueError, match=r"b.parquet: row 2: 'text' must be a string"):
        list(iter_documents([tmp_path / "b.parquet"]))


def test_jsonl_utf8_offset_is_file_offset(tmp_path):
    """Guards the reported byte offset being relative to the line instead of the file."""
    p = tmp_path / "c.jsonl"
    good = '{"text": "中文"}\n'.encode()
    p.write_bytes(good * 3 + b'{"text": "a\xe4b"}\n')
    with pytest.raises(ValueError, match=f"line 4, invalid UTF-8 at byte offset {len(good) * 3 + 11}"):
        list(iter_documents([p]))


def test_unsupported_suffix(tmp_path):
    (tmp_path / "a.csv").write_text("text\nx\n")
    with pytest.raises(ValueError, match=r"a.csv: unsupported file type '.csv'"):
        list(iter_documents([tmp_path / "a.csv"]))


def _write_jsonl(path, docs):
    path.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")


def _val_docs(tok, out, dtype):
    arr = np.fromfile(out / "val.bin", dtype=dtype)
    return set(tok.decode(arr.tolist()).split("<|endoftext|>")[:-1])


def test_split_follows_content_not_position(tmp_path, tok):
    """Guards a split that changes when documents are reordered or files added (held-out text
    leaking into train across runs), or that ignores the seed."""
    docs = [f"document number {i} 第{i}篇" for i in range(200)]
    tok.save(tmp_path / "tok")
    _write_jsonl(tmp_path / "a.jsonl", docs)
    _write_jsonl(tmp_path / "b.jsonl", [docs[0]] + docs[1:][::-1] + ["a new document"])
    m1 = prepare([str(tmp_path / "a.jsonl")], tmp_path / "tok", tmp_path / "o1", val_fraction=0.1, seed=7)
    prepare([str(tmp_path / "b.jsonl")], tmp_path / "tok", tmp_path / "o2", val_fraction=0.1, seed=7)
    prepare([str(tmp_path / "a.jsonl")], tmp_path / "tok", tmp_path / "o3", val_fraction=0.1, seed=8)
    v1, v2, v3 = (_val_docs(tok, tmp_path / o, m1["dtype"]) for o in ("o1", "o2", "o3"))
    assert v1 == v2 - {"a new document"} and docs[0] in v1  # the first document is always held out
    assert v1 != v3
    assert 8 <= m1["splits"]["val"]["documents"] <= 35  # ~10% of 200
    assert m1["splits"]["val"]["documents"] + m1["splits"]["train"]["documents"] == 200


def test_prepare_meta_and_folder_inputs(tmp_path, tok):
    """Guards meta.json drifting from the format the loader reads, and folders of mixed files."""
    d = tmp_path / "data"
    d.mkdir()
    (d / "one.txt").write_text("a text file is one document\n\nwith paragraphs", encoding="utf-8")
    pq.write_table(pa.table({"text": ["parquet row 1", "parquet row 2"]}), d / "two.parquet")
    (d / "empty.txt").write_text("")
    tok.save(tmp_path / "tok")
    meta = prepare([str(d)], str(tmp_path / "tok"), tmp_path / "out", val_fraction=0.01)
    assert set(meta) == {"format", "dtype", "vocab_size", "eos_id", "tokenizer", "splits", "inputs", "seconds"}
    assert meta["format"] == "chatforge-shards/1" and meta["dtype"] == "uint16"
    assert meta["vocab_size"] == tok.vocab_size and meta["eos_id"] == tok.eos_id == 0
    assert meta["tokenizer"] == str((tmp_path / "tok").resolve())
    assert meta["inputs"] == [str((d / n).resolve()) for n in ("empty.txt", "one.txt", "two.parquet")]
    assert meta["splits"]["val"]["documents"] + meta["splits"]["train"]["documents"] == 3  # empty file skipped
    assert json.loads((tmp_path / "out/meta.json").read_text()) == meta
    assert (tmp_path / "out/tokenizer_config.json").is_file()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["meta.json", "tokenizer.json", "tokenizer_config.json", "train.bin", "val.bin"]


def test_shard_dtype():
    """Guards token ids >= 65536 being truncated by a uint16 shard."""
    from chatforge.data.prepare import shard_dtype

    assert shard_dtype(65535) == np.uint16 and shard_dtype(65536) == np.uint32
    assert shard_dtype(151_936) == np.uint32


def test_prepare_crash_keeps_previous_shards(tmp_path, tok, monkeypatch):
    """Guards a crash mid-prepare leaving half-written shards (or deleting good ones)."""
    from chatforge.tokenizer import Tokenizer

    _write_jsonl(tmp_path / "c.jsonl", [f"doc {i}" for i in range(600)])
    tok.save(tmp_path / "tok")
    prepare([str(tmp_path / "c.jsonl")], tmp_path / "tok", tmp_path / "out", val_fraction=0.1)
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    real = Tokenizer.encode_batch
    calls = []

    def flaky(self, texts):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("killed")
        return real(self, texts)

    monkeypatch.setattr(Tokenizer, "encode_batch", flaky)
    with pytest.raises(RuntimeError):
        prepare([str(tmp_path / "c.jsonl")], tmp_path / "tok", tmp_path / "out", val_fraction=0.5, batch_docs=100)
    assert len(calls) == 2  # it died after writing a batch
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before


def test_prepare_empty_corpus_and_tiny_corpus(tmp_path, tok):
    tok.save(tmp_path / "tok")
    (tmp_path / "e.jsonl").write_text('{"text": ""}\n\n')
    with pytest.raises(ValueError, match="no documents found"):
        prepare([str(tmp_path / "e.jsonl")], tmp_path / "tok", tmp_path / "o")
    _write_jsonl(tmp_path / "one.jsonl", ["only one document"])
    with pytest.raises(ValueError, match="went to the validation split"):
        prepare([str(tmp_path / "one.jsonl")], tmp_path / "tok", tmp_path / "o")
    assert not (tmp_path / "o" / "train.bin").exists() and not list((tmp_path / "o").glob("*.tmp"))


def test_tokenizer_sample_spans_all_files(tmp_path):
    """Guards --max-chars taking a prefix of the inputs: on the default corpus that is English only."""
    from chatforge.data.prepare import sample_documents
    from chatforge.data.text import expand_inputs

    _write_jsonl(tmp_path / "a_en.jsonl", [f"english document {i:04d}" for i in range(1000)])  # 21 chars each
    _write_jsonl(tmp_path / "b_zh.jsonl", [f"中文文档{i:04d}" for i in range(1000)])  # 8 chars each
    files = expand_inputs([tmp_path])
    total = 21_000 + 8_000
    got = list(sample_documents(files, max_chars=total // 5))
    en = sum(d.startswith("english") for d in got)
    zh = len(got) - en
    assert 140 <= en <= 260 and 140 <= zh <= 260  # ~20% of each file
    assert sum(map(len, got)) <= total // 5
    assert got == list(sample_documents(files, max_chars=total // 5))  # deterministic
    assert len(list(sample_documents(files, max_chars=0))) == 2000


def test_cli_tokenizer_train_and_prepare(tmp_path, capsys):
    """Guards the CLI wiring: train a tokenizer from a folder, prepare shards from it, and turn
    a user mistake into exit status 2 with a message instead of a traceback."""
    from chatforge.cli import main
    from chatforge.tokenizer import Tokenizer

    rng = random.Random(0)
    words = "the quick brown fox jumps over lazy dog 床前 明月光 疑是 地上霜 举头 望明月 低头 思故乡".split()
    docs = [" ".join(rng.choice(words) + rng.choice("abcdefghij") for _ in range(30)) for _ in range(200)]
    _write_jsonl(tmp_path / "c.jsonl", docs)
    tok_dir = tmp_path / "tok"
    assert main(["tokenizer", "train", "--input", str(tmp_path), "--vocab-size", "400", "--out", str(tok_dir), "--max-chars", "8000"]) == 0
    err = capsys.readouterr().err
    assert "tokenizer: 400 tokens" in err and "bytes/token" in err
    tok = Tokenizer.load(tok_dir)
    assert tok.vocab_size == 400 and tok.decode(tok.encode("床前明月光 fox")) == "床前明月光 fox"
    assert main(["data", "prepare", "--input", str(tmp_path / "c.jsonl"), "--tokenizer", str(tok_dir), "--out", str(tmp_path / "s")]) == 0
    assert "bytes/token" in capsys.readouterr().err
    assert main(["tokenizer", "train", "--input", str(tmp_path), "--vocab-size", "100", "--out", str(tmp_path / "t2")]) == 2
    assert "256 byte symbols" in capsys.readouterr().err
    assert main(["data", "prepare", "--input", str(tmp_path / "missing"), "--tokenizer", str(tok_dir), "--out", str(tmp_path / "s2")]) == 2
    assert "no such file or folder" in capsys.readouterr().err


def test_failed_download_names_package(monkeypatch, tmp_path):
    """Guards a failed `apt-get download` (unknown package, no apt lists) ending in a traceback or
    a message that does not say which package."""
    import subprocess

    monkeypatch.setattr(corpus.shutil, "which", lambda name: "/usr/bin/" + name)
    failed = subprocess.CompletedProcess([], 100, "", "E: Unable to locate package no-such-pkg")
    monkeypatch.setattr(corpus.subprocess, "run", lambda *a, **k: failed)
    with pytest.raises(ValueError, match=r"Debian package 'no-such-pkg': E: Unable to locate package.*apt-get update"):
        corpus.fetch_deb("no-such-pkg", tmp_path)
    with pytest.raises(ValueError, match=r"npm package 'no-such-pkg'"):
        corpus.fetch_npm("no-such-pkg", tmp_path)


def test_status_line_in_a_log_and_on_a_terminal():
    """Guards progress output: in a log file, whole lines at most once per interval (plus the
    last one), never carriage returns; on a terminal, one line rewritten in place."""
    import io

    from chatforge.console import StatusLine

    log = io.StringIO()
    s = StatusLine(every_s=3600, stream=log)
    for i in range(100):
        s.update(f"step {i}")
    s.done("finished")
    assert log.getvalue() == "step 0\nfinished\n"

    class Tty(io.StringIO):
        def isatty(self):
            return True

    tty = Tty()
    s = StatusLine(every_s=3600, stream=tty)
    s.update("a")
    s.update("b")
    s.done()
    assert tty.getvalue() == "\ra\rb\n"
