"""LoRA: only adapters train, merging is exact, checkpoints round-trip, PEFT agrees."""

from __future__ import annotations

import json

import pytest
import torch

from chatforge import checkpoint as ckpt_io
from chatforge.model import GPT, preset
from chatforge.train.lora import LoRA


def tiny(tok, seed=0):
    m = GPT(preset("cpu-tiny", vocab_size=64 * ((tok.vocab_size + 63) // 64)))
    m.init_weights(seed)
    return m


def randomize(lora: LoRA, seed: int = 1) -> None:
    """B starts at zero (the adapted model equals the base); give it values so tests can see it."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for b in lora.B:
            b.copy_(torch.randn(b.shape, generator=g) * 0.05)


def with_random_adapters(tok) -> tuple[GPT, LoRA]:
    """A tiny model with rank-4 adapters whose B is random, so the adapters change its output."""
    model = tiny(tok)
    lora = LoRA(model, rank=4, alpha=8)
    randomize(lora)
    return model, lora


def ids(tok):
    return torch.tensor([tok.encode("The quick brown fox. 床前明月光")])


def test_zero_init_is_identity(tok):
    """Guards an adapter init that changes the base model before any training (B must start at 0)."""
    model = tiny(tok)
    with torch.no_grad():
        before = model(ids(tok))
        LoRA(model, rank=4, alpha=8)
        after = model(ids(tok))
    torch.testing.assert_close(before, after, rtol=0, atol=0)


def test_only_adapters_change(tok):
    """Guards LoRA leaking into the base: after optimizer steps every base weight is bit-identical,
    every adapter has moved, and the optimizer holds only the adapters."""
    from chatforge.train import common as C

    model = tiny(tok)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    lora = LoRA(model, rank=4, alpha=8, dropout=0.1)
    assert all(not p.requires_grad for p in model.parameters())
    opt = C.make_optimizer(lora, lr=1e-2, weight_decay=0.1)
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == lora.num_params()
    x = ids(tok)
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
    for k, v in model.state_dict().items():
        assert torch.equal(v, base[k]), k
    assert all(b.abs().sum() > 0 for b in lora.B)
    # 2 layers x {qkv, proj, fc, proj}: rank * (in + out) each.
    c = model.cfg
    qkv = (c.n_head + 2 * c.n_kv_head) * c.head_dim
    want = c.n_layer * 4 * ((c.d_model + qkv) + (c.d_model + c.d_model) + (c.d_model + 2 * c.d_ff) + (c.d_ff + c.d_model))
    assert lora.num_params() == want


def test_merge_equals_adapted(tok):
    """Guards a merge that computes another function than the adapters: W + (alpha/r) B A."""
    model, lora = with_random_adapters(tok)
    x = ids(tok)
    with torch.no_grad():
        adapted = model(x)
        base_copy = tiny(tok)
        lora.merge(model)
        merged = model(x)
        assert not torch.allclose(base_copy(x), adapted, atol=1e-3), "the adapters must change the output"
    assert not lora._hooks
    torch.testing.assert_close(merged, adapted, rtol=1e-5, atol=1e-5)


def test_adapter_on_the_output_head(tok):
    """Guards the logits bypassing the lm_head module (and so its LoRA hook): an adapter on an
    untied output head must change the logits, and merging it must keep them."""
    model = GPT(preset("cpu-tiny", vocab_size=64 * ((tok.vocab_size + 63) // 64), tie_embeddings=False))
    model.init_weights(0)
    x = ids(tok)
    with torch.no_grad():
        before = model(x)
        lora = LoRA(model, rank=4, alpha=8, targets=("lm_head",))
        randomize(lora)
        adapted = model(x)
        assert not torch.allclose(before, adapted, atol=1e-3), "the head's adapter must change the logits"
        lora.merge(model)
        torch.testing.assert_close(model(x), adapted, rtol=1e-5, atol=1e-5)


def test_checkpoint_with_adapters_loads_merged(tok, tmp_path):
    """Guards `chatforge chat` on an unmerged LoRA checkpoint silently serving the base model:
    checkpoint.load must fold the adapters in."""
    model, lora = with_random_adapters(tok)
    x = ids(tok)
    with torch.no_grad():
        adapted = model(x)
    ckpt_io.save(tmp_path / "c", model, tok, {"stage": "sft", "lora": {"rank": 4, "alpha": 8.0}}, extra_tensors=lora.tensors())
    loaded = ckpt_io.load(tmp_path / "c")
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), adapted, rtol=1e-5, atol=1e-5)
    # A fresh LoRA loads the saved adapters back (what --resume does).
    m2 = tiny(tok)
    l2 = LoRA(m2, rank=4, alpha=8)
    l2.load(ckpt_io.load_extra(tmp_path / "c"), "test")
    with torch.no_grad():
        torch.testing.assert_close(m2(x), adapted, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="missing or has another shape"):
        LoRA(tiny(tok), rank=2, alpha=8).load(ckpt_io.load_extra(tmp_path / "c"), "test")


def test_matches_peft(tok):
    """Guards our LoRA drifting from the standard one: PEFT's LoRA on the same modules with the
    same A, B and scale gives the same logits."""
    peft = pytest.importorskip("peft")
    model, lora = with_random_adapters(tok)
    ref = tiny(tok)
    pm = peft.get_peft_model(ref, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["qkv", "proj", "fc"], lora_dropout=0.0))
    with torch.no_grad():
        for name, a, b in zip(lora.names, lora.A, lora.B):
            layer = pm.base_model.model.get_submodule(name)
            layer.lora_A["default"].weight.copy_(a)
            layer.lora_B["default"].weight.copy_(b)
        x = ids(tok)
        torch.testing.assert_close(pm(x), model(x), rtol=1e-5, atol=1e-5)


def test_sft_lora_and_merge(tok, tmp_path):
    """Guards the LoRA path of the SFT stage: it learns, saves adapters that load merged, and
    --merge writes a plain checkpoint with the same function."""
    from safetensors.torch import load_file

    from chatforge.train.sft import SFTConfig, main

    base = tmp_path / "base"
    ckpt_io.save(base, tiny(tok), tok, {"stage": "pretrain", "parent": None})
    data = tmp_path / "d.jsonl"
    qa = [("What is 2 + 3?", "5"), ("Hello!", "Hi, how can I help?"), ("床前明月光的下一句是什么？", "疑是地上霜。")]
    data.write_text("".join(json.dumps({"prompt": q, "completion": a}, ensure_ascii=False) + "\n" for q, a in qa * 14), encoding="utf-8")
    kw = dict(base=str(base), data=[str(data)], seq_len=64, micro_batch=4, max_steps=15, lr=1e-2, warmup_steps=2,
              eval_every=15, save_every=15, log_every=1, dtype="fp32", device="cpu", peak_flops=1e11, sample_prompts=[],
              lora_rank=4, lora_alpha=8.0)
    out = main(SFTConfig(out=str(tmp_path / "lora"), **kw))
    meta = json.loads((out / "meta.json").read_text())
    assert meta["lora"]["rank"] == 4 and (out / "extra.safetensors").is_file()
    vals = [r["val_loss"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "val_loss" in r]
    assert vals[-1] < vals[0]
    # The saved base weights are the base's, untouched.
    saved = load_file(str(out / "model.safetensors"))
    assert torch.equal(saved["blocks.0.attn.qkv.weight"], load_file(str(base / "model.safetensors"))["blocks.0.attn.qkv.weight"])
    merged = main(SFTConfig(out=str(tmp_path / "merged"), merge=True, **kw))
    assert json.loads((merged / "meta.json").read_text())["lora"] is None
    assert not (merged / "extra.safetensors").exists() and not (merged / "train_state.pt").exists()
    x = ids(tok)
    with torch.no_grad():
        torch.testing.assert_close(ckpt_io.load(merged).model(x), ckpt_io.load(out).model(x), rtol=1e-5, atol=1e-5)


def test_top_layers_only(tok):
    """Guards the top-blocks option: adapters only in the last N blocks, the lower blocks get no
    activations kept for a backward pass, and a count outside [0, n_layer] is refused."""
    model = tiny(tok)
    n = len(model.blocks)
    lora = LoRA(model, rank=4, alpha=8, top_layers=1)
    assert lora.names and all(name.startswith(f"blocks.{n - 1}.") for name in lora.names)
    assert lora.meta()["top_layers"] == 1 and lora.meta()["layers"] == len(lora.names)
    seen = []
    hook = model.blocks[0].register_forward_hook(lambda m, a, out: seen.append(out.requires_grad))
    top = model.blocks[n - 1].register_forward_hook(lambda m, a, out: seen.append(out.requires_grad))
    model(ids(tok)).sum().backward()
    hook.remove(), top.remove()
    assert seen == [False, True]
    assert all(a.grad is not None for a in lora.A)
    with pytest.raises(ValueError, match="top_layers"):
        LoRA(tiny(tok), rank=4, alpha=8, top_layers=n + 1)
