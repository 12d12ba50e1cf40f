"""The CUDA-graph training step's sync-free body on the CPU (capture itself runs on the GPU: `python -m lab.bench
--sections train --train-variants graphstep`): the sync-free image merge, the fixed-capacity loss, the host checks,
the causal-only mask switch, and whole steps that train exactly like the plain loop."""
import pytest
import torch
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS as masks

from internvl.constants import IGNORE_INDEX
from internvl.model import ImageTokenMismatchError, InternVLChatModel, load_preset
from internvl.ops.cross_entropy import causal_lm_loss
from internvl.ops.train_speedups import fused_loss_forward
from lab.graph_step import CudaGraphTrainStep, causal_only_sdpa_masks, fixed_capacity_loss

IMG = 1008


@pytest.fixture()
def model():
    torch.manual_seed(0)
    m = InternVLChatModel(load_preset("tiny")).train()
    m.img_context_token_id = IMG
    return m


def _batch(model, seed=0, *, rows=2, seq=24, flags=None):
    """`rows` samples of `seq` tokens; sample i has one real tile unless flags[i] == 0 (a text-only sample with a
    dummy tile); answers supervised from position 12 on."""
    g = torch.Generator().manual_seed(seed)
    n = model.num_image_token
    flags = torch.ones(rows, dtype=torch.long) if flags is None else torch.tensor(flags)
    ids = torch.randint(10, 1000, (rows, seq), generator=g)
    for i in range(rows):
        if flags[i] == 1:
            ids[i, 3:3 + n] = IMG
    labels = ids.clone()
    labels[:, :12] = IGNORE_INDEX
    return {"input_ids": ids, "labels": labels, "pixel_values": torch.randn(rows, 3, 56, 56, generator=g),
            "image_flags": flags}


@pytest.mark.parametrize("flags", [None, [1, 0, 1]])
def test_sync_free_merge_equals_checked_merge(model, flags):
    """The static-shape merge, unchecked (graph capture) and checked, equals a masked_scatter of the real tiles'
    features (the plain reference), in values and gradients."""
    b = _batch(model, seed=1, rows=3, flags=flags)
    vit = torch.randn(3, model.num_image_token, model.config.llm_config.hidden_size, requires_grad=True)
    embeds = model.language_model.get_input_embeddings()(b["input_ids"]).detach()
    keep = b["image_flags"] == 1
    mask = (b["input_ids"] == IMG).unsqueeze(-1)
    checked = embeds.masked_scatter(mask, vit[keep].reshape(-1, vit.shape[-1]))
    free = model.merge_image_embeddings(b["input_ids"], embeds, vit, b["image_flags"] if flags else None, check=False)
    torch.testing.assert_close(free, checked, rtol=0, atol=0)
    torch.testing.assert_close(model.merge_image_embeddings(b["input_ids"], embeds, vit, b["image_flags"]), checked,
                               rtol=0, atol=0)
    weights = torch.randn_like(checked)
    (g_checked,) = torch.autograd.grad((checked * weights).sum(), vit)
    (g_free,) = torch.autograd.grad((free * weights).sum(), vit)
    torch.testing.assert_close(g_free, g_checked, rtol=1e-6, atol=1e-7)
    if flags:
        assert g_free[1].abs().sum() == 0  # the dummy tile takes part with weight 0


@pytest.mark.parametrize("kw", [{}, {"loss_weight": True}])
def test_fixed_capacity_loss_equals_boolean_gather(kw):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 17, 8, generator=g, requires_grad=True)
    head = torch.nn.Linear(8, 11, bias=False)
    labels = torch.randint(0, 11, (3, 17), generator=g)
    labels[:, :5] = IGNORE_INDEX
    labels[1, 9:] = IGNORE_INDEX
    if kw.get("loss_weight"):
        kw = {"loss_weight": torch.rand(3, 17, generator=g)}
    supervised = int((labels[:, 1:] != IGNORE_INDEX).sum())
    plain = causal_lm_loss(hidden, head, labels, impl="chunked", **kw)
    (g_plain,) = torch.autograd.grad(plain, hidden)
    for capacity in (supervised, supervised + 7):
        fixed = fixed_capacity_loss(hidden, head, labels, impl="chunked", capacity=capacity, **kw)
        (g_fixed,) = torch.autograd.grad(fixed, hidden)
        torch.testing.assert_close(fixed, plain, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(g_fixed, g_plain, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="capacity"):
        fixed_capacity_loss(hidden, head, labels, capacity=0)


def test_plan_checks_counts_capacity_and_mask_mode(model):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    step = CudaGraphTrainStep(model, opt, supervised_bucket=16)
    b = _batch(model)
    plan = step.plan(b)
    supervised = int((b["labels"][:, 1:] != IGNORE_INDEX).sum())  # 2 x 12 = 24 -> bucket of 16 -> 32
    assert plan.capacity == 32 and plan.capacity >= supervised
    assert plan.causal_only is (model.language_model.config._attn_implementation == "sdpa")
    assert step.plan({**b, "attention_mask": torch.ones(2, 24, dtype=torch.long)}).key[2] == plan.causal_only
    padded = torch.ones(2, 24, dtype=torch.long)
    padded[0, -3:] = 0
    assert step.plan({**b, "attention_mask": padded}).causal_only is False
    packed = torch.cat([torch.arange(10), torch.arange(14)]).repeat(2, 1)
    assert step.plan({**b, "position_ids": packed}).causal_only is False
    assert step.plan({**b, "position_ids": torch.arange(24).repeat(2, 1)}).causal_only is plan.causal_only
    cut = dict(b, input_ids=b["input_ids"].clone())
    cut["input_ids"][1, 3] = 5  # one image token lost
    with pytest.raises(ImageTokenMismatchError, match=r"record 7: input_ids hold 7 <IMG_CONTEXT>"):
        step.plan(cut, what="record 7")
    with pytest.raises(ValueError, match="no pixel_values"):
        step.plan({k: v for k, v in b.items() if k not in ("pixel_values", "image_flags")})
    text_only = _batch(model, flags=[1, 0])
    assert step.plan(text_only).capacity == 32
    with pytest.raises(ImageTokenMismatchError):
        step.plan(dict(text_only, image_flags=torch.ones(2, dtype=torch.long)))


def test_causal_only_masks_give_the_causal_forward_and_restore(model):
    model.language_model.config._attn_implementation = "sdpa"
    b = _batch(model, seed=2)
    inputs = {k: b[k] for k in ("input_ids", "pixel_values", "image_flags")}
    before = masks["sdpa"]
    with torch.no_grad():
        ref = model(**inputs).logits
        with causal_only_sdpa_masks():
            assert masks["sdpa"] is not before
            free = model(**inputs, sync_free=True).logits
    assert masks["sdpa"] is before
    torch.testing.assert_close(free, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("flags", [None, [1, 0]])
def test_steps_train_like_the_plain_loop(flags):
    """Three CudaGraphTrainStep calls (eager on the CPU: the body the GPU captures) against the plain loop: the
    trainer's fused loss forward, backward, clipping, AdamW. Same losses and the same weights after every step."""
    torch.manual_seed(0)
    ref = InternVLChatModel(load_preset("tiny")).train()
    torch.manual_seed(0)
    ours = InternVLChatModel(load_preset("tiny")).train()
    for m in (ref, ours):
        m.img_context_token_id = IMG
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-3)
    opt = torch.optim.AdamW(ours.parameters(), lr=1e-3)
    step = CudaGraphTrainStep(ours, opt, impl="chunked", supervised_bucket=8, max_grad_norm=0.5)
    for i in range(3):
        b = _batch(ours, seed=10 + i, flags=flags)
        opt_ref.zero_grad(set_to_none=True)
        inputs = {k: b[k] for k in ("pixel_values", "input_ids", "image_flags")}
        loss_ref, _ = fused_loss_forward(ref, inputs, b["labels"], impl="chunked")
        loss_ref.backward()
        norm_ref = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
        opt_ref.step()
        loss = step(b)
        torch.testing.assert_close(loss, loss_ref.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(step.last_grad_norm, norm_ref, rtol=1e-4, atol=1e-6)
        for (name, p_ref), p in zip(ref.named_parameters(), ours.parameters()):
            torch.testing.assert_close(p, p_ref, rtol=1e-4, atol=1e-6, msg=name)
    assert step.steps == {"eager": 3, "captured": 0, "replayed": 0}


def test_replay_refuses_a_changed_float_learning_rate(model):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    step = CudaGraphTrainStep(model, opt)
    step.check_lr_unchanged([1e-3])
    opt.param_groups[0]["lr"] = 5e-4  # what a scheduler does
    with pytest.raises(ValueError, match="param group 0: the learning rate changed from 0.001 to 0.0005"):
        step.check_lr_unchanged([1e-3])
    opt.param_groups[0]["lr"] = torch.tensor(5e-4)  # a tensor lr is read by the graph at every replay
    step.check_lr_unchanged([torch.tensor(1e-3)])


def test_route_eager_then_capture_then_replay_within_max_graphs(model):
    step = CudaGraphTrainStep(model, torch.optim.AdamW(model.parameters()), eager_steps=2, max_graphs=2)
    seen = []
    for key in ["a", "a", "b", "a", "a", "b", "b", "c", "c", "c", "b"]:
        how = step.route(key)
        if how == "capture":
            step._graphs[key] = object()  # what __call__ stores after capturing
        seen.append(how)
    assert seen == ["eager", "eager", "eager", "capture", "replay", "eager", "capture", "eager", "eager", "eager",
                    "replay"]  # "c" stays eager: two graphs already exist
