"""Fine-tuning of InternVL-Chat / MedRegA: arguments, model building (freezing, LoRA), the Trainer, checkpoints, CLI.

Entry point: `medrega-train` = `python -m internvl.train` (see `internvl.train.cli`).
"""
