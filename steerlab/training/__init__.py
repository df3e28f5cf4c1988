"""Weight edits baked from interventions, data selection, LoRA fine-tuning, export.

Not implemented yet: see the project's training issue.
"""
