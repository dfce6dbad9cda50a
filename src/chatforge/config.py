"""Leaf helpers (nothing in chatforge below them): JSON, cache paths and seeds.

- JSON: configs are not defined here; every stage keeps its own dataclass next to the code it
  configures (GPTConfig in model.py, PretrainConfig in train/pretrain.py, ...). This module only
  turns any of them into JSON and back, strictly: an unknown key or a value of the wrong type is
  a ValueError that names the field, never silently dropped. `save_json` writes atomically.
- `cache_dir`: where downloaded packages, built corpora and imported models are cached.
- `mix_seed`: one stable seed from several integers (run seed, round, prompt, answer...).
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config dataclass (Paths become strings)."""
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if isinstance(v, Path):
            v = str(v)
        elif isinstance(v, (list, tuple)):
            v = [str(x) if isinstance(x, Path) else x for x in v]
        out[f.name] = v
    return out


def _check_type(cls_name: str, name: str, value: Any, hint: Any) -> Any:
    """Coerce JSON values to the annotated type where that is lossless; refuse the rest."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _check_type(cls_name, name, value, a)
            except ValueError:
                pass
        raise ValueError(f"{cls_name}.{name}: {value!r} is not a {hint}")
    if hint is Any:
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{cls_name}.{name}: expected a list, got {value!r}")
        return list(value) if origin is list else tuple(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is Path and isinstance(value, str):
        return Path(value)
    if isinstance(hint, type) and not isinstance(value, hint):
        raise ValueError(f"{cls_name}.{name}: expected {hint.__name__}, got {value!r}")
    if hint is int and isinstance(value, bool):
        raise ValueError(f"{cls_name}.{name}: expected int, got {value!r}")
    return value


def from_dict(cls: type[T], data: dict[str, Any], source: str = "config") -> T:
    """Build `cls` from a dict, refusing unknown keys and wrong types (naming `source`)."""
    if not isinstance(data, dict):
        raise ValueError(f"{source}: expected a JSON object for {cls.__name__}, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{source}: unknown field(s) {unknown} for {cls.__name__}; known: {sorted(names)}")
    kwargs = {}
    for k, v in data.items():
        try:
            kwargs[k] = _check_type(cls.__name__, k, v, hints[k])
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None


def save_json(obj: Any, path: str | Path) -> None:
    """Write JSON atomically (temp file + rename) so a crash never leaves half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def load_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None


def cache_dir() -> Path:
    """Where downloaded packages and built corpora are cached: $CHATFORGE_CACHE or ~/.cache/chatforge."""
    env = os.environ.get("CHATFORGE_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "chatforge"


def mix_seed(*parts: int) -> int:
    """A stable 62-bit seed from integers, e.g. (run seed, prompt, answer): an FNV-1a-style mix of the parts,
    the same on every Python version and machine (Python's hash of ints is the identity, and a
    tuple's hash is an implementation detail), so a resumed or repeated run draws the same samples."""
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (p & 0xFFFFFFFFFFFFFFFF)) * 1099511628211) % (1 << 64)
    return h >> 2
