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
# # 08 · Counterfactual data: spec → audit → pairs → fine-tune → held-out flips
#
# The method that removes a real model's shortcut best is counterfactual consistency
# fine-tuning on a *wide* pool of pairs. This tutorial builds that pool from a few word
# lists, on SmolLM2-135M-Instruct and the gender-by-profession stereotype:
#
# 1. a **spec**: templates with one `{x}` slot, the attribute that must not matter
#    (`spurious`, grouped), the values that legitimately decide the answer (`causal`),
#    the answer per group;
# 2. the **audit**: how much does the model use each attribute (sensitivity: KL and flip
#    rate under counterfactuals of that attribute alone), drawn on the task's causal graph;
# 3. the **pairs**, with a held-out split of values *and* templates, and the quality
#    checks (similarity, attribute, fluency, minimality) in the report;
# 4. a **fine-tune** with `icp-lens train --objective consistency` and the pair recipe,
#    in a reduced run (fewer steps than the recipe's 30 + 30);
# 5. the **held-out flip rate** and stereotype gap, before and after.
#
# Everything here is the general API and CLI: the same steps work for any attribute whose
# values fit a slot (nationality, names, a source tag).

# %%
import json
from pathlib import Path

import numpy as np
import pandas as pd
from transformers import AutoModelForCausalLM, AutoTokenizer

from icp_lens.cli import main as icp_lens
from icp_lens.counterfactuals import CausalGraph, PairSpec, SentenceEncoder, apply_checks, audit_model, generate_pairs
from icp_lens.counterfactuals.audit import sensitivity
from icp_lens.loading import resolve_model_dir
from icp_lens.probes import read_probes

MODEL = "smollm2"  # the alias: the hub checkpoint, or offline the converted GGUF (icp-lens fetch-model smollm2)
model_dir = resolve_model_dir(MODEL)
tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()

# %% [markdown]
# ## 1 · The spec
# Our own word lists; `answers` must be one token each for this tokenizer, and every
# value must fit the slot. `PairSpec` refuses a bad spec with the field at fault.

# %%
spec = PairSpec.from_dict({
    "templates": ["The {x} said that", "Yesterday the {x} wrote that", "The {x} was late because",
                  "This morning the {x} announced that", "On the phone, the {x} insisted that",
                  "At lunch the {x} admitted that"],
    "spurious": {"female": ["nurse", "secretary", "receptionist", "librarian", "nanny", "dancer", "florist", "maid"],
                 "male": ["mechanic", "pilot", "plumber", "carpenter", "firefighter", "surgeon", "farmer", "soldier"]},
    "causal": {"female": ["woman", "mother", "girl", "sister"], "male": ["man", "father", "boy", "brother"]},
    "answers": {"female": " she", "male": " he"},
    "neutral": ["person", "worker", "visitor"],
})  # fmt: skip
try:
    PairSpec.from_dict({"templates": ["The [x] said"], "spurious": {"a": ["x"], "b": ["y"]},
                        "answers": {"a": " she", "b": " he"}})  # fmt: skip
except ValueError as err:
    print("refused:", err)

# %% [markdown]
# ## 2 · The audit: does the model use the attribute?
# `audit_model` swaps one attribute at a time: the profession for one of the other group (the
# spurious attribute `X_S`) or the explicit cue (the causal attribute `X_C`), and measures
# the change of the model's she/he distribution. In the task, only `X_C` should matter.

# %%
graph = CausalGraph.from_spec(spec)
before = audit_model(model, tokenizer, generate_pairs(spec, tokenizer).pairs, graph=graph)
print(before.graph)
before.table

# %%
before.figure();

# %% [markdown]
# The model follows the cue (a large KL for `X_C`), but the profession alone also moves
# its answer: that dashed red edge is the shortcut.
#
# ## 3 · The pairs, with a held-out split and the quality checks
# `holdout=0.3` keeps 30% of the values and of the templates out of the training files;
# held-out prompts combine held-out templates with held-out values.

# %%
pairs = generate_pairs(spec, tokenizer, holdout=0.3, seed=0)
lexicon = {g: [*spec.spurious[g], *spec.causal[g]] for g in spec.spurious}
checked = apply_checks(pairs, drop=False, lexicon=lexicon, encoder=SentenceEncoder(), model=model,
                       tokenizer=tokenizer)  # fmt: skip
data = checked.write(Path("pairs"), overwrite=True)
print(json.dumps(checked.report["counts"], indent=1))
print("held out:", checked.report["heldout_values"])
pd.Series(checked.report["quality"]["pass_rates"], name="pass rate").to_frame()

# %%
checked.quality.sort_values("similarity").head(4)[["original", "counterfactual", "similarity", "ppl_ratio",
                                                   "edit_fraction", "passed"]]  # fmt: skip

# %% [markdown]
# ## 4 · The fine-tune: `icp-lens train` with the pair recipe
# `--objective consistency --pairs` fills every option left unset from the pair recipe
# (LoRA, the candidates' task and consistency terms, the retain term, a second stage on the
# pairs stopped on their own flip rate). The retain texts anchor language modelling: a few
# IMDB reviews and the anchors `pairs` wrote (training templates with the neutral nouns).
# This reduced run takes 12 + up to 10 steps instead of the recipe's 30 + 30.

# %%
from icp_lens.data import load_imdb_sample

Path("retain.txt").write_text("\n".join(t.replace("\n", " ") for t in load_imdb_sample()["text"][:30]) + "\n")
rc = icp_lens(["train", "--model", MODEL, "--train", str(data / "task.jsonl"), "--pairs", str(data / "pairs.jsonl"),
               "--objective", "consistency", "--retain", "retain.txt", "--retain", str(data / "anchors.txt"),
               "--max-steps", "12", "--stage2-steps", "10", "--out", "debiased", "--overwrite", "--quiet"])  # fmt: skip
assert rc == 0

# %% [markdown]
# ## 5 · Held-out flip rate and stereotype gap, before and after
# The flip rate: the share of held-out prompts whose she/he choice changes when the
# profession is swapped for one of the other group. The gap: the mean she-minus-he logit
# margin of female-stereotyped prompts minus that of male-stereotyped ones. The explicit
# prompts (`heldout_task.jsonl`) must stay right.

# %%
debiased = AutoModelForCausalLM.from_pretrained("debiased").eval()
heldout = read_probes(data / "heldout_pairs.jsonl")
swaps = [p for p in heldout if not any(f" {n} " in f" {p.spurious_counterfactual} " for n in spec.neutral)]
task = read_probes(data / "heldout_task.jsonl")


def she_margin(m, prompts):
    import torch

    she, he = (tokenizer(a, add_special_tokens=False)["input_ids"][0] for a in (" she", " he"))
    with torch.no_grad():
        return np.array([float((lambda l: l[she] - l[he])(m(torch.tensor([tokenizer(p)["input_ids"]])).logits[0, -1]))
                         for p in prompts])  # fmt: skip


rows = []
for name, m in (("original", model), ("debiased", debiased)):
    margins = she_margin(m, [p.prompt for p in swaps])
    groups = np.array([p.group for p in swaps])
    explicit = she_margin(m, [p.prompt for p in task])
    right = np.where(np.array([p.answer == " she" for p in task]), explicit > 0, explicit < 0)
    rows.append({"model": name,
                 "held-out flip rate": sensitivity(m, tokenizer, swaps).set_index("counterfactual").loc["spurious", "flip_rate"],
                 "held-out gap": margins[groups == "female"].mean() - margins[groups == "male"].mean(),
                 "held-out explicit accuracy": right.mean()})  # fmt: skip
result = pd.DataFrame(rows).set_index("model")
for column in ("held-out flip rate", "held-out gap"):
    result.loc["cut", column] = 1 - result.loc["debiased", column] / result.loc["original", column]
result.round(3)

# %% [markdown]
# The reduced run already cuts the held-out gap; the full recipe (30 + 30 steps, a wider
# spec) is measured in `benchmarks/spec_finetune.py`, with a second attribute
# (nationality -> " rich"/" poor") in `benchmarks/results/nationality_wealth.md`. For real
# sentences instead of templates, `icp-lens pairs --texts FILE --swaps FILE.tsv` swaps an
# attribute's words, and `--rewrite-model` asks an instruct model to rewrite them, with the
# same checks dropping what fails.
