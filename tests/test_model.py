"""model.py: shapes, causality, generation, cropping, the optimizer groups; devices.py: device/dtype
choice; devices.check_fits: what memory a training needs."""
import json
import subprocess
import sys

import pytest
import torch

from devices import STEP_OVERHEAD, activation_bytes, n_params
from conftest import ENV, ROOT
from devices import DeviceError, autocast_context, memory, pick_device, pick_dtype
from model import GPT, GPTConfig


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
    assert (all(p.dim() >= 2 for p in decay["params"])
            and all(p.dim() < 2 for p in no_decay["params"]))
    n = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n == sum(p.numel() for p in model.parameters())  # each parameter once, tied ones too
    assert opt.defaults.get("fused") is True


def test_device_and_dtype_choice():
    assert pick_device("cpu") == "cpu"
    if not torch.cuda.is_available():
        assert pick_device("auto") in ("cpu", "mps")
        assert pick_dtype("auto", "cpu") == "float32"
        with pytest.raises(DeviceError, match="no CUDA GPU"):
            pick_device("cuda")
    assert pick_dtype("bf16", "cpu") == "bfloat16"
    with pytest.raises(ValueError, match="dtype"):
        pick_dtype("float8", "cpu")
    with autocast_context("cpu", "bfloat16"):
        y = torch.nn.Linear(4, 4)(torch.randn(2, 4))
    assert y.dtype == torch.bfloat16

    total, available = memory("cpu")
    assert 0 < available <= total


# two training steps (AdamW's moments exist from the first on) in a fresh process: its peak RSS
# over what it held before the model was built
STEP = """
import json, resource, sys
import torch
from model import GPT, GPTConfig
shape, batch = json.loads(sys.argv[1]), int(sys.argv[2])
x = torch.randint(shape["vocab_size"], (batch, shape["block_size"]))
with open("/proc/self/status") as f:
    before = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
model = GPT(GPTConfig(**shape))
optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), "cpu")
for _ in range(2):
    _, loss = model(x, x)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""


@pytest.mark.parametrize("shape, batch", [
    # mostly logits
    (dict(n_layer=1, n_head=2, n_embd=64, block_size=128, vocab_size=50304, dropout=0.0), 4),
    # the attention matrix
    (dict(n_layer=2, n_head=8, n_embd=32, block_size=512, vocab_size=65, dropout=0.1), 2),
])
def test_the_cpu_memory_estimate_covers_a_real_training_step(shape, batch):
    """devices.check_fits refuses a CPU run whose training state and activations exceed the
    memory available; an estimate below what a real step takes would let a too-big batch through to
    the OOM killer, one far above it would refuse runs that fit."""
    p = subprocess.run([sys.executable, "-c", STEP, json.dumps(shape), str(batch)], cwd=ROOT,
                       capture_output=True, text=True, env=dict(ENV, PYTHONPATH=ROOT), check=True)
    measured = int(p.stdout)
    estimate = 16 * n_params(shape) + activation_bytes(shape, batch) + STEP_OVERHEAD
    # the upper bound is loose: where malloc keeps freed attention matrices depends on the machine
    # (configurator.py's table), and the estimate must cover the worst seen
    assert measured <= estimate <= 3 * measured, (measured, estimate)
