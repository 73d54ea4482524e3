"""Evaluation: task files, scores of model outputs, adapters and merges scored on tasks (ANP)."""
