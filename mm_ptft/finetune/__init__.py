"""Per-tower fine-tuning under the one Trainer: image / text classification tasks, freeze policies, heads, WiSE-FT,
and the transfer study. The tasks register in ``mm_ptft.tasks.TASKS`` (``classification``, ``text-classification``)
when :mod:`mm_ptft.finetune.tasks` is imported, which :mod:`mm_ptft.tasks` does."""
