"""Two-rank worker of `test_perf_train_speedups.test_fsdp2_head_on_two_ranks_matches_one_process` (run by torchrun on
gloo; exits non-zero on a mismatch). The tiny model is sharded as accelerate's FSDP2 path shards it for
`ENGINE=fsdp2` (layers, embedding, the [final norm, LM head] tail with reshard_after_forward=False, root), so each rank
holds half of the LM head's rows. Each rank trains on its own batch through the trainer's fused LM-head loss; the loss
averaged over ranks and the gathered gradients must equal one unsharded process that averages the same two batches'
plain (full-logits) losses, for two steps. The same with the head alone in a unit that reshards after its forward."""
from __future__ import annotations

import copy
import sys

import torch
import torch.distributed as dist
from internvl.model import InternVLChatModel, load_preset
from internvl.ops import cross_entropy, train_speedups
from internvl.train.build import enable_gradient_checkpointing

from conftest import shard_like_accelerate  # this folder's conftest.py: torchrun puts the script's folder on the path

IMG = 1000
TOL = 1e-5


def batch(seed: int) -> tuple[dict, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + seed)
    ids = torch.randint(0, 900, (2, 20), generator=g)
    ids[:, 1:5] = IMG
    labels = ids.clone()
    labels[:, :6 + seed] = -100  # a different supervised count per rank
    return {"pixel_values": torch.randn(2, 3, 56, 56, generator=g), "input_ids": ids,
            "image_flags": torch.ones(2, dtype=torch.long)}, labels


def main() -> int:
    dist.init_process_group("gloo")
    failed = sum(check(layout) for layout in ("tail", "reshards"))
    dist.destroy_process_group()
    return 1 if failed else 0


def check(layout: str) -> bool:
    """One layout: "tail" (accelerate's [norm, head] unit, kept unsharded after forward) or "reshards" (the head
    alone in a unit that reshards after its forward; the loss gathers it again). Returns True on a failure."""
    rank, world = dist.get_rank(), dist.get_world_size()
    config = load_preset("tiny")
    config.llm_config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = InternVLChatModel(config).train()
    model.img_context_token_id = IMG
    enable_gradient_checkpointing(model)
    reference = copy.deepcopy(model)
    ref_loss = 0.0
    for r in range(world):
        inputs, labels = batch(r)
        loss = reference(**inputs, labels=labels).loss / world
        loss.backward()
        ref_loss += loss.item()
    ref_grads = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}

    shard_like_accelerate(model, layout)
    llm = model.language_model
    head = llm.get_output_embeddings()
    local_rows = head.weight.to_local().shape[0]
    assert local_rows < head.out_features, "the head is not sharded"
    assert cross_entropy.fused_head_supported(head), type(head)
    seen: list[tuple[int, ...]] = []
    original = train_speedups.causal_lm_loss

    def spy(hidden, lm_head, labels, **kwargs):
        seen.append(tuple(lm_head.weight.shape))
        return original(hidden, lm_head, labels, **kwargs)

    train_speedups.causal_lm_loss = spy
    failures: list[str] = []
    for step in range(2):
        inputs, labels = batch(rank)
        loss = train_speedups.fused_loss_forward(model, inputs, labels, impl="chunked")[0]
        loss.backward()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        mean = float(mean) / world
        if abs(mean - ref_loss) > TOL * abs(ref_loss):
            failures.append(f"step {step}: loss {mean} vs {ref_loss}")
        for name, p in model.named_parameters():
            if p.grad is None:
                continue
            got, want = p.grad.full_tensor(), ref_grads[name]
            rel = float((got - want).norm() / want.norm().clamp(min=1e-12))
            if rel > TOL * 10:
                failures.append(f"step {step}: grad {name} rel {rel:.2e}")
        if {n for n, p in model.named_parameters() if p.grad is not None} != set(ref_grads):
            failures.append(f"step {step}: gradients on other parameters than the reference's")
        model.zero_grad(set_to_none=True)
    if seen != [(head.out_features, head.in_features)] * 2:
        failures.append(f"the fused loss did not read the whole unsharded head: {seen} (local rows {local_rows})")
    train_speedups.causal_lm_loss = original
    print(f"{layout} rank {rank}: local head rows {local_rows}/{head.out_features}, loss {ref_loss:.6f}, "
          f"{'OK' if not failures else 'FAIL ' + '; '.join(failures)}", flush=True)
    return bool(failures)


if __name__ == "__main__":
    sys.exit(main())
