# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 02 · Scoring features by spuriousness
#
# Stage 1 of the method estimates, for every feature `f`, how much intervening on it
# moves the output when the *spurious* attribute changes:
#
# `S(f) = E_x,I [ w(x, I) * |P(M(x | do(f = I(f)))) - P(M(x))| ]`
#
# On an organism the ground truth is known: the planted token drives the answer. We
#
# 1. score every neuron and head with the hybrid scorer (attribution ranks, exact
#    patching verifies the top),
# 2. read and plot the `ScoreTable`,
# 3. compare attribution estimates with exact patching,
# 4. check that the top features really carry the shortcut: mean-ablating them should
#    raise balanced accuracy.

# %%
import pandas as pd
import torch

from icp_lens import Edit, intervene
from icp_lens.organisms import build_organism, evaluate_accuracy
from icp_lens.probeset import ProbeSet
from icp_lens.scoring import probe_means, score

torch.manual_seed(0)
pd.set_option("display.precision", 3)

organism = build_organism(variant="lexical", arch="gpt2", seed=0)
model = organism.load_bridge()
tokenizer = organism.load_tokenizer()

# %% [markdown]
# The probe set is drawn from the training distribution. Each example has a spurious
# counterfactual (the planted token swapped; prompts without one have none) and a
# causal counterfactual (the sentiment word flipped), so the scorer reports both the
# spurious effect `S` and a *selectivity* `S / (S + causal effect)`.

# %%
probes = ProbeSet.from_jsonl(model, organism.data_path("probe"))
probes = ProbeSet(model, probes.examples[:192])  # a subset keeps this tutorial quick on a laptop CPU
print(
    len(probes),
    "probe examples; spurious counterfactuals:",
    sum(e.spurious_counterfactual is not None for e in probes.examples),
)

# %%
table = score(model, probes, method="hybrid", kinds=["neuron", "head"], verify_top=40, progress=False)
table.top(10)[["feature", "score", "ci_low", "ci_high", "selectivity", "exact"]]

# %%
fig = table.plot_top(15)

# %%
fig = table.plot_heatmap("neuron")

# %% [markdown]
# ## Attribution vs exact patching
#
# Attribution is a first-order estimate. Here we score all heads and neurons both ways
# and compare the rankings.

# %%
exact = score(model, probes, method="exact", kinds=["neuron", "head"], causal=False, progress=False)
approx = score(model, probes, method="attribution", kinds=["neuron", "head"], causal=False, progress=False)
both = exact.frame[["feature", "score"]].merge(
    approx.frame[["feature", "score"]], on="feature", suffixes=("_exact", "_atp")
)
top200 = both.nlargest(200, "score_exact")
spearman = top200[["score_exact", "score_atp"]].corr(method="spearman").iloc[0, 1]
top20_exact = set(both.nlargest(20, "score_exact")["feature"])
top100_atp = set(both.nlargest(100, "score_atp")["feature"])
print(
    f"Spearman over the exact top 200: {spearman:.3f}; "
    f"exact top 20 inside attribution top 100: {len(top20_exact & top100_atp)}/20"
)

# %% [markdown]
# ## Do the top features carry the shortcut?
#
# Mean-ablate the top-k features (each replaced by its mean over the probe set) and
# measure accuracy on the balanced test set, where the planted token is independent of
# the label. If the features carry the shortcut, balanced accuracy rises toward the
# accuracy the model has without the planted token.

# %%
balanced = organism.probes("test_balanced")
no_shortcut = organism.probes("test_no_shortcut")
rows = []
for k in [0, 1, 2, 5]:
    chosen = table.select(top_k=k)
    means = probe_means(model, probes, chosen) if chosen else {}
    with intervene(model, [Edit(f, means[f]) for f in chosen]):
        bal = evaluate_accuracy(model, tokenizer, balanced)
        free = evaluate_accuracy(model, tokenizer, no_shortcut)
    rows.append({"top k ablated": k, "balanced acc": bal.accuracy, "worst group": bal.worst_group_accuracy,
                 "no-shortcut acc": free.accuracy})  # fmt: skip
ablation = pd.DataFrame(rows)
ablation

# %% [markdown]
# What this shows (seed 0): the top feature, a layer-0 head, carries the planted token:
# ablating it lifts balanced accuracy from about 51% to about 75% and costs nothing
# without the planted token. The second head also carries the shortcut, but it is the
# one that moves the sentiment word too (its selectivity is near 0.5): ablating it
# destroys the true cue. This is the failure the design notes warn about (features most
# implicated in the spurious signal are often used by the real task); selectivity and
# invariance training, not more pruning, are the tools for it.

# %%
table.top(4)[["feature", "score", "selectivity", "effect_resample", "effect_resample_causal"]]
