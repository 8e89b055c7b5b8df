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
# # 01 · Features and interventions on a model with a planted shortcut
#
# icp_lens asks one causal question of every internal feature of a transformer: *if we
# intervene on this feature, does the output change, and is that change the spurious
# attribute's doing?* This tutorial sets up the vocabulary on a model whose ground truth
# we know:
#
# 1. build an **organism**: a tiny model trained from scratch on a task with a true cue
#    and a planted shortcut;
# 2. list its **features** (neurons, heads, residual dimensions, value vectors);
# 3. run each **intervention** (zero, mean, scale, resample, swap, constant) and read
#    the effect on the answer;
# 4. **pack** many interventions into one forward pass.

# %%
import pandas as pd
import torch

from icp_lens import (
    Constant,
    Edit,
    Feature,
    Scale,
    Swap,
    Zero,
    active_hook_count,
    enumerate_features,
    fit_means,
    model_dims,
    resample_from,
    run_packed,
    run_with_edits,
    to_tokens,
)
from icp_lens.organisms import build_organism

torch.manual_seed(0)
torch.set_grad_enabled(False)
pd.set_option("display.precision", 3)

# %% [markdown]
# ## 1. The organism
#
# Prompts are short "reviews" such as `the movie was great ... wow ->`, and the model
# answers `pos` or `neg` as its next token. The sentiment word is the *true cue*
# (agrees with the label 92% of the time); the token just before `->` is the *planted
# shortcut* (`wow`/`meh`, agrees 97% of the time in training, and is replaced by the
# neutral `ok` in a quarter of the training prompts so that the true cue is learned
# too). The first call trains it (seconds); later calls reuse the cache.

# %%
organism = build_organism(variant="lexical", arch="gpt2", seed=0)
organism.report.to_frame()

# %% [markdown]
# The model is right in distribution, near chance on a balanced test set where the
# planted token is independent of the label, and fails almost always in the worst group
# (planted token disagreeing with the label): it follows the shortcut. Without the
# planted token it is right most of the time, so the true cue is encoded: that is what
# removing the shortcut should recover.

# %%
model = organism.load_bridge()  # a TransformerBridge over the HF checkpoint in organism.model_dir
dims = model_dims(model)
dims

# %% [markdown]
# ## 2. Features
#
# A `Feature` is one unit at one hook point. Every kind is a slice along dimension 2 of
# its hook's activation.

# %%
kinds = ["neuron", "head", "resid", "value"]
pd.DataFrame(
    [
        {
            "kind": k,
            "hook (layer 0)": Feature(k, 0, 0).hook_name,
            "per layer": len(enumerate_features(model, k, layers=0)),
            "total": len(enumerate_features(model, k)),
        }
        for k in kinds
    ]
)

# %% [markdown]
# ## 3. Interventions
#
# We use balanced test prompts (half of them have a planted token that disagrees with
# the label) and read the logit difference `logit(answer) - logit(alternative)` at the
# last position: positive means right.

# %%
examples = organism.probes("test_balanced")[:256]
tokens = to_tokens(model, [ex.prompt for ex in examples])
spurious_cf = to_tokens(model, [ex.spurious_counterfactual for ex in examples])
tokenizer = organism.load_tokenizer()
answer = torch.tensor([tokenizer.convert_tokens_to_ids(ex.answer.strip()) for ex in examples])
other = torch.tensor([tokenizer.convert_tokens_to_ids(ex.alternatives[0].strip()) for ex in examples])
rows = torch.arange(len(examples))


def logit_diff(logits: torch.Tensor) -> torch.Tensor:
    last = logits[:, -1]
    return last[rows, answer] - last[rows, other]


clean = logit_diff(model(tokens))
print(f"clean: mean logit diff {clean.mean():.2f}, accuracy {(clean > 0).float().mean():.1%}")

# %% [markdown]
# The planted token sits at position -2. Patching the *whole residual stream* at that
# position from the spurious counterfactual (the same prompt with `wow` and `meh`
# swapped) is the shortcut's total effect. On the balanced set the accuracy stays near
# 50% (the agreeing and disagreeing halves trade places), but nearly every answer flips.

# %%
planted_pos = (-2,)
resid = enumerate_features(model, "resid", layers=0)
patches = resample_from(model, resid, spurious_cf)
patched = logit_diff(run_with_edits(model, tokens, [Edit(f, patches[f], positions=planted_pos) for f in resid]))
flips = ((patched > 0) != (clean > 0)).float().mean()
print(f"planted token swapped: accuracy {(patched > 0).float().mean():.1%}, answers flipped {flips:.1%}")
assert flips > 0.9  # the planted token drives the answer

# %% [markdown]
# Now every intervention on single features. Each row is one forward pass with one
# `Edit`; the effect is the mean change in logit difference and the share of answers
# that flip.

# %%
neuron, head = Feature("neuron", 1, 0), Feature("head", 1, 0)
means = fit_means(model, [neuron, head], to_tokens(model, [ex.prompt for ex in organism.probes("probe")[:256]]))
head_patch = resample_from(model, [head], spurious_cf)[head]
edits = {
    "zero neuron L1.0": Edit(neuron, Zero()),
    "mean neuron L1.0": Edit(neuron, means[neuron]),
    "scale neuron L1.0 x3": Edit(neuron, Scale(3.0)),
    "constant neuron L1.0 = 2": Edit(neuron, Constant(2.0)),
    "swap neuron L1.0 <- L1.1": Edit(neuron, Swap(Feature("neuron", 1, 1))),
    "zero head L1.0": Edit(head, Zero()),
    "mean head L1.0": Edit(head, means[head]),
    "resample head L1.0 (last pos)": Edit(head, head_patch, positions=(-1,)),
}
effects = []
for name, edit in edits.items():
    after = logit_diff(run_with_edits(model, tokens, edit))
    effects.append(
        {
            "edit": name,
            "mean dP": (after - clean).mean().item(),
            "flip rate": ((after > 0) != (clean > 0)).float().mean().item(),
        }
    )
pd.DataFrame(effects)

# %% [markdown]
# ## 4. Packing: many interventions, one forward pass
#
# Scoring needs one forward pass per feature and intervention. `run_packed` stacks K
# edit sets along the batch; the rows never interact, so the result equals K separate
# runs. Here: resample every head at the last position from the spurious counterfactual.

# %%
heads = enumerate_features(model, "head")
head_patches = resample_from(model, heads, spurious_cf)
groups = [Edit(h, head_patches[h], positions=(-1,)) for h in heads]
packed = run_packed(model, tokens, groups, reduce=lambda logits: logits[:, -1])  # [K, batch, vocab]
one_by_one = torch.stack([run_with_edits(model, tokens, g)[:, -1] for g in groups])
print(f"max |packed - one at a time| = {(packed - one_by_one).abs().max():.1e}")
effect = (packed[:, rows, answer] - packed[:, rows, other]) - clean
pd.DataFrame({"head": [str(h) for h in heads], "mean dP": effect.mean(1)}).sort_values("mean dP")

# %% [markdown]
# Every hook was added inside a context manager and is gone again:

# %%
assert active_hook_count(model) == 0
active_hook_count(model)
