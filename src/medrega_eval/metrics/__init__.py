"""Metric implementations, one module per task family.

`text` holds the tokenizers and the text-overlap metrics every other module builds on (BLEU, ROUGE-L, CIDEr,
METEOR, token-set F1/recall); `vqa`, `classification` and `regions` hold the task-specific rules. Every public
function is pure (no I/O besides METEOR's Java subprocess) so it can be tested on hand-worked inputs.
"""
