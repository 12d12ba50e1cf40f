"""MedRegTrainer mechanics on a plain tiny Llama (no InternVL parts needed): per-token loss over gradient
accumulation, length-grouped sampling, atomic checkpoints, LoRA adapter save/load/merge."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from internvl.ops.cross_entropy import causal_lm_loss, loss_items
from internvl.train import checkpoint as ckpt
from internvl.train.arguments import MedRegTrainingArguments
from internvl.train.lora import has_lora, load_lora_run, merge_lora, save_lora_run, wrap_llm_lora
from internvl.train.trainer import LengthGroupedSampler, MedRegTrainer

VOCAB = 64


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg)


def make_samples(n: int, seed: int = 1) -> list[dict[str, list[int]]]:
    """Samples of very different lengths; the first third of each is unsupervised."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = 4 + (i * 7) % 23
        ids = torch.randint(3, VOCAB, (length,), generator=g).tolist()
        labels = [-100] * (length // 3) + ids[length // 3:]
        out.append({"input_ids": ids, "labels": labels})
    return out


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, samples):
        self.samples = samples
        self.lengths = [len(s["input_ids"]) for s in samples]

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return self.samples[i]


def args(tmp_path, **kw) -> MedRegTrainingArguments:
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=1,
                learning_rate=1.0, optim="sgd", lr_scheduler_type="constant", max_grad_norm=0.0, max_steps=1,
                save_strategy="no", report_to="none", use_cpu=True, train_sampling_strategy="sequential",
                disable_tqdm=True, seed=0, weight_decay=0.0)
    base.update(kw)
    return MedRegTrainingArguments(**base)


def test_loss_is_per_token_across_gradient_accumulation(tmp_path, pad_text_batch):
    """bs=4 x GA=1 and bs=1 x GA=4 must give the same update when every token weighs the same."""
    samples = make_samples(4)
    results = []
    for bs, ga in [(4, 1), (1, 4), (2, 2)]:
        model = tiny_llama()
        trainer = MedRegTrainer(model=model, args=args(tmp_path / f"{bs}_{ga}", per_device_train_batch_size=bs,
                                                       gradient_accumulation_steps=ga),
                                train_dataset=ListDataset(samples), data_collator=pad_text_batch)
        trainer.train()
        results.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    reference = tiny_llama()
    moved = (results[0] - torch.cat([p.detach().flatten() for p in reference.parameters()])).abs().max()
    assert moved > 1e-4  # the step did something
    torch.testing.assert_close(results[1], results[0], atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(results[2], results[0], atol=2e-6, rtol=1e-5)


def test_token_loss_matches_mean_cross_entropy_and_weights():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[-100, 1, 2, -100, 3], [-100, -100, 4, 5, 6]])
    mean = causal_lm_loss(logits, None, labels)
    assert loss_items(labels) == 6
    reference = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 7), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(mean, reference)
    torch.testing.assert_close(causal_lm_loss(logits, None, labels, num_items_in_batch=12), reference / 2)
    weights = torch.tensor([[0, 0.5, 0.5, 0, 0.5], [0, 0, 2.0, 2.0, 2.0]])
    ce = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 7), labels[:, 1:].reshape(-1), reduction="none")
    w = weights[:, 1:].reshape(-1) * (labels[:, 1:].reshape(-1) != -100)
    assert loss_items(labels, weights) == pytest.approx(1.5 + 6.0)
    torch.testing.assert_close(causal_lm_loss(logits, None, labels, loss_weight=weights), (ce * w).sum() / w.sum())
    torch.testing.assert_close(causal_lm_loss(logits, None, labels, loss_weight=weights, num_items_in_batch=10.0),
                               (ce * w).sum() / 10.0)


def test_length_grouped_sampler_is_a_seeded_permutation_of_sorted_groups():
    lengths = [5, 50, 7, 33, 1, 80, 12, 9, 60, 2]
    sampler = LengthGroupedSampler(lengths, group_size=4, seed=3)
    first = list(sampler)
    assert sorted(first) == list(range(len(lengths)))
    assert list(sampler) == first  # same epoch -> same order (what resume relies on)
    for start in range(0, len(first), 4):
        group = [lengths[i] for i in first[start:start + 4]]
        assert group == sorted(group, reverse=True)
    sampler.set_epoch(1)
    assert list(sampler) != first


def test_checkpoints_are_published_atomically(tmp_path, pad_text_batch):
    """A save that dies half-way leaves no checkpoint-N; the previous complete one stays the latest."""
    out = tmp_path / "run"
    model = tiny_llama()
    trainer = MedRegTrainer(model=model, args=args(out, max_steps=4, save_strategy="steps", save_steps=2,
                                                   learning_rate=1e-3, optim="adamw_torch"),
                            train_dataset=ListDataset(make_samples(16)), data_collator=pad_text_batch)
    original = trainer._save_rng_state

    def dying_save(output_dir):
        if output_dir.endswith("checkpoint-4"):
            raise RuntimeError("killed while writing")
        return original(output_dir)

    trainer._save_rng_state = dying_save
    with pytest.raises(RuntimeError, match="killed while writing"):
        trainer.train()
    assert (out / ".staging" / "checkpoint-4").is_dir()  # the half-written one exists ...
    assert not (out / "checkpoint-4").exists()
    latest = ckpt.find_latest_checkpoint(out)
    assert latest is not None and latest.name == "checkpoint-2"  # ... but is never taken as the latest
    assert ckpt.is_complete(latest)
    state = json.loads((latest / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    for name in ["model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth"]:
        assert (latest / name).is_file(), name
    # a fake checkpoint folder without marker is ignored too
    (out / "checkpoint-9").mkdir()
    assert ckpt.find_latest_checkpoint(out).name == "checkpoint-2"
    assert ckpt.clean_staging(out)
    assert not (out / ".staging" / "checkpoint-4").exists()


def test_rotate_keeps_newest_complete(tmp_path):
    for step in (1, 2, 3):
        d = tmp_path / ".staging" / f"checkpoint-{step}"
        d.mkdir(parents=True)
        (d / "trainer_state.json").write_text("{}")
        ckpt.publish_checkpoint(d, tmp_path)
    deleted = ckpt.rotate_checkpoints(tmp_path, 2)
    assert [p.name for p in deleted] == ["checkpoint-1"]
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [2, 3]


class Holder(nn.Module):
    """Stands in for InternVLChatModel: a `language_model` attribute plus a trainable projector."""

    def __init__(self):
        super().__init__()
        self.language_model = tiny_llama()
        self.mlp1 = nn.Linear(4, 4)

    def forward(self, input_ids):
        return self.language_model(input_ids=input_ids).logits


def perturb_adapters(model: nn.Module) -> None:
    """Make the adapters non-trivial (lora_B starts at zero) and move the trainable projector off its init."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or name.startswith("mlp1."):
                p.add_(torch.randn_like(p) * 0.1)


def test_lora_adapters_save_load_and_merge(tmp_path):
    torch.manual_seed(0)
    model = Holder()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    wrap_llm_lora(model, r=4, dropout=0.0)
    assert has_lora(model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or n.startswith("mlp1.") for n in trainable)
    perturb_adapters(model)
    ids = torch.randint(0, VOCAB, (2, 9))
    expected = model(ids).detach()
    save_lora_run(model, tmp_path, base_model="base-dir")
    assert (tmp_path / "adapters" / "language_model" / "adapter_config.json").is_file()
    assert (tmp_path / "adapters" / "language_model" / "adapter_model.safetensors").is_file()
    info = json.loads((tmp_path / "lora_run.json").read_text())
    assert info["non_lora_trainables"] == ["mlp1.bias", "mlp1.weight"]

    fresh = Holder()
    fresh.load_state_dict(base_state)
    load_lora_run(fresh, tmp_path)
    torch.testing.assert_close(fresh(ids), expected)
    merge_lora(fresh)
    assert not has_lora(fresh)
    assert set(fresh.state_dict()) == set(base_state)
    torch.testing.assert_close(fresh(ids), expected, atol=1e-4, rtol=1e-4)


def test_lora_resume_reloads_into_the_wrapped_model_and_refuses_foreign_keys(tmp_path):
    """Resume reloads a run's adapters into the already-wrapped model (trainable, in place) through the same loader as
    the merge; an adapter file with keys the model does not have is refused, naming the adapter folder."""
    torch.manual_seed(0)
    model = Holder()
    wrap_llm_lora(model, r=4, dropout=0.0)
    perturb_adapters(model)
    ids = torch.randint(0, VOCAB, (2, 9))
    expected = model(ids).detach()
    save_lora_run(model, tmp_path, base_model="base-dir")
    torch.manual_seed(0)
    resumed = Holder()
    wrap_llm_lora(resumed, r=4, dropout=0.0)
    load_lora_run(resumed, tmp_path, is_trainable=True)
    torch.testing.assert_close(resumed(ids), expected)
    assert all(p.requires_grad for n, p in resumed.named_parameters() if "lora_" in n)

    adapter = tmp_path / "adapters" / "language_model" / "adapter_model.safetensors"
    tensors = load_file(adapter)
    save_file({**tensors, "base_model.model.bogus.lora_A.weight": torch.zeros(4, 4)}, adapter)
    with pytest.raises(ValueError, match=r"adapters/language_model: unexpected keys"):
        load_lora_run(resumed, tmp_path, is_trainable=True)

    info_path = tmp_path / "lora_run.json"  # a run whose adapters differ from the model's (LoRA flags changed)
    info = json.loads(info_path.read_text())
    info_path.write_text(json.dumps({**info, "adapters": ["language_model", "vision_model"]}))
    with pytest.raises(ValueError, match=r"lora_run.json: the run has adapters for \['language_model', 'vision_model'\]"):
        load_lora_run(resumed, tmp_path, is_trainable=True)


class PackedRecorder(nn.Module):
    """Takes the packed batch the way InternVLChatModel does (extra keys land in **kwargs) and records the keys."""

    def __init__(self):
        super().__init__()
        self.language_model = tiny_llama()
        self.received: list[set[str]] = []

    def forward(self, input_ids, position_ids=None, pixel_values=None, image_flags=None, **kwargs):
        self.received.append({"input_ids", "position_ids", "pixel_values", "image_flags", *kwargs})
        return self.language_model(input_ids=input_ids, position_ids=position_ids, use_cache=False)


def test_samples_per_second_counts_samples_not_packed_rows(tmp_path, monkeypatch):
    """With PackedCollator, 5 samples per micro-batch share 2 rows (plus padding segments that restart
    position_ids): samples/s counts the 5 samples, and `num_samples` never reaches the model's forward."""
    from internvl.data.collate import PackedCollator
    from internvl.train import trainer as trainer_module

    g = torch.Generator().manual_seed(3)
    items = []
    for i in range(10):
        n = 4 + i % 3
        ids = torch.randint(3, VOCAB, (n,), generator=g)
        items.append({"input_ids": ids, "labels": torch.cat([torch.full((2,), -100), ids[2:]]),
                      "pixel_values": torch.zeros(1, 3, 2, 2), "image_flags": torch.zeros(1, dtype=torch.long)})
    collator = PackedCollator(max_packed_tokens=16)
    packed = collator(items[:5])
    assert packed["input_ids"].shape[0] == 2 and int(packed["num_samples"]) == 5
    assert int((packed["position_ids"] == 0).sum()) == 6  # 5 samples + the shorter row's padding segment

    model = PackedRecorder()
    trainer = MedRegTrainer(model=model, args=args(tmp_path, per_device_train_batch_size=5, max_steps=2,
                                                   logging_steps=1, learning_rate=1e-3),
                            train_dataset=ListDataset(items), data_collator=collator)
    seen_at_log = []
    original_log = trainer.log

    def spy_log(logs, *a, **kw):
        if "loss" in logs:
            seen_at_log.append(trainer._samples_seen)
        return original_log(logs, *a, **kw)

    trainer.log = spy_log
    trainer.train()
    assert seen_at_log == [5, 5]
    # the running count stays a device tensor between logs: no host sync per micro-batch
    assert all(torch.is_tensor(x) for x in seen_at_log)
    assert len(model.received) == 2 and all("num_samples" not in keys for keys in model.received)
    assert all("samples_per_second" in entry for entry in trainer.state.log_history if "loss" in entry)

    # the logged rate is that count over the elapsed time (fixed clock: 5 samples in 2 s)
    trainer.compute_loss(model, dict(packed))
    trainer._last_log_time = 100.0
    monkeypatch.setattr(trainer_module.time, "perf_counter", lambda: 102.0)
    trainer.log({"loss": 1.0})
    assert trainer.state.log_history[-1]["samples_per_second"] == 2.5
    assert "num_samples" not in model.received[-1]


def test_fsync_tree_syncs_every_file_and_folder_and_passes_over_failures(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.bin").write_text("1")
    (tmp_path / "b.json").write_text("2")
    synced = []
    monkeypatch.setattr(ckpt.os, "fsync", lambda fd: synced.append(ckpt.os.fstat(fd).st_ino))
    ckpt.fsync_tree(tmp_path)
    expected = [tmp_path, tmp_path / "sub", tmp_path / "sub" / "a.bin", tmp_path / "b.json"]
    assert sorted(synced) == sorted(p.stat().st_ino for p in expected)

    def failing(fd):
        raise OSError("not supported here")

    monkeypatch.setattr(ckpt.os, "fsync", failing)
    ckpt.fsync_tree(tmp_path)  # best effort: no error
    ckpt.fsync_tree(tmp_path / "missing")


def test_engine_preparation_for_deepcompile_and_deepspeed_builds(monkeypatch):
    """A DeepSpeed config asking for DeepCompile turns torch's cuDNN attention off until train end (its compiled graph
    fails on that op); DeepSpeed's op builds get a TORCH_CUDA_ARCH_LIST they can parse. Shown on a stand-in trainer:
    building a real one under DeepSpeed needs a DeepSpeed process group."""
    from types import SimpleNamespace

    from internvl.train.trainer import RunCallback

    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0a")
    before = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(True)
    try:
        config = SimpleNamespace(config={"compile": {"deepcompile": True}})
        stand_in = SimpleNamespace(args=SimpleNamespace(deepspeed="ds.json", hf_deepspeed_config=config, fsdp=None,
                                                        use_cpu=True), _cudnn_sdpa_off=False)
        stand_in._restore_engine = lambda: MedRegTrainer._restore_engine(stand_in)
        MedRegTrainer._prepare_engine(stand_in)
        assert os.environ["TORCH_CUDA_ARCH_LIST"] == "9.0"
        assert stand_in._cudnn_sdpa_off and not torch.backends.cuda.cudnn_sdp_enabled()
        RunCallback(stand_in).on_train_end(None, None, None)
        assert torch.backends.cuda.cudnn_sdp_enabled() and not stand_in._cudnn_sdpa_off
        config.config = {}  # no DeepCompile: cuDNN attention untouched
        MedRegTrainer._prepare_engine(stand_in)
        assert torch.backends.cuda.cudnn_sdp_enabled() and not stand_in._cudnn_sdpa_off
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)


def test_a_failed_train_gives_back_cudnn_attention(tmp_path, monkeypatch):
    """What `_prepare_engine` switched off for the process (cuDNN attention under DeepCompile) comes back when
    `train()` raises, not only at a normal train end."""
    before = torch.backends.cuda.cudnn_sdp_enabled()
    trainer = MedRegTrainer(model=torch.nn.Linear(2, 2), args=args(tmp_path), train_dataset=ListDataset([]))
    try:
        torch.backends.cuda.enable_cudnn_sdp(False)
        trainer._cudnn_sdpa_off = True

        def fail(self, *a, **kw):
            raise RuntimeError("step failed")

        monkeypatch.setattr(MedRegTrainer.__mro__[1], "train", fail)
        with pytest.raises(RuntimeError, match="step failed"):
            trainer.train()
        assert torch.backends.cuda.cudnn_sdp_enabled() and not trainer._cudnn_sdpa_off
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)
