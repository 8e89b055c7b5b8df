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
# # 09 · A vision-language model that looks at the background
#
# Waterbirds is the classic cross-modal shortcut: a classifier of bird species that
# answers with the background (water or land) instead of the bird. Here is a model with
# that shortcut planted, small enough to train from scratch on a laptop: a tiny
# LLaVA (a CLIP-style vision tower, the projector, a 2-layer Llama) that reads a 16x16
# image and the prompt `<image> bird ->`, and answers ` landbird` or ` waterbird`.
#
# The bird (an `x` or a `+`) agrees with the label 92% of the time; the background agrees
# 95% of the time in the 3/4 of the training images that have one. Where they disagree
# the background is the better bet, so the model learns to follow it, yet it must read the
# bird on the grey images. Every image comes with its *image counterfactual*: the same
# bird, same place, same pixel noise, on the other background: exact ground truth.
#
# We (1) build the organism, (2) find where the background's effect passes through both
# towers with hooks on the `TransformerBridge`, and (3) fine-tune it away with CIMRL,
# which needs no group labels, against ERM.

# %%
import matplotlib.pyplot as plt
import pandas as pd

from icp_lens.directions.image import applying_image_directions, fit_image_directions, image_direction_effects
from icp_lens.organisms.multimodal import build_waterbirds
from icp_lens.plotting import label_bars, legend_outside, reference_line, style
from icp_lens.scoring.image_patching import image_patch_effects
from icp_lens.scoring.image_scores import score_image_units
from icp_lens.training.multimodal import MultimodalTrainConfig, data_from_probes, predict_classes, train_multimodal

org = build_waterbirds(seed=0, progress=True)  # about a minute and a half the first time, then cached
org.report.to_frame()

# %% [markdown]
# The checks say it: right in distribution, at chance on the balanced test set (the
# background is independent of the label there), wrong on the groups where bird and
# background disagree, but right on grey backgrounds, and an oracle trained where the
# background says nothing gets the balanced set right. Four test images and their
# counterfactuals:

# %%
processor = org.load_processor()
test = data_from_probes(org.data_path("test_balanced"), processor)
fig, axes = plt.subplots(2, 4, figsize=(7, 3.6))
for j in range(4):
    for row, (images, title) in enumerate(((test.pixel_values, "image"), (test.counterfactual, "counterfactual"))):
        axes[row, j].imshow((images[j].permute(1, 2, 0) * 0.5 + 0.5).clamp(0, 1))
        axes[row, j].set_title(f"{title} {j}", fontsize=8)
        axes[row, j].axis("off")
fig.tight_layout()

# %% [markdown]
# ## Where does the background pass?
#
# `image_patch_effects` runs the bridge on the images and patches one hook point (or one
# unit) at a time with its value on the counterfactual image; the effect is the mean change
# of the margin of the model's own answer. `total` is what swapping the whole image does.

# %%
bridge = org.load_bridge()
n = 32
pixels, swapped = test.pixel_values[:n], test.counterfactual[:n]
hooks = [
    "vision_encoder.encoder_layers.0.hook_out",
    "vision_encoder.encoder_layers.1.attn.hook_out",
    "vision_projector.hook_in",
    "blocks.0.hook_out",
]
points = image_patch_effects(bridge, test.input_ids, pixels, swapped, test.label_ids, hooks)
print(f"total effect of the background swap on the answer's margin: {points.attrs['total']:.2f}")
points[["hook_name", "effect", "share"]]

# %% [markdown]
# Every path from the image runs through the vision tower's residual stream and the
# projector, so those carry all of it. Unit by unit, the neurons of the vision tower's
# last MLP and of the language model's last MLP:

# %%
units = image_patch_effects(
    bridge, test.input_ids, pixels, swapped, test.label_ids,
    ["vision_encoder.encoder_layers.1.mlp.hook_post", "blocks.1.mlp.hook_post"], per_unit=True,
)  # fmt: skip
print(units.groupby("hook_name")["share"].agg(["max", "min", "sum"]))
units.sort_values("abs_effect", ascending=False).head(5)

# %% [markdown]
# The same measurement for every neuron and attention head of both towers and the
# projector's 64 hidden neurons (`vision_projector.hook_hidden`: the bridge has no hook
# there, so `icp_lens.hooks` makes one), as the `ScoreTable` that `icp-lens score` writes
# for image probes (and `icp-lens prune` reads): attribution patching ranks all 844 units
# with one backward pass per batch, and the top 50 are then patched exactly (`exact` column).

# %%
probe = data_from_probes(org.data_path("probe"), processor, causal=True)  # with the causal images too
scores = score_image_units(bridge, probe, verify_top=50)
scores.top(8)[["feature", "hook_name", "score", "ci_low", "ci_high", "exact"]]

# %% [markdown]
# The language model's first-layer heads carry the most: they move what the image tokens
# hold to the answer position. No single neuron carries much of the background here: the
# colour enters every patch embedding and spreads over the residual stream. Removing units
# would not remove it; this is the case for training, or for removing a *direction*.
#
# ## A direction of the image tokens
#
# Everything the language model knows about the image passes through the projector's
# output, one vector per image token. The leading direction of the differences between
# each image's tokens and its background swap's is the background's axis there;
# `applying_image_directions` holds that coordinate at its mean (`fold_image_directions`
# writes the same edit into the projector's weights). `share` is the part of the
# background's effect on the answer that runs through it.

# %%
direction = fit_image_directions(bridge, probe, rank=1, keep_causal=0)
image_direction_effects(bridge, probe, direction)[["effect", "total", "share"]]


# %%
def groups_of(edited):
    ok = edited == test.labels
    return {"worst_group": min(ok[test.groups == g].float().mean().item() for g in test.groups.unique()),
            "average": ok.float().mean().item(), "share answered 'waterbird'": (edited == 1).float().mean().item()}


with applying_image_directions(bridge, direction):
    edited = predict_classes(bridge, test)
groups_of(edited)

# %% [markdown]
# On this organism the model then answers one class everywhere: the bird's evidence went
# with the background. The probe rows also carry a *causal* counterfactual image (the other
# bird on the same background, `image_causal_counterfactual`), which measures the bird's
# own direction. By default, when those images are there, the background's direction is
# made orthogonal to the bird's, and `cos_causal` says how much the two shared:

# %%
kept = fit_image_directions(bridge, probe, rank=1)  # keep_causal=1 by default with causal images
{"cos_causal": kept.cos_causal, "share of the background's effect left to remove":
 image_direction_effects(bridge, probe, kept)["share"].item()}

# %% [markdown]
# A cosine near 1: at the projector's output, after the vision tower, background and bird
# move the *same* axis (the class evidence), told apart only by which token they sit in.
# No direction there removes one and keeps the other. Upstream, at the vision tower's
# embeddings, a patch token is still a linear map of its own pixels: the background colour
# and the bird's shape are different directions. `site="vision_embed"` fits there, and the
# edit folds into the patch convolution and the position embeddings just as exactly:

# %%
embed = fit_image_directions(bridge, probe, rank=1, site="vision_embed")
with applying_image_directions(bridge, embed):
    edited = predict_classes(bridge, test)
{"cos_causal": embed.cos_causal, **groups_of(edited)}

# %% [markdown]
# No training and no group labels: one direction of the embeddings brings the worst group
# close to the oracle's. `benchmarks/results/multimodal_directions.md` has every site, rank
# and number of kept causal directions on three organisms, with the setting chosen per
# seed on validation data.
#
# ## CIMRL against ERM
#
# Both fine-tune the organism on its training split for the same steps. CIMRL's three
# terms: InfoNCE between an image and its background swap (a targeted perturbation), the
# modality-disentanglement heads with their orthogonality penalty, and KL consistency under
# counterfactuals built from input-gradient attributions. No group labels. Both keep the
# checkpoint with the best *counterfactual accuracy* on the probe split (validation: right on
# the image and on its background swap), measured every 25 steps (`val=probe`; the CLI's
# `--val PROBE --early-stopping counterfactual_accuracy`): CIMRL's invariance can come and go
# with more steps, and the last step alone is a gamble.

# %%
train = data_from_probes(org.data_path("train"), processor)


def worst_group(model) -> dict[str, float]:
    ok = predict_classes(model, test) == test.labels
    groups = [ok[test.groups == g].float().mean().item() for g in test.groups.unique()]
    return {"worst_group": min(groups), "average": ok.float().mean().item()}


rows = {"original": worst_group(org.load_hf()), "oracle": worst_group(org.load_hf(oracle=True))}
for objective in ("erm", "cimrl"):
    model = org.load_hf()
    result = train_multimodal(model, train, MultimodalTrainConfig(objective=objective, steps=100), val=probe)
    rows[objective] = {**worst_group(model), "best_step": result.best_step, "seconds": result.seconds}
table = pd.DataFrame(rows).T
table

# %%
ax = table[["worst_group", "average"]].plot.bar(figsize=(6.5, 3), rot=0)
style(ax, title="balanced test set (background independent of the label)", ylabel="accuracy")
label_bars(ax)
reference_line(ax, 0.5, "chance", color="grey")
legend_outside(ax)

# %% [markdown]
# ERM keeps following the background; CIMRL moves the worst group most of the way to the
# oracle's without a single group label. `benchmarks/multimodal_table.py` runs every
# method (ERM, JTT, GroupDRO, each CIMRL term alone, the combination and its ablations) on
# three seeds; the same fine-tune is `icp-lens train --model DIR/model --train
# DIR/train.jsonl --out OUT` (the default objective for image probes is `cimrl`).
