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
# # 03 · From a score table to a checkpoint that plain transformers loads
#
# Tutorial 02 ended with a ranking: features whose ablation moves the answer when the
# planted token is swapped. Stage 2 of the method acts on that ranking. Here we take the
# *pruning* route, which turns "ablate these features at run time with hooks" into
# "these weights are different", so that the result is an ordinary Hugging Face
# checkpoint anyone can load without icp_lens or TransformerLens:
#
# 1. score the default organism (quickly),
# 2. **select** features from the score table,
# 3. write a **PrunePlan**: the features, the mode (zero or mean), a fingerprint of the
#    model and the provenance,
# 4. **apply** it: edit the weights, export the checkpoint atomically and **verify**
#    that the checkpoint computes what the hook ablation computed,
# 5. reload it with `transformers` alone, in a process where icp_lens cannot be imported,
# 6. measure what pruning did to the shortcut and to the true cue,
# 7. look at the refusals (wrong model, non-empty target),
# 8. do the same from the command line.

# %%
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from icp_lens import intervene, run_with_edits, to_tokens
from icp_lens.cli import main as icp_lens_cli  # the `icp-lens` command, callable in process
from icp_lens.organisms import build_organism, evaluate_accuracy
from icp_lens.probeset import ProbeSet
from icp_lens.pruning import (
    PlanMismatchError,
    PrunePlan,
    apply_plan,
    fingerprint,
    hybrid_split,
    make_plan,
    plan_edits,
    prune,
    select_features,
)
from icp_lens.scoring import score

torch.manual_seed(0)
torch.set_grad_enabled(False)
torch.set_num_threads(1)  # a 100k-parameter model: one thread is fastest, and immune to a busy machine
pd.set_option("display.precision", 3)
pd.set_option("display.max_colwidth", 80)

workdir = Path(tempfile.mkdtemp(prefix="icp_lens_tutorial03-"))  # every checkpoint of this tutorial goes here

# %% [markdown]
# ## 1. The organism and its score table
#
# The default organism (`lexical` shortcut, GPT-2 architecture, seed 0; see tutorial 01)
# is built on first use and cached. We boot a `TransformerBridge` on its checkpoint and
# score neurons and heads with the hybrid scorer on a subset of the probe set, with the
# same small settings as tutorial 02 (attribution ranks everything, exact patching
# verifies the top 40).

# %%
organism = build_organism()  # variant="lexical", arch="gpt2", seed=0
model = organism.load_bridge()
tokenizer = organism.load_tokenizer()

probes = ProbeSet.from_jsonl(model, organism.data_path("probe"))
probes = ProbeSet(model, probes.examples[:192])  # a subset keeps this quick on a laptop CPU
table = score(model, probes, method="hybrid", kinds=["neuron", "head"], verify_top=40, progress=False)
table.top(8)[["feature", "score", "ci_low", "ci_high", "selectivity", "exact"]]

# %% [markdown]
# ## 2. Selecting features
#
# `select_features` turns the ranking into a list of features, most spurious first. It
# applies, in this order: a filter to *prunable* kinds (neurons, heads, value vectors; a
# residual-stream dimension is the sum of every earlier writer, so no single weight edit
# removes it), an optional minimum selectivity, the threshold `score > tau`, a per-layer
# cap, and `top_k`. You need at least one of `threshold` and `top_k`.
#
# Which to use is a research decision, not a default: a threshold is stable across
# models but its scale depends on the metric; `top_k` fixes the budget; the per-layer cap
# stops one layer from absorbing the whole budget.

# %%
top_score = float(table.frame["score"].iloc[0])
selections = {
    "top_k=3": select_features(table, top_k=3),
    "threshold=score[0]/4": select_features(table, threshold=top_score / 4),
    "top_k=3, per_layer_cap=1": select_features(table, top_k=3, per_layer_cap=1),
    "top_k=3, min_selectivity=0.7": select_features(table, top_k=3, min_selectivity=0.7),
}
pd.DataFrame({"rule": list(selections), "features": [", ".join(map(str, f)) for f in selections.values()]})

# %% [markdown]
# Tutorial 02 found that features near the top of the ranking can carry the shortcut
# *and* the sentiment word, so that removing them costs the true cue (section 6 meets
# this again). The method's answer is the hybrid: prune the extreme features, and hand
# the next band to the invariance trainer, which keeps their capacity while training the
# output to be independent of them. `hybrid_split` returns the two disjoint sets:

# %%
split = hybrid_split(table, prune_top_k=1, regularise_top_k=4)
print("prune:     ", ", ".join(map(str, split.prune)))
print("regularise:", ", ".join(map(str, split.regularise)))
assert not set(split.prune) & set(split.regularise)

# %% [markdown]
# For the rest of this tutorial we prune the top feature only.

# %%
features = select_features(table, top_k=1)
features

# %% [markdown]
# ## 3. The PrunePlan
#
# A plan records *what* to remove, independent of how the model is held (bridge,
# `HookedTransformer`, plain HF model): plans name hook-point features, not weight
# matrices. Two modes:
#
# - **zero**: the feature's activation is replaced by 0, i.e. its outgoing weights
#   (its slice of the input of the attention output projection, for a head) are zeroed;
# - **mean**: the activation is replaced by its mean over a *reference set*; in the
#   weights this is the same zeroing plus `mean @ W_out[slice]` folded into the output
#   bias. Zero is a large, off-distribution intervention (0 may be nowhere near any
#   activation the rest of the network has seen); the mean keeps the downstream layers
#   on familiar ground, which usually disturbs the true cue less.
#
# Mean mode therefore needs `reference=`: prompts, probe examples, a `ProbeSet` or a
# JSONL path. Here it is the probe subset we scored on. Extra keyword arguments are
# recorded as provenance.

# %%
zero_plan = make_plan(model, features, mode="zero", scores="tutorial 03 score table", top_k=1)
mean_plan = make_plan(
    model, features, mode="mean", reference=probes, description="probe.jsonl[:192]",
    scores="tutorial 03 score table", top_k=1,
)  # fmt: skip
print(zero_plan.summary())
print(mean_plan.summary())


# %% [markdown]
# The plan is JSON, meant to be read, diffed and committed next to the checkpoint. A head
# has `d_head` mean values; we shorten them for display:


# %%
def shortened(plan: PrunePlan, n: int = 3) -> str:
    d = plan.to_dict()
    for entry in d["features"]:
        if "mean" in entry and len(entry["mean"]) > n:
            entry["mean"] = [round(v, 4) for v in entry["mean"][:n]] + [f"... {len(entry['mean']) - n} more"]
    return json.dumps(d, indent=2)


print(shortened(mean_plan))
assert PrunePlan.from_dict(json.loads(mean_plan.to_json())) == mean_plan  # the JSON round-trips exactly

# %% [markdown]
# Read the three records:
#
# - **fingerprint**: the model class, its parameter count, a hash of every tensor's name
#   and shape, and a hash of every weight. A plan is only meaningful for the model it was
#   made on (the means are *that* model's activations; the same head index in another
#   model is another head), so applying it anywhere else is refused (section 7). The
#   fingerprint is taken on the HF weights, so a plan made on the bridge applies to the
#   checkpoint directory the bridge was booted from, and vice versa:

# %%
assert mean_plan.fingerprint == fingerprint(organism.load_hf())
mean_plan.fingerprint

# %% [markdown]
# - **reference**: how many prompts the means were taken over and a SHA-256 of them, so
#   you can tell later whether two mean plans used the same reference set;
# - **provenance**: what you passed (score table, `top_k`), the creation time and the
#   icp_lens version.
#
# ## 4. Apply, export, verify
#
# `apply_plan` never edits the model you hold. It recovers a clean copy of the HF model
# from the bridge, checks the fingerprint, bakes the plan into the weights, and writes
# the checkpoint (safetensors, config, tokenizer and `plan.json`) into a temporary
# directory that is renamed into place only when complete: an interrupted export leaves
# nothing behind.
#
# Then it **verifies**: the exported directory is reloaded with `transformers` alone and
# run on verification inputs, and the same inputs go through the *original* model with
# the plan's features ablated at run time by the very hooks the scorer used. The largest
# absolute logit difference over all positions is the number to trust: in fp32 it should
# be round-off (tolerance 1e-5). We verify on test prompts; without `prompts=` random
# token ids are used, which exercises every position without depending on a tokenizer.

# %%
balanced = organism.probes("test_balanced")
no_shortcut = organism.probes("test_no_shortcut")
check_prompts = [ex.prompt for ex in balanced[:64]]

zero_result = apply_plan(model, zero_plan, workdir / "pruned-zero", prompts=check_prompts)
mean_result = apply_plan(model, mean_plan, workdir / "pruned-mean", prompts=check_prompts)
for name, result in [("zero", zero_result), ("mean", mean_result)]:
    print(f"--- {name} mode -> {result.out.name}")
    print(result.verification)
    assert result.verification.passed

# %% [markdown]
# The other lines of the report: the share of parameters the plan zeroed, the size of the
# weight files and the forward latency before and after. One head's outgoing weights are
# a `d_head x d_model` block of the attention output projection; in this tiny model that
# is a visible fraction of all parameters, in a 7B model it would not be. Size and
# latency do not change, and should not: zeroing keeps every shape, which is what lets
# any loader read the result (the two latencies are only as steady as the machine is
# idle). Making the model *smaller* would mean physically removing the slices, a
# different kind of export. The directory holds an ordinary checkpoint plus the
# plan, and the whole result is also a dictionary (`report.to_frame()` gives a frame):

# %%
report = mean_result.verification
cfg = organism.load_hf().config
one_head = (cfg.n_embd // cfg.n_head) * cfg.n_embd
print(f"one head's outgoing weights: {one_head} of {mean_plan.fingerprint.n_parameters} parameters")
assert mean_result.stats.zeroed == one_head and report.n_inputs == len(check_prompts)
print(sorted(p.name for p in mean_result.out.iterdir()))
assert PrunePlan.load(mean_result.out) == mean_plan  # plan.json travels with the weights
print(json.dumps(mean_result.to_dict(), indent=2))  # what `icp-lens prune --json` prints

# %% [markdown]
# ## 5. Plain `transformers`, no icp_lens
#
# The checkpoint is an ordinary `GPT2LMHeadModel`. Load it with `AutoModelForCausalLM`
# and compare its last-position logits on balanced test prompts with the hook-ablated
# bridge (`plan_edits(plan)` gives the exact `Edit`s the plan bakes in):

# %%
pruned = AutoModelForCausalLM.from_pretrained(mean_result.out).eval()
pruned_tok = AutoTokenizer.from_pretrained(mean_result.out)
prompts = [ex.prompt for ex in balanced[:64]]
hf_ids = pruned_tok(prompts, return_tensors="pt")["input_ids"]  # all prompts have one token length
assert torch.equal(hf_ids, to_tokens(model, prompts))  # both tokenize the same way
hf_logits = pruned(hf_ids).logits[:, -1]
hooked_logits = run_with_edits(model, hf_ids, plan_edits(mean_plan))[:, -1]
print(f"max |transformers - hook ablation| at the last position: {(hf_logits - hooked_logits).abs().max():.1e}")
assert torch.allclose(hf_logits, hooked_logits, atol=1e-4)

# %% [markdown]
# To rule out that icp_lens is silently involved (it is imported in this kernel), run the
# same check in a fresh Python process where `import icp_lens` fails:
# `sys.modules["icp_lens"] = None` makes any import of it raise. The child prints its
# answers; we compare them with the hook-ablated bridge's answers here.

# %%
child = f"""
import json, sys
sys.modules["icp_lens"] = None  # any `import icp_lens` now raises ImportError
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained({str(mean_result.out)!r}).eval()
tok = AutoTokenizer.from_pretrained({str(mean_result.out)!r})
prompts = json.loads(sys.stdin.read())
ids = tok(prompts, return_tensors="pt")["input_ids"]
pos, neg = tok.convert_tokens_to_ids(["pos", "neg"])
last = model(ids).logits[:, -1]
print(json.dumps(["pos" if p > n else "neg" for p, n in last[:, [pos, neg]].tolist()]))
try:
    import icp_lens
except ImportError:
    print("icp_lens: not importable")
"""
env = {**os.environ, "OMP_NUM_THREADS": "1"}
proc = subprocess.run(
    [sys.executable, "-c", child], input=json.dumps(prompts), capture_output=True, text=True, env=env, check=False
)
assert proc.returncode == 0, proc.stderr
child_answers, child_note = proc.stdout.strip().splitlines()
child_answers = json.loads(child_answers)

pos, neg = tokenizer.convert_tokens_to_ids(["pos", "neg"])
hooked_answers = ["pos" if p > n else "neg" for p, n in hooked_logits[:, [pos, neg]].tolist()]
agree = sum(a == b for a, b in zip(child_answers, hooked_answers, strict=True))
print(child_note)
print(f"answers that agree with the hook-ablated model: {agree}/{len(prompts)}")
assert child_note == "icp_lens: not importable" and child_answers == hooked_answers

# %% [markdown]
# ## 6. Did pruning remove the shortcut?
#
# Verification says the checkpoint does what the hook ablation does; it says nothing
# about whether that is *good*. That is measured on held-out splits:
#
# - `test_balanced`: the planted token is independent of the label, so a model that
#   follows it is at chance. Its two groups where the planted token *disagrees* with
#   the label (`pos|shortcut=neg`, `neg|shortcut=pos`) show how often it is fooled, and
#   the worst group is the lower of the two;
# - `test_no_shortcut`: no planted token at all, so this is the true cue alone: the
#   ceiling pruning should reach, and what it must not damage.
#
# We evaluate the original, the two exported checkpoints (loaded with `transformers`),
# the top two features mean-ablated at run time (to see what one more feature does),
# and the oracle (trained where the planted token is uninformative) as the reference.

# %%
disagreeing = sorted(g for g in {ex.group for ex in balanced} if g.split("|")[0] != g.split("=")[1])


def accuracies(name: str, m) -> dict:
    bal = evaluate_accuracy(m, tokenizer, balanced)
    free = evaluate_accuracy(m, tokenizer, no_shortcut)
    row = {"model": name, "balanced acc": bal.accuracy, "worst group": bal.worst_group_accuracy}
    row.update({g: bal.group_accuracy[g] for g in disagreeing})
    return {**row, "no-shortcut acc": free.accuracy}


top2_plan = make_plan(model, select_features(table, top_k=2), mode="mean", reference=probes)
rows = [accuracies("original", organism.load_hf())]
rows.append(accuracies(f"pruned: zero {features[0]}", AutoModelForCausalLM.from_pretrained(zero_result.out)))
rows.append(accuracies(f"pruned: mean {features[0]}", pruned))
with intervene(model, plan_edits(top2_plan)):
    rows.append(accuracies("hooks: mean " + " + ".join(map(str, top2_plan.features)), model))
rows.append(accuracies("oracle", organism.load_hf(oracle=True)))
results = pd.DataFrame(rows).set_index("model")
results

# %%
original, top1, top2 = results.iloc[0], results.iloc[2], results.iloc[3]
assert top1["balanced acc"] > original["balanced acc"] + 0.1  # one head already loosens the shortcut's grip
assert top2["no-shortcut acc"] < original["no-shortcut acc"] - 0.2  # two heads: the true cue goes too
table.top(2)[["feature", "score", "ci_low", "ci_high", "selectivity"]]

# %% [markdown]
# How to read this (the numbers are the ones printed above; the observations in this
# text were made on the seed-0 organism when this tutorial was written):
#
# - The shortcut runs through the two top heads, each with about the same score:
#   their bootstrap intervals overlap, so the order between them is not a finding.
#   Pruning the top one lifts balanced accuracy, but the worst group did not move in our
#   run. The two disagreeing-group columns show why: removing the head repairs one of
#   them and leaves the other fooled. It carries one of the two planted tokens; the
#   other head (below) carries the other.
# - Zero and mean ablation of the same head are different interventions. Mean ablation
#   is usually the gentler one, but "usually" is not "always": compare the no-shortcut
#   column of the two exported rows, and measure both on your own model.
# - Mean-ablating both is not the fix: they also carry the sentiment word, and the
#   no-shortcut column collapses. A larger `top_k` is not a better debiaser.
# - The scores cannot tell the two heads apart; **selectivity** can
#   (`S / (S + causal effect)`: how much of a feature's effect is the shortcut's rather
#   than the true cue's). In our run the head the score put first was the *less*
#   selective of the two (the table just above), and it was the one whose pruning cost
#   no-shortcut accuracy.
#
# So prune the more selective head. `prune` is the one-call version: select from a score
# table (or, as here, a list of features), make the plan, export and verify (with a
# `reference` the verification inputs are its prompts).

# %%
selective = max(
    select_features(table, top_k=2), key=lambda f: float(table.frame.set_index("feature").loc[str(f), "selectivity"])
)
debiased = prune(
    model, [selective], workdir / "debiased", top_k=1, mode="mean", reference=probes, prompts=check_prompts
)
print(debiased.verification)
assert debiased.verification.passed
rows.append(
    accuracies(f"pruned: mean {selective} (more selective)", AutoModelForCausalLM.from_pretrained(debiased.out))
)
results = pd.DataFrame(rows).set_index("model")
results

# %%
chosen = results.iloc[-1]
assert chosen["balanced acc"] > original["balanced acc"] + 0.1
assert chosen["no-shortcut acc"] >= top1["no-shortcut acc"]  # the selective head costs the true cue no more
print(
    f"mean-pruning {selective}: balanced accuracy {original['balanced acc']:.3f} -> {chosen['balanced acc']:.3f}, "
    f"no-shortcut accuracy {original['no-shortcut acc']:.3f} -> {chosen['no-shortcut acc']:.3f}, "
    f"oracle balanced accuracy {results.loc['oracle', 'balanced acc']:.3f}"
)

# %% [markdown]
# This is as far as pruning goes on this organism: in our run the selective head came
# out at no cost to the true cue, while the rest of the shortcut runs through a head
# that the true cue needs too. That head is the case for the other half of stage 2:
# keep it, and train the model to be invariant to it (the "regularise" side of
# `hybrid_split`).

# %% [markdown]
# ## 7. Refusals
#
# A plan made for one model is refused on another, with the fields that differ. The
# oracle has the organism's architecture and shapes, only different weights, which is
# exactly the case a check of shapes alone would miss:

# %%
try:
    apply_plan(organism.oracle_dir, mean_plan, workdir / "oracle-pruned")
except PlanMismatchError as err:
    print(f"PlanMismatchError: {err}")
else:
    raise AssertionError("a plan was applied to a model it was not made for")
assert not (workdir / "oracle-pruned").exists()  # nothing was written

# %% [markdown]
# An existing, non-empty output directory is never overwritten by accident. With
# `overwrite=True` the new checkpoint is written next to it and swapped in, and the old
# one is deleted only once the new one is in place:

# %%
try:
    apply_plan(model, zero_plan, mean_result.out)
except FileExistsError as err:
    print(f"FileExistsError: {err}")
else:
    raise AssertionError("a non-empty directory was overwritten")
again = apply_plan(model, mean_plan, mean_result.out, overwrite=True, prompts=check_prompts)
assert again.verification.passed and PrunePlan.load(again.out) == mean_plan

# %% [markdown]
# ## 8. The same from the command line
#
# Every step has a command, for scripts and clusters (`icp-lens --help` lists them):
#
# ```bash
# # stage 1: score table (tutorial 02)
# icp-lens score --model runs/lexical/model --probe runs/lexical/probe.jsonl --out scores.csv \
#     --method hybrid --kinds neuron,head --verify-top 40
#
# # stage 2: select, plan, export and verify in one go (exit status 1 if verification fails)
# icp-lens prune --model runs/lexical/model --scores scores.csv --out runs/lexical/pruned \
#     --top-k 1 --mode mean --probe runs/lexical/probe.jsonl
#
# # re-apply a saved plan (e.g. one reviewed in a pull request) to the same checkpoint
# icp-lens apply-plan --model runs/lexical/model --plan runs/lexical/pruned/plan.json \
#     --out runs/lexical/pruned-again --probe runs/lexical/test_balanced.jsonl
# ```
#
# `--probe` is the mean reference in `prune` (required with `--mode mean`) and the
# verification prompts in both. `--threshold`, `--per-layer-cap`, `--overwrite`,
# `--no-verify`, `--tolerance` and `--json` work as in Python.
#
# A plan is a reviewable artefact: apply the one saved inside the debiased checkpoint to
# the organism's checkpoint *directory* with `apply-plan` (run in process here; it
# verifies against a bridge booted on that directory, on random token ids since no
# `--probe` is given). The weights come out bit for bit the same as the Python run's:

# %%
status = icp_lens_cli([
    "apply-plan", "--model", str(organism.model_dir), "--plan", str(debiased.out / "plan.json"),
    "--out", str(workdir / "cli-debiased"),
])  # fmt: skip
assert status == 0
python_weights = load_file(debiased.out / "model.safetensors")
cli_weights = load_file(workdir / "cli-debiased" / "model.safetensors")
assert python_weights.keys() == cli_weights.keys()
assert all(torch.equal(python_weights[k], cli_weights[k]) for k in python_weights)
assert PrunePlan.load(workdir / "cli-debiased") == debiased.plan

# %% [markdown]
# Clean up the temporary checkpoints:

# %%
shutil.rmtree(workdir)
