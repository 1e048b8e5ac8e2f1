"""model.py: shapes, causality, generation, cropping, the optimizer groups, device/dtype choice."""
import pytest
import torch

from model import GPT, GPTConfig, autocast_context, pick_device, pick_dtype


def tiny(**kw):
    torch.manual_seed(0)
    cfg = dict(block_size=16, vocab_size=50, n_layer=2, n_head=2, n_embd=32, dropout=0.0, bias=True)
    cfg.update(kw)
    return GPT(GPTConfig(**cfg)).eval()


def test_shapes_and_loss():
    model = tiny()
    idx = torch.randint(50, (3, 16))
    logits, loss = model(idx, idx)
    assert logits.shape == (3, 16, 50)
    assert 3.0 < loss.item() < 5.0  # about ln(50) = 3.9 at init
    logits, loss = model(idx)
    assert logits.shape == (3, 1, 50) and loss is None  # inference: last position only
    with pytest.raises(ValueError):
        model(torch.randint(50, (1, 17)))


def test_causal_future_tokens_never_change_earlier_logits():
    model = tiny()
    idx = torch.randint(50, (2, 16))
    base, _ = model(idx, idx)
    for t in (0, 5, 15):
        changed = idx.clone()
        changed[:, t] = (changed[:, t] + 1) % 50
        logits, _ = model(changed, changed)
        assert torch.equal(logits[:, :t], base[:, :t])  # everything before t is untouched
        assert not torch.allclose(logits[:, t], base[:, t])  # and position t does see its own token


def test_weight_tying_and_init_scale():
    model = tiny(n_layer=4)
    assert model.lm_head.weight is model.transformer.wte.weight
    std = model.transformer.h[0].attn.c_proj.weight.std().item()
    assert abs(std - 0.02 / (2 * 4) ** 0.5) < 0.003


def test_generate_length_and_long_prompts():
    model = tiny()
    out = model.generate(torch.zeros((2, 3), dtype=torch.long), max_new_tokens=20, top_k=5)
    assert out.shape == (2, 23)
    assert out.max() < 50
    # greedy is deterministic
    a = model.generate(torch.zeros((1, 1), dtype=torch.long), 10, top_k=1)
    b = model.generate(torch.zeros((1, 1), dtype=torch.long), 10, top_k=1)
    assert torch.equal(a, b)


def test_crop_block_size():
    model = tiny()
    model.crop_block_size(8)
    assert model.config.block_size == 8 and model.transformer.wpe.weight.shape == (8, 32)
    assert model(torch.randint(50, (1, 8)))[0].shape == (1, 1, 50)
    with pytest.raises(ValueError):
        model(torch.randint(50, (1, 9)))
    with pytest.raises(ValueError):
        model.crop_block_size(32)


def test_optimizer_decays_only_matrices():
    model = tiny()
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    n = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n == sum(p.numel() for p in model.parameters())  # each parameter once, tied ones too
    assert opt.defaults.get("fused") is True


def test_device_and_dtype_choice():
    assert pick_device("cpu") == "cpu"
    if not torch.cuda.is_available():
        assert pick_device("auto") in ("cpu", "mps")
        assert pick_dtype("auto", "cpu") == "float32"
        with pytest.raises(SystemExit, match="no CUDA GPU"):
            pick_device("cuda")
    assert pick_dtype("bf16", "cpu") == "bfloat16"
    with pytest.raises(SystemExit, match="dtype"):
        pick_dtype("float8", "cpu")
    with autocast_context("cpu", "bfloat16"):
        y = torch.nn.Linear(4, 4)(torch.randn(2, 4))
    assert y.dtype == torch.bfloat16
