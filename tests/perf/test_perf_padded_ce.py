"""Guards for the padded-vocabulary LM-head loss (`impl="padded"`, the CUDA default of the trainer's fused loss):
equal to F.cross_entropy on odd vocabularies, equal gradients to the plain path, the same with row chunks, token
weights and a bias, and the inductor-compiled elementwise part equal to the eager one."""
import pytest
import torch
import torch.nn.functional as F

from internvl.ops import linear_cross_entropy
from internvl.ops.cross_entropy import (
    VOCAB_ALIGN,
    PaddedLinearCrossEntropy,
    ce_grad_inplace,
    padded_rows_per_chunk,
)


def _case(dtype, n=97, h=16, v=301, seed=0, bias=False):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(dtype).requires_grad_()
    weight = (0.3 * torch.randn(v, h, generator=g)).to(dtype).requires_grad_()
    b = (0.1 * torch.randn(v, generator=g)).to(dtype).requires_grad_() if bias else None
    labels = torch.randint(0, v, (n,), generator=g)
    labels[torch.rand(n, generator=g) < 0.3] = -100
    return hidden, weight, b, labels


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12))


@pytest.mark.parametrize("vocab", [1, 7, 127, 128, 129, 301, 1009])
def test_padded_equals_torch_cross_entropy_on_odd_vocabularies(vocab):
    hidden, weight, _, labels = _case(torch.float32, v=vocab, seed=vocab)
    expected = F.cross_entropy(hidden @ weight.t(), labels, ignore_index=-100)
    got = linear_cross_entropy(hidden, weight, labels, impl="padded")
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    g_exp = torch.autograd.grad(expected, (hidden, weight))
    g_got = torch.autograd.grad(linear_cross_entropy(hidden, weight, labels, impl="padded"), (hidden, weight))
    for a, b in zip(g_got, g_exp):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("chunk_rows", [13, 50, 1000])
@pytest.mark.parametrize("weighted", [False, True])
def test_padded_chunks_weights_bias_match_plain(chunk_rows, weighted):
    hidden, weight, bias, labels = _case(torch.float32, seed=chunk_rows, bias=True)
    tw = torch.rand(labels.shape[0], generator=torch.Generator().manual_seed(3)) if weighted else None
    ref = linear_cross_entropy(hidden, weight, labels, bias=bias, token_weights=tw, impl="plain")
    ref_g = torch.autograd.grad(ref * 2.5, (hidden, weight, bias))
    out = PaddedLinearCrossEntropy.apply(hidden, weight, bias, labels, tw, chunk_rows, False)
    out_g = torch.autograd.grad(out * 2.5, (hidden, weight, bias))
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    for a, b in zip(out_g, ref_g):
        assert _rel(a, b) < 1e-5


def test_padded_bf16_within_1e3_of_plain():
    hidden, weight, _, labels = _case(torch.bfloat16, n=257, h=24, v=1009, seed=4)
    ref = linear_cross_entropy(hidden, weight, labels, impl="plain")
    ref_g = torch.autograd.grad(ref, (hidden, weight))
    out = linear_cross_entropy(hidden, weight, labels, impl="padded")
    out_g = torch.autograd.grad(out, (hidden, weight))
    assert abs(out.item() - ref.item()) <= 1e-3 * abs(ref.item())
    for a, b in zip(out_g, ref_g):
        assert _rel(a, b) < 1e-2


def test_padded_all_rows_ignored_gives_zero_loss_and_zero_grads():
    hidden, weight, _, labels = _case(torch.float32, n=9, v=33)
    labels[:] = -100
    out = linear_cross_entropy(hidden, weight, labels, impl="padded")
    gh, gw = torch.autograd.grad(out, (hidden, weight))
    assert out.item() == 0.0 and not gh.any() and not gw.any()


def test_rows_per_chunk_follows_the_budget():
    vocab = 32007
    padded = -(-vocab // VOCAB_ALIGN) * VOCAB_ALIGN
    assert padded == 32128
    rows = padded_rows_per_chunk(vocab, torch.bfloat16, budget_bytes=512 * 2**20)
    assert rows * padded * 2 <= 512 * 2**20 < (rows + 1) * padded * 2
    assert padded_rows_per_chunk(vocab, torch.float32, budget_bytes=1) == 128  # floor


def test_ce_grad_inplace_masks_padding_and_writes_gradient():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 16, generator=g)
    labels = torch.tensor([0, 3, 9, 2, 1])
    w = torch.full((5,), 0.2)
    ref = F.cross_entropy(logits[:, :10], labels, reduction="sum") * 0.2
    ref_grad = (torch.softmax(logits[:, :10], -1) - F.one_hot(labels, 10)) * 0.2
    buf = logits.clone()
    loss = ce_grad_inplace(buf, labels, w, 10)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(buf[:, :10], ref_grad)
    assert not buf[:, 10:].any()  # padded columns get no gradient


@pytest.mark.slow
def test_compiled_elementwise_matches_eager():
    """The CUDA default compiles the elementwise part with inductor; on the CPU inductor gives the same numbers."""
    hidden, weight, bias, labels = _case(torch.float32, n=70, v=129, seed=9, bias=True)
    eager = PaddedLinearCrossEntropy.apply(hidden, weight, bias, labels, None, 32, False)
    ge = torch.autograd.grad(eager, (hidden, weight, bias))
    compiled = PaddedLinearCrossEntropy.apply(hidden, weight, bias, labels, None, 32, True)
    gc = torch.autograd.grad(compiled, (hidden, weight, bias))
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    for a, b in zip(gc, ge):
        assert _rel(a, b) < 1e-5
