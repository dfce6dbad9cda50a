"""Document readers, token shards and the corpus extractors (on small inputs shaped like the packages)."""

from __future__ import annotations

import gzip
import json

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
    # Same seed, same split.
    meta2 = prepare([str(tmp_path / "c.jsonl")], tmp_path / "tok", tmp_path / "out2", val_fraction=0.2, seed=3)
    assert (tmp_path / "out" / "val.bin").read_bytes() == (tmp_path / "out2" / "val.bin").read_bytes()
    assert meta2["splits"] == meta["splits"]


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
    src = '.\\" comment\n.TH LS 1\n.SH "名称 NAME"\nls \\- 列出目录内容\n.B \\-a\n\\fB粗体\\fR 文本\n'
    assert corpus.troff_to_text(src) == "名称 NAME\nls - 列出目录内容\n-a\n粗体 文本"


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
