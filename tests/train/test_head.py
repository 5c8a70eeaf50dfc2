"""The vocabulary-sized tensors: the LM head kept in bf16 computes what an fp32 copy of it
computes, logits are made only where a loss is taken, and the loss is the same number."""

import torch

from edgetune.data.tokenize import IGNORE
from edgetune.train import head
from edgetune.train.head import StoredLinear, logits_only_at


def test_stored_linear_equals_fp32_linear_forward_and_backward(monkeypatch):
    monkeypatch.setattr(head, "CHUNK_VALUES", 7 * 48)  # blocks of 7 rows: 6 blocks, one short
    torch.manual_seed(0)
    w16 = (0.1 * torch.randn(40, 48)).to(torch.bfloat16)
    stored = StoredLinear(torch.nn.Parameter(w16, requires_grad=False), None, torch.float32)
    ref = torch.nn.Linear(48, 40, bias=False)
    with torch.no_grad():
        ref.weight.copy_(w16.float())
    x = torch.randn(3, 5, 48, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y, y_ref = stored(x), ref(x_ref)
    assert y.dtype == torch.float32 and y.shape == (3, 5, 40)
    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
    assert stored.weight.dtype == torch.bfloat16 and stored.weight.grad is None


def test_loss_only_at_labels_equals_full_logits_loss(tiny_model, tiny_tokenizer, tmp_path):
    """token_loss_sum (LM head at labelled positions only) gives the loss of full (B, T, V)
    logits with ignore_index, on the shipped model loaded for QLoRA (fp16 head kept)."""
    from edgetune.data import load_examples, tokenize_examples
    from edgetune.data.smart_home import generate
    from edgetune.train.nf4 import load_model_nf4
    from edgetune.train.recipe import collate, token_loss_sum

    data, _ = generate(tmp_path, n_train=6, n_heldout=1, seed=2)
    rows = tokenize_examples(tiny_tokenizer, load_examples(data), 128)
    batch = collate(rows, tiny_tokenizer.pad_token_id, "cpu")
    model = load_model_nf4(tiny_model).eval()
    assert isinstance(model.lm_head, StoredLinear)
    seen = []
    model.lm_head.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape)))
    with torch.no_grad():
        loss, n = token_loss_sum(model, batch)
        full = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            position_ids=batch["position_ids"],
        ).logits  # (B, T, V)
    labels = batch["labels"][:, 1:]
    want = torch.nn.functional.cross_entropy(
        full[:, :-1].reshape(-1, full.shape[-1]),
        labels.reshape(-1),
        ignore_index=IGNORE,
        reduction="sum",
    )
    assert n == int((labels != IGNORE).sum()) > 0
    assert seen[0] == (n, full.shape[-1])  # the head ran on the labelled positions only
    assert seen[1] == tuple(full.shape)  # and the hook is gone after the block
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-4)


def test_logits_only_at_selects_rows_in_order():
    lin = torch.nn.Linear(4, 3)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lm_head = lin

        def get_output_embeddings(self):
            return self.lm_head

        def forward(self, h):
            return self.lm_head(h)

    model = Model()
    h = torch.randn(2, 5, 4)
    keep = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 1]], dtype=torch.bool)  # (B, T-1)
    with logits_only_at(model, keep):
        got = model(h)
    want = lin(h)[:, :4][keep]
    torch.testing.assert_close(got, want)
    assert model(h).shape == (2, 5, 3)  # the hook is gone after the block
