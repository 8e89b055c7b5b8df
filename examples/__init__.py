"""Worked examples built on icp_lens; not part of the installed package.

* :mod:`examples.smollm2_case` — the SmolLM2-135M gender case study (pruning and invariance
  fine-tuning), used by ``benchmarks/smollm2_case.py``, ``benchmarks/smollm2_finetune.py`` and
  ``tutorials/06_smollm2_case.py``.

Import from a checkout with the repository root on ``sys.path``: the tests get it from
pytest's ``pythonpath`` setting, the tutorial runner passes it to the kernel in ``PYTHONPATH``,
the benchmark scripts insert it themselves.
"""
