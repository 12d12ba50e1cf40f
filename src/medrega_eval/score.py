"""Score prediction records for one task: per-sample rows + corpus metrics under the top-level summary names.

`compat="medrega"` switches every task to the original MedRegA scorers (docs/evaluation.md lists each difference).
Bad references are problems and left out of the metrics; bad *predictions* are always scored (as wrong / a miss).
"""
from __future__ import annotations

import dataclasses
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from internvl.data.records import RecordProblem
from internvl.regions import has_regions, remove_box_text_original, remove_region_tags, strip_regions
from medrega_eval.io import LANGS, PredictionRecord, ScoreInputError, problem_at
from medrega_eval.metrics import classification as cls_m
from medrega_eval.metrics import medrega_regions as orig_m
from medrega_eval.metrics import regions as reg_m
from medrega_eval.metrics import text as text_m
from medrega_eval.metrics import vqa as vqa_m
from medrega_eval.metrics.medrega_report import (mean_or_none, medrega_clean_report_en, medrega_clean_report_zh,
                                                 report_metrics_medrega)

__all__ = ["TASKS", "SUBTYPES", "REPORT_METRICS", "ScoreConfig", "ScoreResult", "ScoreInputError", "score_records",
           "record_lang", "compat_vqa_lang", "medrega_clean_report_en", "medrega_clean_report_zh"]

TASKS = ("vqa", "report", "classification", "region2text", "text2region", "grounded_report")
SUBTYPES = ("ss", "sm", "ms", "mm")
REPORT_METRICS = ("bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rougeL", "cider")


@dataclass
class ScoreConfig:
    """What to score and how. `options` may be a list or {lang: list} (classification); `metrics` limits report
    metrics (e.g. leave out METEOR on a machine without Java)."""

    task: str
    lang: str | None = None
    subtype: str | None = None
    compat: str | None = None
    options: list[str] | dict[str, list[str]] | None = None
    multilabel: bool = False
    metrics: list[str] | None = None
    bertscore_model: str | None = None  # local model dir; BERTScore is computed only when given
    bertscore_layer: int | None = None  # hidden layer; default: the last (compat: 40 for en, 9 for zh, as the original)

    def validate(self) -> None:
        """Raise ScoreInputError (a ValueError) for an unknown task, language, subtype, compat mode or metric: the CLI's
        choices check them too, but `score_records` is public and its callers pass a config directly."""
        for what, value, allowed in (("task", self.task, TASKS), ("language", self.lang, (None, "auto", *LANGS)),
                                     ("subtype", self.subtype, (None, *SUBTYPES)),
                                     ("compat mode", self.compat, (None, "medrega"))):
            if value not in allowed:
                raise ScoreInputError(f"unknown {what} {value!r}; choose one of {', '.join(filter(None, allowed))}")
        if self.compat == "medrega" and self.task == "text2region" and self.subtype is None:
            raise ScoreInputError("--compat medrega for text2region needs --subtype (ss, sm, ms or mm): "
                                  "the original has one scorer per subtype")
        if self.metrics:
            unknown = sorted(set(self.metrics) - set(REPORT_METRICS) - {"rouge1"})
            if unknown:
                raise ScoreInputError(f"unknown report metric(s) {unknown}; choose from {', '.join(REPORT_METRICS)}")


@dataclass
class ScoreResult:
    """metrics: top-level summary names; details: everything else; rows: one per scored sample."""

    metrics: dict[str, Any]
    details: dict[str, Any]
    rows: list[dict]
    problems: list[RecordProblem] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)


def record_lang(rec: PredictionRecord, cfg: ScoreConfig) -> str:
    """The record's language: its own field, the configured one, else 'zh' when the reference has CJK."""
    if rec.lang:
        return rec.lang
    if cfg.lang in LANGS:
        return cfg.lang
    return "zh" if text_m.has_cjk(rec.reference) else "en"


def _row(rec: PredictionRecord, lang: str, scores: dict[str, Any], **extra: Any) -> dict:
    optional = {"question": rec.question, "image": rec.image, "image_root": rec.image and rec.image_root or None,
                "hw": rec.hw, **{k: rec.extra.get(k) for k in ("cot_regions", "cot_step_one")}}  # Regional CoT
    return {"id": rec.id, "source": rec.source, "lang": lang, "prediction": rec.prediction, "reference": rec.reference,
            "scores": scores, **{k: v for k, v in optional.items() if v is not None}, **extra}


# ---------------------------------------------------------------------------------------------------- reports
_DEID = re.compile(r"_{2,}")


def _report_tokens(text: str, lang: str) -> list[str]:
    """Default report tokens: pycocoevalcap-style PTB tokens (EN) or jieba segments (ZH); MIMIC '___' removed."""
    return text_m.tokenize(_DEID.sub(" ", text), lang)


def _report_metrics(preds: list[str], refs: list[str], langs: list[str], cfg: ScoreConfig,
                    result: ScoreResult) -> tuple[dict[str, Any], list[dict[str, float]]]:
    """Corpus and per-sample report metrics for parallel lists of texts."""
    wanted = set(cfg.metrics or REPORT_METRICS)
    if not preds:
        return {}, []
    if cfg.compat == "medrega":
        return report_metrics_medrega(preds, refs, langs, wanted, result)
    cands = [_report_tokens(p, lang) for p, lang in zip(preds, langs)]
    gts = [[_report_tokens(r, lang)] for r, lang in zip(refs, langs)]
    bleu, bleu_per = text_m.coco_bleu(cands, gts, n=4)
    computed = {f"bleu{k + 1}": (bleu[k], bleu_per[k]) for k in range(4)}
    out: dict[str, Any] = {}
    for name, metric in (("rougeL", text_m.corpus_rouge_l), ("cider", text_m.coco_cider),
                         ("meteor", text_m.coco_meteor)):
        try:
            if name in wanted:
                computed[name] = metric(cands, gts)
        except text_m.MetricUnavailable as exc:
            out[name] = None
            result.unavailable[name] = str(exc)
    per = [{} for _ in preds]
    for name, (corpus, scores) in computed.items():
        if name in wanted:
            out[name] = corpus
            for row, value in zip(per, scores):
                row[name] = value
    return out, per


# ------------------------------------------------------------------------------------------------- per task
def _original_ds_name(source: str) -> str:
    """The original scripts' dataset name: the first two "_"-separated fields of the answer file's name."""
    file = source.rpartition(":")[0] or source
    return "_".join(Path(file).name.split("_")[0:2])


def compat_vqa_lang(records: Sequence[PredictionRecord], cfg: ScoreConfig) -> str:
    """One language for a whole compat VQA split: --lang, or every record's own `lang` when they agree, else the
    original's rule ("zh" in the file name's dataset part); a split that rule calls English but whose references
    contain CJK is refused (ScoreInputError: pass --lang)."""
    if cfg.lang in LANGS:
        return cfg.lang
    langs = {r.lang for r in records}
    if len(langs) == 1 and None not in langs:
        return langs.pop()  # type: ignore[return-value]
    if not records:
        return "en"
    ds_name = _original_ds_name(records[-1].source)
    if "zh" in ds_name:
        return "zh"
    cjk = sum(text_m.has_cjk(r.reference) for r in records)
    if cjk:
        raise ScoreInputError(
            f"--compat medrega VQA: {cjk} of {len(records)} references contain Chinese characters, but the file name's "
            f"dataset part {ds_name!r} has no 'zh', so the original would score the split with its English rules; "
            "pass --lang zh (Chinese rules) or --lang en (what the original does with this file name)")
    return "en"


def _score_vqa(records, cfg, result) -> None:
    samples = []
    split_lang = compat_vqa_lang(records, cfg) if cfg.compat == "medrega" else None
    if split_lang:
        result.details["compat_lang"] = split_lang
    for rec in records:
        lang = split_lang or record_lang(rec, cfg)
        s = vqa_m.score_vqa_sample(rec.prediction, rec.reference, lang, rec.answer_type, cfg.compat)
        samples.append(s)
        result.rows.append(_row(rec, lang, dataclasses.asdict(s)))
    agg = vqa_m.aggregate_vqa(samples, cfg.compat)
    for k in ("closed_accuracy", "open_recall", "open_accuracy", "token_f1", "recall", "bleu1", "exact_match"):
        result.metrics[k] = agg[k]
        if cfg.compat == "medrega" and agg[k] is None:
            result.unavailable[k] = vqa_m.NO_OPEN_REASON
    result.details.update(num_closed=agg["num_closed"], num_open=agg["num_open"])
    # "locate X" for an absent X: the reference says "not visible"; right when the prediction says so and draws no box
    absent = [vqa_m.says_not_visible(r.prediction) and not has_regions(r.prediction)
              for r in records if vqa_m.says_not_visible(r.reference)]
    if absent:
        result.metrics["absent_accuracy"] = mean_or_none(absent)
        result.counts["absent_questions"] = len(absent)


def _language_match(records: Sequence[PredictionRecord], result: ScoreResult) -> None:
    """lang_match: share of answers in the question's language (CJK-share rule), over records whose reference is in
    the question's language (a Chinese question answered "CT" says nothing about the answer's language)."""
    hits: dict[str, list[bool]] = {"en": [], "zh": []}
    for rec in records:
        q = text_m.text_language(rec.question) if rec.question else None
        if q is None or text_m.text_language(rec.reference) != q:
            continue
        hits[q].append(text_m.text_language(rec.prediction) == q)
    both = hits["en"] + hits["zh"]
    if both:
        result.metrics["lang_match"] = mean_or_none(both)
        result.details.update(lang_match_en=mean_or_none(hits["en"]), lang_match_zh=mean_or_none(hits["zh"]))
        result.counts["lang_match_records"] = len(both)


def options_in(options: Any, lang: str) -> Any:
    """The option list for `lang` of a split's `options` (one list, or one list per language)."""
    return options.get(lang) if isinstance(options, dict) else options


def _options_for(rec: PredictionRecord, lang: str, cfg: ScoreConfig) -> list[str] | None:
    return rec.options or options_in(cfg.options, lang)


def _score_classification(records, cfg, result) -> None:
    all_options: dict[str, None] = {}  # every record's options, in first-seen order
    for rec in records:
        lang = record_lang(rec, cfg)
        options = _options_for(rec, lang, cfg)
        if not options:
            result.problems.append(problem_at(rec.source, "no-options", "no option list for this record: give the "
                                              "record an 'options' field, --options, or a benchmark with options"))
            continue
        try:
            truth = cls_m.reference_labels(rec.reference, options, cfg.multilabel, cfg.compat)
        except cls_m.UnknownLabel as exc:
            result.problems.append(problem_at(rec.source, "unknown-label", str(exc)))
            continue
        labels, unmapped = cls_m.map_answer(rec.prediction, options, cfg.multilabel, cfg.compat)
        all_options.update(dict.fromkeys(options))
        result.rows.append(_row(rec, lang, {"correct": set(truth) == set(labels)}, reference_labels=truth,
                                predicted_labels=labels, unmapped=unmapped))
    truths, predicted = [r["reference_labels"] for r in result.rows], [r["predicted_labels"] for r in result.rows]
    result.metrics.update(cls_m.classification_metrics(truths, predicted, list(all_options), cfg.multilabel,
                                                       cfg.compat))
    result.counts["unmapped_answers"] = sum(bool(r["unmapped"]) for r in result.rows)


def _region2text_original(text: str) -> str:
    return remove_box_text_original(text.lower())


def _score_region2text(records, cfg, result) -> None:
    for rec in records:
        lang = record_lang(rec, cfg)
        if cfg.compat == "medrega":
            pred = _region2text_original(rec.prediction).split()
            ref = rec.reference.lower().split()
        else:
            clean = text_m.BOX_TEXT_RE.sub(" ", rec.prediction).replace("<ref>", "").replace("</ref>", "")
            pred = text_m.tokenize(clean, lang)
            ref = text_m.tokenize(rec.reference.replace("<ref>", "").replace("</ref>", ""), lang)
        recall, f1 = (text_m.token_set_scores(pred, ref)[k] for k in ("recall", "f1"))
        if cfg.compat == "medrega":
            f1 = vqa_m._medrega_f1(set(pred), set(ref))
        result.rows.append(_row(rec, lang, {"bleu1": text_m.sentence_bleu1(pred, [ref]), "token_f1": f1,
                                            "recall": recall, "correct": recall >= vqa_m.OPEN_ACCURACY_RECALL}))
    for name, key in (("bleu1", "bleu1"), ("token_f1", "token_f1"), ("recall", "recall"), ("accuracy", "correct")):
        result.metrics[name] = mean_or_none([float(row["scores"][key]) for row in result.rows])


def _region_part(records, cfg, result) -> list[tuple[int, dict]]:
    """Box metrics of text2region / grounded_report; appends rows (or extends rows already made)."""
    preds, refs, samples, kept_rows, errors = [], [], [], [], []
    for k, rec in enumerate(records):
        lang = record_lang(rec, cfg)
        ref = reg_m.parse_for_scoring(rec.reference, rec.hw)
        if ref.errors or not ref.boxes:
            reason = "; ".join(ref.errors) if ref.errors else "the reference has no box"
            result.problems.append(problem_at(rec.source, "bad-reference-boxes", reason))
            continue
        pred = reg_m.parse_for_scoring(rec.prediction, rec.hw)
        errors += [f"{rec.source}: id {rec.id}: prediction box ignored: {err}" for err in pred.errors]
        unparsable = not pred.boxes
        sample = reg_m.score_region_sample(pred.boxes, ref.boxes, unparsable)
        samples.append(sample)
        preds.append(pred.boxes)
        refs.append(ref.boxes)
        row = _row(rec, lang, sample.scores,
                   pred_boxes=[{"name": b.name, "box": list(b.grid)} for b in pred.boxes],
                   ref_boxes=[{"name": b.name, "box": list(b.grid)} for b in ref.boxes],
                   matches=[{"pred": i, "ref": j, "iou": iou} for i, j, iou in sample.pairs],
                   parse_errors=pred.errors, unparsable=unparsable)
        kept_rows.append((k, row))
    agg = reg_m.aggregate_regions(samples)
    top = ("iou", "acc25", "acc50", "acc75", "precision", "recall", "f1")
    if cfg.compat == "medrega" and cfg.task == "text2region":
        result.details["default_metrics"] = {k: agg.get(k) for k in top}
        _compat_text2region(records, cfg, result, dict(kept_rows))
    else:
        result.metrics.update({k: agg.get(k) for k in top})
    result.metrics["map50"] = reg_m.coco_map50(preds, refs) if refs else None
    # share of predictions with at least one parseable box (free-form Text-to-Region prompts must give a box)
    result.metrics["box_rate"] = mean_or_none([not s.unparsable for s in samples])
    result.details.update({k: v for k, v in agg.items() if k not in top})
    result.counts["unparsable_predictions"] = agg.get("unparsable", 0)
    result.counts["malformed_pred_boxes"] = len(errors)
    if errors:
        result.details["malformed_pred_box_examples"] = errors[:20]
    return kept_rows


def _compat_text2region(records, cfg, result, rows: dict[int, dict]) -> None:
    """The original regt2r scorer on *every* record: its names in details.medrega (ss: its printed 4-decimal
    strings), the summary names at the top level, None + `unavailable` where it raises."""
    values, unreadable = [], 0
    try:
        for k, rec in enumerate(records):
            if rec.hw is None:
                raise orig_m.OriginalCrash(f"{rec.source}: no hw (the original needs the image size)")
            try:
                pred = orig_m.parse_prediction(rec.prediction, rec.hw)
                v = orig_m.sample_values(pred, orig_m.parse_reference(rec.reference, rec.hw), cfg.subtype)
            except orig_m.OriginalCrash as exc:
                raise orig_m.OriginalCrash(f"{rec.source}: {exc}") from None
            values.append(v)
            unreadable += pred.failure is not None
            if k in rows:
                rows[k]["medrega"] = {**v, "unreadable_box_list": pred.failure}
    except orig_m.OriginalCrash as exc:
        result.details["medrega"] = {n: None for n in orig_m.metric_names(cfg.subtype)}
        for top in orig_m.TOP[cfg.subtype]:
            result.metrics[top] = None
            result.unavailable[top] = f"the original scorer crashes on this file: {exc}"
        return
    original, why = orig_m.aggregate(values, cfg.subtype)
    result.details["medrega"] = original
    result.counts["medrega_unreadable_box_lists"] = unreadable
    for top, name in orig_m.TOP[cfg.subtype].items():
        value = original.get(name)
        if cfg.subtype == "ss" and value is not None:  # full precision at the top level, the strings in details
            ious = [v["iou"] for v in values]
            value = sum(ious) / len(ious) if top == "iou" else sum(i > int(top[3:]) / 100 for i in ious) / len(ious)
        result.metrics[top] = value
        if name in why:
            result.unavailable[top] = why[name]
    for name, reason in why.items():
        result.unavailable.setdefault(f"medrega.{name}", reason)


def _score_report(records, cfg, result, grounded: bool = False) -> None:
    langs = [record_lang(r, cfg) for r in records]
    clean = strip_regions if grounded else str  # grounded reports: text metrics on the text without its regions
    preds, refs = [clean(r.prediction) for r in records], [clean(r.reference) for r in records]
    out, per = _report_metrics(preds, refs, langs, cfg, result)
    result.metrics.update(out)
    if grounded:
        # every record gets text scores; region scores only where the reference boxes parse
        region_rows = dict(_region_part(records, cfg, result))
        for k, rec in enumerate(records):
            row = region_rows.get(k) or _row(rec, langs[k], {})
            row["scores"] = {**per[k], **row["scores"]}
            row["text_prediction"], row["text_reference"] = preds[k], refs[k]
            result.rows.append(row)
    else:
        for rec, lang, scores in zip(records, langs, per):
            result.rows.append(_row(rec, lang, scores))


# (task, language or None for both) -> how the original scorers clean (predictions, references) before bert-score
_COMPAT_BERTSCORE_CLEAN = {
    ("vqa", "en"): (vqa_m.medrega_clean_en, vqa_m.medrega_clean_en),
    ("region2text", None): (_region2text_original, str.lower),  # the same in both languages
    ("report", "en"): (medrega_clean_report_en, medrega_clean_report_en),
    ("report", "zh"): (lambda p: medrega_clean_report_zh(p).replace(" ", ""), str),
}


def _bertscore(records, cfg, result) -> None:
    """BERTScore F1 from the local model; one row per record, in order (grounded: on the box-free text)."""
    from medrega_eval.metrics.model_based import ORIGINAL_LAYERS, bertscore

    layer, original = cfg.bertscore_layer, cfg.compat == "medrega"
    clean_pred = clean_ref = strip_regions if cfg.task == "grounded_report" else str
    if original:
        langs = {row["lang"] for row in result.rows}
        lang = result.details.get("compat_lang") or (langs.pop() if len(langs) == 1 else "en")
        table = _COMPAT_BERTSCORE_CLEAN
        clean_pred, clean_ref = table.get((cfg.task, lang)) or table.get((cfg.task, None)) or (clean_pred, clean_ref)
        layer = layer if layer is not None else ORIGINAL_LAYERS[lang]
    cands, refs = [clean_pred(r.prediction) for r in records], [clean_ref(r.reference) for r in records]
    try:
        mean, per = bertscore(cands, refs, cfg.bertscore_model, layer=layer, original=original)
    except text_m.MetricUnavailable as exc:
        result.metrics["bertscore"] = None
        result.unavailable["bertscore"] = str(exc)
        return
    result.metrics["bertscore"] = mean
    for row, value in zip(result.rows, per):  # one row per record, in order, for every BERTScore task
        row["scores"]["bertscore"] = value


_SCORERS = {"vqa": _score_vqa, "report": _score_report, "grounded_report": partial(_score_report, grounded=True),
            "classification": _score_classification, "region2text": _score_region2text,
            "text2region": lambda recs, cfg, result: result.rows.extend(r for _, r in _region_part(recs, cfg, result))}


def score_records(records: Sequence[PredictionRecord], cfg: ScoreConfig,
                  problems: Sequence[RecordProblem] = ()) -> ScoreResult:
    """Score `records` for `cfg.task`; `problems` from reading the file are carried into the result."""
    cfg.validate()
    result = ScoreResult(metrics={}, details={}, rows=[], problems=list(problems))
    records = list(records)
    if cfg.compat == "medrega":  # the original scored tag-free answers (decoded with skip_special_tokens)
        records = [dataclasses.replace(r, prediction=remove_region_tags(r.prediction)) for r in records]
    result.counts["empty_predictions"] = sum(not r.prediction.strip() for r in records)
    _SCORERS[cfg.task](records, cfg, result)
    if cfg.bertscore_model and cfg.task in ("vqa", "report", "region2text", "grounded_report"):
        _bertscore(records, cfg, result)
    _language_match(records, result)
    result.counts["records"] = len(records)
    result.counts["scored"] = len(result.rows)
    result.details["languages"] = sorted({row["lang"] for row in result.rows})
    return result


# Summary key order: the top-level names first, then compat-only names.
TOP_METRICS = ("bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rougeL", "cider", "closed_accuracy", "open_recall",
               "open_accuracy", "token_f1", "exact_match", "accuracy", "macro_f1", "recall", "iou", "acc25", "acc50",
               "acc75", "precision", "f1", "map50", "rouge1", "bertscore", "box_rate", "absent_accuracy", "lang_match")


def summarize(result: ScoreResult, cfg: ScoreConfig, protocol: dict[str, Any], benchmark: str | None = None,
              max_problems: int = 500) -> dict[str, Any]:
    """The summary.json object: top-level metrics (fractions; CIDEr as pycocoevalcap reports it), counts, problems."""
    counts = {**result.counts, **{f"problem:{r}": n for r, n in Counter(p.reason for p in result.problems).items()}}
    problems = [str(p) for p in result.problems[:max_problems]]
    if len(result.problems) > max_problems:
        problems.append(f"... and {len(result.problems) - max_problems} more")
    return {"task": cfg.task, "benchmark": benchmark, "lang": cfg.lang, "subtype": cfg.subtype, "compat": cfg.compat,
            **{k: result.metrics[k] for k in TOP_METRICS if k in result.metrics},
            "num_samples": counts.get("scored", 0), "counts": counts, "problems": problems,
            "unavailable": dict(result.unavailable), "details": result.details, "protocol": protocol}
