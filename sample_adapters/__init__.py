"""Sample LoRA adapters of Adapter Atlas: seeded task generators, training script and report.

``python -m sample_adapters.train`` rebuilds the tasks and adapters; ``python -m sample_adapters.report``
writes ``sample_adapters/RESULTS.md``.
"""
