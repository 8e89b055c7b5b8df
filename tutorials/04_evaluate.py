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
# # 04 · Did it work? Evaluating a pruned checkpoint
#
# Verification (tutorial 03) says an exported checkpoint computes what the hook ablation
# computed. It says nothing about whether that is any *good*. This tutorial measures it,
# on an organism whose ground truth is known (the default `lexical` organism: a planted
# token, `wow` / `meh`, agrees with the label 97% of the time in training):
#
# 1. the **evaluation report** of the original model: every metric, with bootstrap
#    intervals, and what each one means;
# 2. an ICP prune of **token-embedding features**, found without group labels, exported
#    and reloaded with `transformers` alone;
# 3. the two reports **side by side** (`compare_reports`);
# 4. a small **results table** against the baselines a reviewer would ask for: a random
#    ablation of as many features, deleting the planted token from every test prompt,
#    and the oracle (the same model trained where the planted token is uninformative),
#    with the share of the worst-group gap each one closes.

# %%
import dataclasses
import random
import tempfile
from pathlib import Path

import pandas as pd
import torch
from transformers import AutoModelForCausalLM

from icp_lens.evaluation import compare_reports, evaluate, gap_closed
from icp_lens.organisms import build_organism
from icp_lens.organisms.task import PLANTED_TOKENS
from icp_lens.probeset import ProbeSet
from icp_lens.pruning import apply_plan, clean_hf_model, make_plan
from icp_lens.scoring import score_tokens, token_ablation_mode

torch.manual_seed(0)
torch.set_grad_enabled(False)
torch.set_num_threads(1)  # a 100k-parameter model: one thread is fastest
pd.set_option("display.precision", 3)

workdir = Path(tempfile.mkdtemp(prefix="icp_lens_tutorial04-"))

organism = build_organism()  # variant="lexical", arch="gpt2", seed=0; cached after the first call
tokenizer = organism.load_tokenizer()
splits = {name: organism.probes(name) for name in ("test_id", "test_balanced", "test_no_shortcut")}
{name: len(examples) for name, examples in splits.items()}

# %% [markdown]
# ## 1. The evaluation report
#
# `evaluate(model, tokenizer, examples)` runs any causal LM (a plain `transformers`
# model here, a bridge works too) on the prompts and on each example's counterfactuals,
# and returns an `EvalReport`. On `test_balanced`, where the planted token is independent
# of the label, the metrics that matter are:
#
# - **accuracy**: the answer beats its alternatives;
# - **group accuracy** and **worst-group accuracy**: the examples are grouped by label
#   and planted token (`pos|shortcut=neg` is a positive review carrying the negative
#   token). A model that follows the shortcut is right where they agree and wrong where
#   they disagree, so its worst group is near 0 while its average looks like chance;
# - **flip rate**: the share of answers that change when *only* the planted token is
#   swapped (the spurious counterfactual). 1 = the token decides everything, 0 = it is
#   ignored;
# - **ECE** (expected calibration error, 10 bins): how far the model's confidence is from
#   its accuracy. A shortcut makes a model confidently wrong;
# - **spurious / causal sensitivity**: the mean change of the answer's margin under the
#   spurious vs the causal counterfactual, and their ratio (`causal_robustness_ratio`,
#   infinite when the spurious counterfactual never moves the margin);
# - **fairness gaps** across the sensitive attribute (read from the group, here the
#   planted token): demographic parity, equal opportunity, equalized odds.
#
# Intervals are percentile bootstraps over examples (`n_boot` resamples, seeded).

# %%
original = clean_hf_model(organism.model_dir)
before = evaluate(original, tokenizer, splits["test_balanced"], n_boot=100)
before.to_frame().dropna(subset=["value"])

# %% [markdown]
# The original model is the textbook shortcut learner: balanced accuracy 0.5 (chance),
# two groups at 1.0 and two at 0.0, every answer flips with the planted token, and it is
# badly calibrated. Yet it still *knows* the true cue: on `test_no_shortcut`, with no
# planted token at all, it is right most of the time. That is the ceiling a repair
# should reach without retraining.

# %%
evaluate(original, tokenizer, splits["test_no_shortcut"], n_boot=0).accuracy

# %% [markdown]
# ## 2. ICP on token embeddings, no group labels
#
# Units (neurons, heads) that carry the planted token on this organism also carry the
# sentiment word (tutorial 03), so pruning them trades one for the other. The planted
# token's own **input-embedding row** is used by nothing else. `score_tokens` scores one
# feature per vocabulary token: at the positions where the probe's spurious (causal)
# counterfactual changes the token, patch in the counterfactual's embedding and measure
# how much the answer's logit difference moves. Its inputs are the probe prompts and
# their counterfactuals only: no group labels, no test data.

# %%
bridge = organism.load_bridge()
probes = ProbeSet(bridge, organism.probes("probe")[:256])
token_table = score_tokens(bridge, probes, n_boot=100)
token_table.top(6)[["token", "score", "ci_low", "ci_high", "causal", "selectivity", "n_examples"]]

# %% [markdown]
# The ICP rule keeps the tokens whose spurious score is at least 10% of the top one's and
# whose selectivity `S / (S + C)` is at least 0.5 (the sentiment words have `S = 0`: the
# spurious counterfactual never touches them). A pruned row is set to zero or to the mean
# input embedding; `token_ablation_mode` picks the one that keeps the probe accuracy
# higher. The plan unties the unembedding, so that the model still *predicts* these
# tokens with their original output rows.

# %%
token_ids = token_table.icp_selection()
mode = token_ablation_mode(bridge, probes, token_ids)
print("selected:", tokenizer.convert_ids_to_tokens(token_ids), f"({mode} row)")
assert sorted(tokenizer.convert_ids_to_tokens(token_ids)) == ["meh", "wow"]

plan = make_plan(bridge, [], tokens=token_ids, token_mode=mode, reference=probes, hf=organism.model_dir)
result = apply_plan(
    organism.model_dir, plan, workdir / "icp-tokens", prompts=[ex.prompt for ex in probes.examples[:64]],
    reference=bridge,
)  # fmt: skip
print(plan.summary())
print(result.verification)
assert result.verification.passed

# %% [markdown]
# The checkpoint is an ordinary GPT-2 with `tie_word_embeddings=False` and its own
# `lm_head.weight`; plain `transformers` loads it:

# %%
pruned = AutoModelForCausalLM.from_pretrained(result.out).eval()
assert not pruned.config.tie_word_embeddings
after = evaluate(pruned, tokenizer, splits["test_balanced"], n_boot=100)

# %% [markdown]
# ## 3. Before and after
#
# `compare_reports` puts reports side by side, one row per metric (and per group):

# %%
compare_reports({"original": before, "ICP prune (tokens)": after}).dropna(how="all")

# %% [markdown]
# ## 4. Against the baselines
#
# One row per method, all evaluated on the same test splits:
#
# - **random ablation**: as many token rows, drawn at random (seeded) from the other
#   tokens of the probe prompts, pruned the same way: does removing *any* two tokens help?
# - **delete planted token**: the planted token replaced by the neutral `ok` in every test
#   prompt. It needs to know the shortcut, so it is an upper reference for what removing
#   the token's information can do, not a method;
# - **oracle**: the same architecture trained where the planted token is uninformative.
#
# Columns: in-distribution accuracy (`test_id`, where the shortcut still agrees with the
# label, so it *rewards* the shortcut), balanced and worst-group accuracy, flip rate and
# ECE (all on `test_balanced`), and the **share of the worst-group gap closed**,
# `(method - original) / (oracle - original)`: 0 = no better than doing nothing, 1 = as
# good as the oracle.

# %%
planted = PLANTED_TOKENS["lexical"]
swap = {planted["pos"]: planted["none"], planted["neg"]: planted["none"]}


def delete_planted(text):
    return None if text is None else " ".join(swap.get(w, w) for w in text.split(" "))


deleted = {
    name: [
        dataclasses.replace(
            ex,
            prompt=delete_planted(ex.prompt),
            spurious_counterfactual=delete_planted(ex.spurious_counterfactual),
            causal_counterfactual=delete_planted(ex.causal_counterfactual),
        )
        for ex in examples
    ]
    for name, examples in splits.items()
}

seen = sorted(
    {t for b in probes.batches(512) for t in b.tokens.flatten().tolist()} - {tokenizer.bos_token_id, *token_ids}
)
random_ids = random.Random(0).sample(seen, len(token_ids))
random_plan = make_plan(bridge, [], tokens=random_ids, token_mode=mode, reference=probes, hf=organism.model_dir)
random_result = apply_plan(
    organism.model_dir, random_plan, workdir / "random-tokens", prompts=[ex.prompt for ex in probes.examples[:32]]
)
assert random_result.verification.passed

methods = {
    "original": (original, splits),
    f"random ablation ({', '.join(tokenizer.convert_ids_to_tokens(random_ids))})": (
        AutoModelForCausalLM.from_pretrained(random_result.out).eval(),
        splits,
    ),
    "ICP prune, token embeddings": (pruned, splits),
    "delete planted token (test time)": (original, deleted),
    "oracle": (organism.load_hf(oracle=True), splits),
}
rows = {}
for name, (model, data) in methods.items():
    reports = {split: evaluate(model, tokenizer, data[split], n_boot=0) for split in ("test_id", "test_balanced")}
    bal = reports["test_balanced"]
    rows[name] = {
        "ID acc": reports["test_id"].accuracy,
        "balanced acc": bal.accuracy,
        "worst-group acc": bal.worst_group_accuracy,
        "flip rate": bal.flip_rate,
        "ECE": bal.ece,
    }
results = pd.DataFrame(rows).T
results["gap closed"] = [
    gap_closed(wg, results.loc["original", "worst-group acc"], results.loc["oracle", "worst-group acc"])
    for wg in results["worst-group acc"]
]
results

# %%
icp, rnd = results.loc["ICP prune, token embeddings"], results.iloc[1]
assert icp["gap closed"] >= 0.76 and icp["flip rate"] <= 0.05
assert abs(rnd["gap closed"]) <= 0.05

# %% [markdown]
# How to read it (the observations were made on the seed-0 organism when this was
# written; the assertions above pin the ones that matter):
#
# - The ICP prune, chosen without group labels, closes the worst-group gap: the planted
#   token no longer flips any answer (flip rate 0), and the model now answers from the
#   sentiment word, like the oracle. Its calibration improves with it.
# - Its **in-distribution accuracy drops**, to about the oracle's. That is not damage: on
#   `test_id` the planted token still agrees with the label 97% of the time, more often
#   than the sentiment word (92%), so a model that ignores the token *must* lose there.
#   An ID-accuracy target and a worst-group target cannot both be met on this organism.
# - Random ablation of as many tokens closes nothing: the gain comes from *which* rows
#   were pruned.
# - Deleting the planted token at test time does as well, but only because we told it
#   which token to delete; ICP found the token from counterfactuals alone, and its
#   checkpoint needs no change to the inputs.
# - Results vary across seeds: `benchmarks/organism_table.py` runs every method on
#   three seeds of both organisms (see `benchmarks/results/organism_table.md`).
