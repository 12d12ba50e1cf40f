"""Guards for internvl.ops.cross_entropy: the chunked fused path equals the plain logits path (loss and grads)."""
import pytest
import torch
import torch.nn.functional as F

from internvl.ops import causal_lm_loss, linear_cross_entropy


def _case(dtype, n=257, h=24, v=301, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(dtype).requires_grad_()
    weight = (0.2 * torch.randn(v, h, generator=g)).to(dtype).requires_grad_()
    labels = torch.randint(0, v, (n,), generator=g)
    labels[torch.rand(n, generator=g) < 0.3] = -100
    return hidden, weight, labels


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-3)])
@pytest.mark.parametrize("weighted", [False, True])
def test_chunked_matches_plain(dtype, tol, weighted):
    hidden, weight, labels = _case(dtype, seed=int(weighted))
    tw = torch.rand(labels.shape[0], generator=torch.Generator().manual_seed(7)) if weighted else None
    ref = linear_cross_entropy(hidden, weight, labels, impl="plain", token_weights=tw)
    ref_grads = torch.autograd.grad(ref * 3.0, (hidden, weight))
    out = linear_cross_entropy(hidden, weight, labels, impl="chunked", chunk_size=50, token_weights=tw)
    grads = torch.autograd.grad(out * 3.0, (hidden, weight))
    assert abs(out.item() - ref.item()) <= tol * abs(ref.item())
    for a, b in zip(grads, ref_grads):
        rel = (a.float() - b.float()).norm() / b.float().norm()
        assert rel < (1e-5 if dtype == torch.float32 else 1e-2)


def test_plain_equals_torch_cross_entropy():
    hidden, weight, labels = _case(torch.float32, seed=3)
    expected = F.cross_entropy(hidden @ weight.t(), labels, ignore_index=-100)
    assert torch.allclose(linear_cross_entropy(hidden, weight, labels, impl="plain"), expected, rtol=1e-6)


def test_causal_lm_loss_matches_shifted_full_logits():
    g = torch.Generator().manual_seed(1)
    head = torch.nn.Linear(16, 50, bias=False)
    hs = torch.randn(3, 11, 16, generator=g, requires_grad=True)
    labels = torch.randint(0, 50, (3, 11), generator=g)
    labels[:, :4] = -100
    labels[1, 7:] = -100
    logits = head(hs)
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 50), labels[:, 1:].reshape(-1), ignore_index=-100)
    got = causal_lm_loss(hs, head, labels, impl="chunked")
    assert torch.allclose(got, expected, rtol=1e-5)
    g1 = torch.autograd.grad(expected, hs, retain_graph=True)[0]
    g2 = torch.autograd.grad(got, hs)[0]
    assert torch.allclose(g1, g2, atol=1e-6)


def test_all_ignored_gives_zero_with_graph():
    head = torch.nn.Linear(8, 20, bias=False)
    hs = torch.randn(2, 5, 8, requires_grad=True)
    labels = torch.full((2, 5), -100)
    loss = causal_lm_loss(hs, head, labels)
    assert loss.item() == 0.0
    loss.backward()
    assert hs.grad is not None


def test_unknown_impl_raises():
    hidden, weight, labels = _case(torch.float32)
    with pytest.raises(ValueError, match="unknown cross-entropy impl"):
        linear_cross_entropy(hidden, weight, labels, impl="nope")


def test_num_items_in_batch_gives_sum_over_items():
    g = torch.Generator().manual_seed(2)
    head = torch.nn.Linear(8, 30, bias=False)
    hs = torch.randn(2, 6, 8, generator=g)
    labels = torch.randint(0, 30, (2, 6), generator=g)
    labels[:, :2] = -100
    mean = causal_lm_loss(hs, head, labels, impl="chunked")
    n_sup = int((labels[:, 1:] != -100).sum())
    total = causal_lm_loss(hs, head, labels, impl="chunked", num_items_in_batch=20)
    assert torch.allclose(total, mean * n_sup / 20)


def test_fused_head_supported():
    from internvl.ops import fused_head_supported

    assert fused_head_supported(torch.nn.Linear(4, 5))

    class Wrapped(torch.nn.Linear):
        pass

    assert not fused_head_supported(Wrapped(4, 5))
    zero3 = torch.nn.Linear(4, 5)
    zero3.weight.ds_id = 3
    assert not fused_head_supported(zero3)
    # ...but the fused loss runs it as the head's own forward, where ZeRO-3's hooks gather it (fused_loss_forward)
    from internvl.ops.cross_entropy import zero3_partitioned_head

    assert zero3_partitioned_head(zero3)
    assert not zero3_partitioned_head(torch.nn.Linear(4, 5)) and not zero3_partitioned_head(Wrapped(4, 5))
