"""NF4Linear: same math as the reference, gradients without a kept dequantized weight."""

import numpy as np
import torch
from edgetune.kernels import reference as ref

from edgetune.train.nf4 import NF4Linear, dequantize_nf4_torch


def make(out_f=96, in_f=128, bias=True):
    torch.manual_seed(0)
    return torch.nn.Linear(in_f, out_f, bias=bias)


def test_forward_equals_dequantized_reference():
    lin = make()
    q = NF4Linear(lin)
    w = ref.nf4_dequantize(ref.nf4_quantize(lin.weight.detach().numpy()))
    x = torch.randn(3, 5, 128)
    want = x.numpy() @ w.T + lin.bias.detach().numpy()
    np.testing.assert_allclose(q(x).detach().numpy(), want, rtol=1e-5, atol=1e-5)


def test_torch_device_path_matches_kernel():
    q = NF4Linear(make())
    got = dequantize_nf4_torch(q.weight, q.absmax(), (q.out_features, q.in_features))
    torch.testing.assert_close(got, q.dequantize(), rtol=0, atol=0)


def test_backward_gives_input_grad_only():
    q = NF4Linear(make(bias=False))
    x = torch.randn(4, 128, requires_grad=True)
    q(x).pow(2).sum().backward()
    w = q.dequantize()
    torch.testing.assert_close(x.grad, (2 * (x @ w.T)) @ w, rtol=1e-5, atol=1e-5)
    assert all(not p.requires_grad for p in q.parameters())


def test_no_dequantized_weight_kept_for_backward():
    q = NF4Linear(make(out_f=256, in_f=256, bias=False))
    x = torch.randn(2, 256, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        q(x).sum().backward()
    assert not any(t.numel() >= 256 * 256 for t in saved)


def test_frozen_bytes_at_most_014_of_fp32():
    lin = make(out_f=640, in_f=256, bias=False)
    q = NF4Linear(lin)
    stored = sum(t.numel() * t.element_size() for t in list(q.parameters()) + list(q.buffers()))
    assert stored <= 0.14 * lin.weight.numel() * 4


def test_peft_lora_and_dora_wrap_it():
    from peft import LoraConfig, get_peft_model

    for dora in (False, True):
        model = torch.nn.Sequential()
        model.add_module("proj", NF4Linear(make()))
        peft = get_peft_model(model, LoraConfig(r=4, target_modules=["proj"], use_dora=dora))
        x = torch.randn(2, 128)
        y = peft(x)
        y.sum().backward()
        trainable = [n for n, p in peft.named_parameters() if p.requires_grad]
        assert any("lora_A" in n for n in trainable)
        assert dora == any("magnitude" in n for n in trainable)


def test_quantizing_in_row_blocks_is_bit_identical(monkeypatch):
    """The streaming quantizer (load, merge's round trip) gives kernels.nf4_quantize's codes,
    absmax and offset exactly, for widths that do and do not divide a 64-value block."""
    from edgetune import kernels
    from edgetune.train import nf4

    monkeypatch.setattr(nf4, "QUANT_CHUNK", 640)  # many chunks even for small weights
    rng = np.random.default_rng(3)
    for shape in [(96, 128), (40, 72), (7, 9), (33, 320), (5, 321)]:
        w = rng.standard_normal(shape).astype(np.float32)
        w[0, :3] = 0  # a zero run
        want = kernels.nf4_quantize(w)
        got = nf4.nf4_quantize_blocks(nf4._row_blocks(w), w.shape)
        for field in ("packed", "absmax_q", "absmax_scale"):
            np.testing.assert_array_equal(getattr(got, field), getattr(want, field), err_msg=field)
        assert got.absmax_offset == want.absmax_offset and got.shape == want.shape
