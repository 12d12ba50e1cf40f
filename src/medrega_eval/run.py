"""`medrega-eval run`: generate answers for registered benchmarks, sharded over torchrun ranks, resumable, then score.

Per benchmark NAME, `--out DIR/NAME` holds `predictions/rank<R>.jsonl` (append-only, fsync'ed per batch), the merged
`predictions.jsonl`, the score outputs (report.py), `generation_errors.jsonl` and `run_settings.json`; resuming with
other settings is refused (`ResumeMismatchError`) unless `--overwrite` moves the old files aside. docs/evaluation.md
("Running: sharding and resuming") describes the rules.
"""
from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from internvl.data.images import ImageLoadError
from internvl.data.records import RecordProblem, read_jsonl
from internvl.inference import (DistInfo, GenerationRequest, Generator, batch_order, default_dtype, init_distributed,
                                load_model_and_tokenizer)
from internvl.io_safety import append_jsonl, atomic_write_text, check_output_dir
from internvl.regional_cot import CotAnswer, RegionalCotGenerator
from medrega_eval.benchmarks import Benchmark, Sample, load_samples, reference_options
from medrega_eval.io import problem_at, read_predictions
from medrega_eval.report import protocol_info, write_outputs
from medrega_eval.score import score_records, summarize

__all__ = ["RunConfig", "ResumeMismatchError", "run_benchmarks", "generate_benchmark", "score_benchmark",
           "check_resume", "start_benchmark_dir"]

SETTINGS_FILE = "run_settings.json"
COT_FIELDS = ("cot_regions", "cot_step_one")  # per-sample Regional CoT fields kept in predictions.jsonl
MERGED_FIELDS = ("id", "prediction", "reference", "question", "image", "image_root", "hw", "lang", "answer_type")


class ResumeMismatchError(ValueError):
    """`--out` holds predictions made with another model or other settings (and `--overwrite` was not given)."""


@dataclass
class RunConfig:
    """What `run` needs beyond the model: output dir, data dir, batch size, generation settings, limits."""

    out: Path
    data_dir: Path | None
    batch_size: int = 8
    limit: int | None = None
    compat: str | None = None
    score: bool = True
    bertscore_model: str | None = None
    bertscore_layer: int | None = None
    overwrite: bool = False
    regional_cot: bool = False  # two-step Regional CoT (internvl.regional_cot); recorded in run_settings.json


def _repair_tail(path: Path) -> int:
    """Cut a half-written last line (no trailing newline) off `path`; return the bytes removed."""
    data = path.read_bytes() if path.is_file() else b""
    if not data or data.endswith(b"\n"):
        return 0
    cut = data.rfind(b"\n") + 1
    with path.open("r+b") as fh:
        fh.truncate(cut)
    return len(data) - cut


def finished_ids(pred_dir: Path) -> set[str]:
    """Ids with a prediction line in any rank file (read like every record file; a line that does not parse, such as
    a half-written one, names no id, so its sample is generated again)."""
    return {str(row["id"]) for path in sorted(pred_dir.glob("rank*.jsonl")) for _, row in read_jsonl(path)
            if isinstance(row, dict) and "id" in row and "prediction" in row}


def run_settings(model_path: str, dtype: str, quantization: str | None, generation: dict[str, Any],
                 bench: Benchmark, annotation: Path, regional_cot: bool = False) -> dict[str, Any]:
    """What decides the predictions of one benchmark run (not the batch size, world size or limit: resuming with
    other values of those is safe). `regional_cot` is recorded so CoT and plain answers are never merged."""
    return {"model": os.path.realpath(str(model_path)), "dtype": str(dtype), "quantization": quantization,
            "generation": generation, "benchmark": bench.name, "annotation": os.path.realpath(annotation),
            "regional_cot": bool(regional_cot)}


def check_resume(bench_dir: Path, settings: dict[str, Any], overwrite: bool) -> bool:
    """Refuse (`ResumeMismatchError`) to add to predictions made with other settings unless `overwrite`; return
    whether old outputs must be moved aside. Read-only: every rank calls it before any model is loaded."""
    check_output_dir(bench_dir, must_be_empty=False, what="benchmark output directory")
    recorded_path = bench_dir / SETTINGS_FILE
    has_predictions = any((bench_dir / "predictions").glob("rank*.jsonl"))
    recorded = None
    if recorded_path.is_file():
        try:
            recorded = json.loads(recorded_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            recorded = {"unreadable": True}
        if not isinstance(recorded, dict):
            recorded = {"unreadable": True}  # valid JSON but not a settings object
        recorded.setdefault("regional_cot", False)  # files written before the flag existed: plain answers
    settings = json.loads(json.dumps(settings, sort_keys=True))  # compare as recorded (tuples -> lists)
    differs = has_predictions and recorded != settings
    if differs and not overwrite:
        if recorded is None:
            why = f"no {SETTINGS_FILE} records what made them"
        else:
            keys = sorted(k for k in set(settings) | set(recorded) if settings.get(k) != recorded.get(k))
            why = "; ".join(f"{k}: recorded {recorded.get(k)!r}, now {settings.get(k)!r}" for k in keys)
        raise ResumeMismatchError(f"{bench_dir} holds predictions made differently ({why}); resuming would merge "
                                  "two runs. Use another --out, or --overwrite to start over (old files are kept "
                                  "in a replaced-N folder)")
    return has_predictions and (differs or overwrite)


def start_benchmark_dir(bench_dir: Path, settings: dict[str, Any], move_aside: bool) -> None:
    """Rank 0: move old outputs to `bench_dir/replaced-<n>/` (never deleted) when asked; record `settings`."""
    if move_aside:
        n = 1
        while (bench_dir / f"replaced-{n}").exists():
            n += 1
        aside = bench_dir / f"replaced-{n}"
        aside.mkdir()
        for child in list(bench_dir.iterdir()):
            if child != aside and not child.name.startswith("replaced-"):
                os.rename(child, aside / child.name)
    bench_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(bench_dir / SETTINGS_FILE, json.dumps(settings, indent=2, sort_keys=True) + "\n")


def _row(sample: Sample, bench: Benchmark, image_root: Path, prediction: Any, rank: int) -> dict[str, Any]:
    """One prediction line; a Regional CoT answer adds its step-one regions and raw step-one answer."""
    cot = prediction.record_fields() if isinstance(prediction, CotAnswer) else {}
    text = prediction.answer if isinstance(prediction, CotAnswer) else prediction
    return {"id": sample.id, "prediction": text, "reference": sample.reference, "question": sample.question,
            "image": sample.image_rel, "image_root": str(image_root), "hw": sample.hw, "lang": sample.lang,
            "answer_type": sample.answer_type, "benchmark": bench.name, "annotation": sample.source, "rank": rank,
            **cot}


def generate_benchmark(bench: Benchmark, generator: Any, cfg: RunConfig, info: DistInfo) -> tuple[list[Sample],
                                                                                                   list[RecordProblem]]:
    """Generate this rank's unfinished share of `bench`; return (all samples, annotation problems)."""
    samples, problems, image_root = load_samples(bench, cfg.data_dir)
    if cfg.limit is not None:
        samples = samples[: cfg.limit]
    pred_dir = cfg.out / bench.name / "predictions"
    pred_dir.mkdir(parents=True, exist_ok=True)
    mine = pred_dir / f"rank{info.rank}.jsonl"
    info.barrier()
    removed = _repair_tail(mine)
    if removed:
        print(f"{mine}: removed a half-written last line ({removed} bytes); that sample is generated again",
              file=sys.stderr)
    info.barrier()
    done = finished_ids(pred_dir)
    todo = [s for i, s in enumerate(samples) if i % info.world_size == info.rank and s.id not in done]
    requests = [GenerationRequest(s.question, images=s.images, id=s.id, lang=s.lang) for s in todo]
    bar = tqdm(total=len(todo), desc=f"{bench.name} [rank {info.rank}]", disable=info.rank != 0 or not todo,
               dynamic_ncols=True)
    errors_path = cfg.out / bench.name / "generation_errors.jsonl"
    if cfg.regional_cot:
        generator = RegionalCotGenerator(generator)
    for batch in _safe_batches(generator, requests, errors_path, info.rank):
        append_jsonl(mine, (_row(todo[i], bench, image_root, text, info.rank) for i, text in batch))
        bar.update(len(batch))
    bar.close()
    info.barrier()
    return samples, problems


def _safe_batches(generator: Any, requests: list, errors_path: Path, rank: int):
    """Batches of (index, text); a failing batch is retried one request at a time, failures logged, not fatal."""
    queue = batch_order(requests, generator.batch_size)
    while queue:
        idx = queue.pop(0)
        try:
            yield list(zip(idx, generator.generate_batch([requests[i] for i in idx])))
        except (ImageLoadError, OSError, ValueError) as exc:
            if len(idx) > 1:
                queue[:0] = [[i] for i in idx]
            else:
                append_jsonl(errors_path, [{"id": requests[idx[0]].id, "rank": rank, "error": str(exc)}])


def score_benchmark(bench: Benchmark, samples: Sequence[Sample], problems: Sequence[RecordProblem],
                    cfg: RunConfig, protocol: dict[str, Any]) -> dict[str, Any]:
    """Merge the rank files, check ids against the benchmark, score and write the outputs (rank 0 only)."""
    bdir = cfg.out / bench.name
    merged_path = bdir / "predictions.jsonl"
    records, read_problems, seen = [], [], {}
    for path in sorted((bdir / "predictions").glob("rank*.jsonl")):
        recs, probs = read_predictions(path, seen=seen)  # an id finished twice (two runs): the first answer counts
        records += recs
        read_problems += [p for p in probs if p.reason != "duplicate-id"]
    expected = {s.id for s in samples}
    unmatched = [r for r in records if r.id not in expected]
    records = [r for r in records if r.id in expected]
    all_problems = list(problems) + read_problems
    all_problems += [problem_at(r.source, "unmatched-id", f"id {r.id!r} is not in benchmark {bench.name}; not scored")
                     for r in unmatched]
    missing = [s for s in samples if s.id not in seen]
    all_problems += [problem_at(s.source, "missing-prediction", f"no prediction for id {s.id!r}") for s in missing[:50]]
    atomic_write_text(merged_path, "".join(
        json.dumps({**{k: getattr(r, k) for k in MERGED_FIELDS}, **{k: r.extra[k] for k in COT_FIELDS if k in r.extra}},
                   ensure_ascii=False) + "\n" for r in records))
    score_cfg = bench.score_config(compat=cfg.compat, bertscore_model=cfg.bertscore_model,
                                   bertscore_layer=cfg.bertscore_layer)
    if score_cfg.options == "from_references":  # per language: the split's samples know theirs
        score_cfg.options = reference_options([(s.lang or "en", s.reference) for s in samples], bench.multilabel)
    result = score_records(records, score_cfg, all_problems)
    result.counts["benchmark_samples"] = len(samples)
    result.counts["missing_predictions"] = len(missing)
    result.counts["unmatched_ids"] = len(unmatched)
    if bench.size is not None:
        result.counts["expected_size"] = bench.size
    summary = summarize(result, score_cfg, protocol, benchmark=bench.name)
    write_outputs(bdir, summary, result.rows, image_root=bench.locate(cfg.data_dir)[1])
    return summary


def run_benchmarks(model_path: str, benchmarks: Sequence[Benchmark], cfg: RunConfig, settings: Any,
                   dtype: str | None = None, device_map: str | None = None, load_in_8bit: bool = False,
                   load_in_4bit: bool = False) -> dict[str, dict]:
    """Load the model once per rank, generate every benchmark, score on rank 0; return {name: summary}. ``dtype``
    None takes `internvl.inference.default_dtype` (float32 on CPU, bf16 on GPUs that support it)."""
    info = init_distributed()
    dtype = dtype or default_dtype()
    # fail on missing data, a bad --out or a resume with other settings before loading a 40B model
    check_output_dir(cfg.out, inputs=[model_path, cfg.data_dir], must_be_empty=False, what="--out")
    quantization = "8bit" if load_in_8bit else "4bit" if load_in_4bit else None
    starts = []
    for bench in benchmarks:
        annotation, _ = bench.locate(cfg.data_dir)
        recorded = run_settings(model_path, dtype, quantization, settings.as_dict(), bench, annotation,
                                cfg.regional_cot)
        starts.append((cfg.out / bench.name, recorded, check_resume(cfg.out / bench.name, recorded, cfg.overwrite)))
    info.barrier()
    if info.rank == 0:
        for bench_dir, recorded, move_aside in starts:
            start_benchmark_dir(bench_dir, recorded, move_aside)
    info.barrier()
    model, tokenizer = load_model_and_tokenizer(model_path, dtype=dtype, device_map=device_map, device=info.device,
                                                load_in_8bit=load_in_8bit, load_in_4bit=load_in_4bit)
    generator = Generator(model, tokenizer, settings, batch_size=cfg.batch_size)
    summaries: dict[str, dict] = {}
    for bench in benchmarks:
        samples, problems = generate_benchmark(bench, generator, cfg, info)
        if info.rank == 0 and cfg.score:
            protocol = protocol_info(model=str(model_path), template=getattr(model, "template", None),
                                     system_message=getattr(model, "system_message", None),
                                     generation=settings.as_dict(), batch_size=cfg.batch_size,
                                     world_size=info.world_size, dtype=str(dtype), benchmark=bench.name,
                                     benchmark_file=bench.file, compat=cfg.compat, limit=cfg.limit)
            summaries[bench.name] = score_benchmark(bench, samples, problems, cfg, protocol)
        info.barrier()
    info.close()
    return summaries
