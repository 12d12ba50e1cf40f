"""Benchmark registry: the paper's test splits, MedReg-mini and user splits, as YAML data files.

Each `*.yaml` in this folder (and each `--benchmark-file`) has a top-level `benchmarks:` mapping of name -> entry;
docs/evaluation.md ("Benchmarks") documents every key. The data dir is --data-dir or $MEDREGA_DATA.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from internvl.data.prompts import render_base_prompt
from internvl.data.records import RecordChecker, RecordProblem, image_paths, read_jsonl, resolve_image
from medrega_eval.io import LANGS
from medrega_eval.metrics.text import has_cjk
from medrega_eval.score import REPORT_METRICS, SUBTYPES, TASKS, ScoreConfig, options_in

__all__ = ["Benchmark", "BenchmarkError", "MissingData", "Sample", "load_registry", "data_dir_from", "load_samples",
           "reference_options"]

HERE = Path(__file__).resolve().parent


class BenchmarkError(ValueError):
    """A registry file or entry is malformed (names the file and the benchmark)."""


class MissingData(FileNotFoundError):
    """A benchmark's files are not where the registry says; the message says what to download and where to put it."""


@dataclass
class Benchmark:
    """One registered test split (see the module docstring for the fields)."""

    name: str
    task: str
    annotation: str
    file: str
    image_root: str | None = None
    lang: str = "auto"
    subtype: str | None = None
    prompt: Any = None
    options: Any = None
    multilabel: bool = False
    metrics: list[str] = field(default_factory=list)
    size: int | None = None
    download: str = ""
    roots: list[str] = field(default_factory=lambda: [""])
    description: str = ""

    def _candidates(self, data_dir: Path | None) -> list[Path]:
        out = []
        for root in self.roots:
            if root.startswith("@repo/"):
                out.append(HERE.parents[2] / root[len("@repo/"):])
            elif root.startswith("@cwd/"):
                out.append(Path.cwd() / root[len("@cwd/"):])
            elif data_dir is not None:
                out.append(data_dir / root)
        return out

    def locate(self, data_dir: str | Path | None) -> tuple[Path, Path]:
        """(annotation file, image root) under the first data root that has the annotation; MissingData otherwise."""
        data = Path(data_dir) if data_dir else None
        tried = []
        for root in self._candidates(data):
            ann = root / self.annotation
            tried.append(str(ann))
            if ann.is_file():
                images = root / self.image_root if self.image_root else root
                if not images.is_dir():
                    raise MissingData(f"benchmark {self.name}: image folder {images} not found. {self.download}")
                return ann, images
        where = ", ".join(tried) if tried else "(no data directory: pass --data-dir or set MEDREGA_DATA)"
        raise MissingData(f"benchmark {self.name}: annotation not found (looked for {where}). "
                          f"What to get: {self.download or 'see ' + self.file}")

    def render_prompt(self, lang: str) -> str | None:
        """The task prompt to prepend for a record in `lang` (None when the records carry their own)."""
        if self.prompt is None or isinstance(self.prompt, str):
            return self.prompt
        spec = dict(self.prompt)
        task = spec.pop("task")
        if self.task == "classification":
            options = options_in(self.options, lang)
            spec.setdefault("options", options if isinstance(options, list) else None)  # not from_references
        return render_base_prompt(task, lang, **spec)

    def score_config(self, **fields: Any) -> ScoreConfig:
        """How this split is scored: its task, language, subtype, options, multilabel flag and the report metrics it
        lists (`options` may still be "from_references"); `fields` (compat, BERTScore) are passed on."""
        metrics = [m for m in self.metrics if m in REPORT_METRICS] if self.task in ("report", "grounded_report") else []
        return ScoreConfig(task=self.task, lang=None if self.lang == "auto" else self.lang, subtype=self.subtype,
                           options=self.options, multilabel=self.multilabel, metrics=metrics or None, **fields)


def _check_entry(name: str, entry: Any, file: str) -> Benchmark:
    where = f"{file}: benchmark {name!r}"
    if not isinstance(entry, dict):
        raise BenchmarkError(f"{where}: expected a mapping, got {type(entry).__name__}")
    keys = {f.name for f in fields(Benchmark)} - {"name", "file"}
    unknown = sorted(set(entry) - keys)
    if unknown:
        raise BenchmarkError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(keys)}")
    for key in ("task", "annotation"):
        if not entry.get(key):
            raise BenchmarkError(f"{where}: missing required key {key!r}")
    for key, allowed in (("task", TASKS), ("lang", ("auto", *LANGS)), ("subtype", (None, *SUBTYPES))):
        if key in entry and entry[key] not in allowed:
            raise BenchmarkError(f"{where}: {key} {entry[key]!r} is not one of {', '.join(filter(None, allowed))}")
    options = entry.get("options")
    if entry["task"] == "classification":
        ok = (options == "from_references" or (isinstance(options, list) and options)
              or (isinstance(options, dict) and all(isinstance(v, list) and v for v in options.values())))
        if not ok:
            raise BenchmarkError(f"{where}: classification needs options (a list, {{en: [...], zh: [...]}} "
                                 "or from_references)")
    prompt = entry.get("prompt")
    if not (prompt is None or isinstance(prompt, str) or (isinstance(prompt, dict) and "task" in prompt)):
        raise BenchmarkError(f"{where}: prompt must be null, a string or a mapping with a 'task' key")
    roots = entry.get("roots", [""])
    if not isinstance(roots, list) or not all(isinstance(r, str) for r in roots):
        raise BenchmarkError(f"{where}: roots must be a list of strings")
    return Benchmark(name=name, file=file, roots=roots, **{k: v for k, v in entry.items() if k != "roots"})


def load_registry(extra_files: Sequence[str | Path] = ()) -> dict[str, Benchmark]:
    """Every shipped benchmark plus those of `extra_files` (a user entry may not reuse a shipped name)."""
    registry: dict[str, Benchmark] = {}
    files = sorted(HERE.glob("*.yaml")) + [Path(f) for f in extra_files]
    for path in files:
        if not path.is_file():
            raise BenchmarkError(f"{path}: benchmark file not found")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = mark.line + 1 if mark is not None else 0
            raise BenchmarkError(f"{path}:{line}: invalid YAML: {getattr(exc, 'problem', exc)}") from None
        if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), dict):
            raise BenchmarkError(f"{path}: expected a top-level 'benchmarks:' mapping")
        for name, entry in data["benchmarks"].items():
            if name in registry:
                raise BenchmarkError(f"{path}: benchmark {name!r} is already defined in {registry[name].file}")
            registry[name] = _check_entry(str(name), entry, str(path))
    return registry


def reference_options(references: Iterable[tuple[str, str]], multilabel: bool) -> dict[str, list[str]]:
    """`options: from_references` for (language, reference) pairs: per language, the distinct reference labels in
    first-seen order (multilabel references split on ","). The one rule of `run` and `score --benchmark`."""
    by_lang: dict[str, dict[str, None]] = {}
    for lang, ref in references:
        labels = by_lang.setdefault(lang, {})
        labels.update(dict.fromkeys(x.strip() for x in (ref.split(",") if multilabel else [ref]) if x.strip()))
    return {lang: list(labels) for lang, labels in by_lang.items()}


def data_dir_from(arg: str | Path | None) -> Path | None:
    """--data-dir if given, else $MEDREGA_DATA, else None."""
    value = arg or os.environ.get("MEDREGA_DATA")
    return Path(value) if value else None


@dataclass
class Sample:
    """One test sample: the prompt to generate from, the reference, and what the scorer needs."""

    id: str
    question: str
    reference: str
    images: list[Path]
    source: str
    lang: str | None
    hw: list[float] | None = None
    answer_type: str | None = None
    image_rel: str | None = None


def _apply_prompt(question: str, prompt: str | None, has_image: bool) -> str:
    if not prompt or question.lstrip().startswith(prompt.strip()):
        return question
    if "<image>" in question or not has_image:
        return f"{prompt} {question}"
    return f"{prompt} <image>\n{question}"  # the original inference order: base prompt, image, question


def load_samples(bench: Benchmark, data_dir: str | Path | None) -> tuple[list[Sample], list[RecordProblem], Path]:
    """Read a benchmark's annotation: (samples, problems, image root). Any error in one record (a missing image, a
    field of the wrong type, a path the file system cannot hold ...) is a ``FILE:LINE`` problem; the rest is read."""
    ann, image_root = bench.locate(data_dir)
    file = str(ann)
    samples, problems, seen = [], [], {}
    for line, rec in read_jsonl(ann):
        if isinstance(rec, RecordProblem):
            problems.append(rec)
            continue
        try:
            item = _sample(bench, rec, ann, line, image_root, seen)
        except Exception as exc:  # noqa: BLE001 - one hostile record never stops the benchmark
            item = RecordProblem(file, line, "bad-record", f"{type(exc).__name__}: {str(exc)[:200]}")
        (problems if isinstance(item, RecordProblem) else samples).append(item)
    return samples, problems, image_root


def _sample(bench: Benchmark, rec: dict, ann: Path, line: int, image_root: Path,
            seen: dict[str, int]) -> Sample | RecordProblem:
    """One annotation record -> a Sample, or the RecordProblem that keeps it out."""
    file = str(ann)
    for key in ("answer_type", "lang"):  # (RecordChecker checks `image`)
        if rec.get(key) is not None and not isinstance(rec[key], str):
            return RecordProblem(file, line, "bad-field", f"{key!r} has the wrong type ({type(rec[key]).__name__})")
    checked = RecordChecker(image_root=image_root, image_check="none").check(rec, file=file, line=line)
    if checked:  # the record rules of training and `medrega-data check`: human/gpt turns, fields, placeholders, boxes
        return checked[0]
    conv = rec["conversations"]  # checked: alternating human/gpt turns with text, ending with an answer
    rid = str(rec.get("id", f"{ann.name}:{line}"))
    if rid in seen:
        return RecordProblem(file, line, "duplicate-id", f"id {rid!r} already used at line {seen[rid]}")
    seen[rid] = line
    rels = image_paths(rec)
    paths = []
    for rel in rels:
        try:
            p = resolve_image(rel, image_root)
            if not p.is_file():
                raise ValueError(f"image {rel!r} not found under {image_root}")
        except (ValueError, OSError) as exc:
            return RecordProblem(file, line, "image-not-found", str(exc))
        paths.append(p)
    lang = rec.get("lang") if rec.get("lang") in LANGS else (None if bench.lang == "auto" else bench.lang)
    if lang is None:
        lang = "zh" if has_cjk(conv[1]["value"]) or has_cjk(conv[0]["value"]) else "en"
    hw = [rec["height"], rec["width"]] if all(isinstance(rec.get(k), int) for k in ("height", "width")) else None
    question = _apply_prompt(conv[0]["value"], bench.render_prompt(lang), bool(paths))
    return Sample(id=rid, question=question, reference=conv[1]["value"], images=paths, source=f"{file}:{line}",
                  lang=lang, hw=hw, answer_type=rec.get("answer_type"), image_rel=rels[0] if rels else None)
