"""CPU guard of the lab's "outside" checkpointing variant (`lab.ckpt_outside`), moved out of the product: with
checkpointing off and on, the re-compiled layers give the plain eager path's loss and gradients (backend "aot_eager":
dynamo and AOT autograd without inductor codegen)."""
import pytest
import torch

from internvl.model import InternVLChatModel, load_preset
from internvl.ops.train_speedups import apply_train_speedups
from internvl.train.build import enable_gradient_checkpointing
from lab.ckpt_outside import OutsideCkpt, compile_outside

IMG = 1000


def _loss_and_grads(model):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 900, (2, 24), generator=g)
    ids[:, 2:6] = IMG  # 4 image tokens per 56 px tile
    labels = ids.clone()
    labels[:, :8] = -100
    loss = model(pixel_values=torch.randn(2, 3, 56, 56, generator=g), input_ids=ids,
                 image_flags=torch.ones(2, dtype=torch.long), labels=labels).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


@pytest.mark.parametrize("ckpt", [False, True], ids=["ckpt-off", "ckpt-on"])
def test_outside_checkpointing_gives_the_plain_loss_and_gradients(ckpt):
    config = load_preset("tiny")
    config.llm_config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = InternVLChatModel(config).train()
    model.img_context_token_id = IMG
    if ckpt:
        enable_gradient_checkpointing(model)
    ref_loss, ref_grads = _loss_and_grads(model)
    opts = OutsideCkpt(backend="aot_eager", fuse_projections=False)
    apply_train_speedups(model, opts, allow_cpu=True)
    assert compile_outside(model, opts) == 4  # 2 ViT + 2 LLM layers
    for _ in range(2):  # the second call runs the cached compiled graphs
        loss, grads = _loss_and_grads(model)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
        assert grads.keys() == ref_grads.keys()
        for name, grad in grads.items():
            rel = (grad - ref_grads[name]).norm() / ref_grads[name].norm().clamp(min=1e-12)
            assert rel < 1e-4, (name, float(rel))
