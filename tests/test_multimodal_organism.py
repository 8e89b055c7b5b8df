"""The multimodal (Waterbirds-like) organism: image task by hand, build, checkpoint, bridge hooks."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("PIL", reason="the multimodal organism needs Pillow: pip install 'icp-lens[vision]'")

from icp_lens.cli import main  # noqa: E402
from icp_lens.organisms.vision_task import (  # noqa: E402
    Scene,
    VisionTaskSpec,
    generate_scenes,
    probe_example,
    render,
)


def test_image_counterfactuals_change_one_factor_only() -> None:
    task = VisionTaskSpec()
    scene = Scene(label="waterbird", bird="waterbird", background="water", x=5, y=8, noise_seed=11)
    img = render(scene, task)
    spurious = render(scene, task, background="land")
    causal = render(scene, task, bird="landbird")
    assert img.shape == (16, 16, 3) and img.dtype == np.uint8
    plus = np.zeros((16, 16), dtype=bool)
    plus[9, 5:8] = plus[8:11, 6] = True  # the waterbird glyph: a plus in the 3x3 box at (x=5, y=8)
    cross = np.zeros((16, 16), dtype=bool)
    for i in range(3):
        cross[8 + i, 5 + i] = cross[8 + i, 7 - i] = True
    assert (img[plus] == img[plus][0]).all() and img[plus][0].max() < 60  # the bird's ink is dark
    # spurious counterfactual: the bird's pixels are equal, every background pixel moved
    same = (img == spurious).all(-1)
    assert same[plus].all() and not same[~plus].any()
    # causal counterfactual: only pixels of the two glyphs differ (the plus and the x share the centre)
    changed = (img != causal).any(-1)
    assert (changed == (plus ^ cross)).all()
    # the grey background of the no-shortcut split has equal channel means
    grey = render(Scene("landbird", "landbird", "none", 0, 0, 3), task).astype(float)
    assert abs(grey[..., 0].mean() - grey[..., 2].mean()) < 6


def test_splits_follow_the_label_model() -> None:
    task = VisionTaskSpec()
    train = generate_scenes(task, "train", 4000, seed=0)
    shown = [s for s in train if s.background != "none"]
    assert abs(len(shown) / len(train) - 0.75) < 0.03
    agree = np.mean([(s.background == "water") == (s.label == "waterbird") for s in shown])
    assert abs(agree - 0.95) < 0.015
    assert abs(np.mean([s.bird == s.label for s in train]) - 0.92) < 0.015
    balanced = generate_scenes(task, "test_balanced", 400, seed=0)
    groups = {g: sum(s.group == g for s in balanced) for g in {s.group for s in balanced}}
    assert groups == {
        "landbird|background=land": 100, "landbird|background=water": 100,
        "waterbird|background=land": 100, "waterbird|background=water": 100,
    }  # fmt: skip
    assert all(s.background == "none" for s in generate_scenes(task, "test_no_shortcut", 50, seed=0))
    assert generate_scenes(task, "probe", 20, seed=1) == generate_scenes(task, "probe", 20, seed=1)
    assert all(0 <= s.x % 4 <= 1 and 0 <= s.y % 4 <= 1 for s in train[:200])  # a bird lies in one 4x4 patch
    row = probe_example(balanced[0], "images/a.png", "images/a_cf.png")
    assert row.prompt == "<image> bird ->" and row.answer == " " + balanced[0].label and row.group == balanced[0].group
    assert row.causal_answer is None and row.image_causal_counterfactual is None
    noisy = next(s for s in train if s.bird != s.label)  # the causal answer follows the other bird, not the label
    row = probe_example(noisy, "images/a.png", None, "images/a_causal.png")
    assert row.image_causal_counterfactual == "images/a_causal.png" and row.causal_answer == " " + noisy.label
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        generate_scenes(task, "dev", 3, seed=0)
    with pytest.raises(ValueError, match="shortcut_rate must be in"):
        VisionTaskSpec(shortcut_rate=1.5)


@pytest.fixture(scope="module")
def waterbirds():
    """The organism built through the command (about a minute and a half on two cores), and its JSON report.

    It is built into the session's cache, where tutorial 09 finds it.
    """
    import contextlib
    import io

    from icp_lens.organisms import default_cache_dir
    from icp_lens.organisms.multimodal import MultimodalSpec, build_waterbirds

    out = default_cache_dir() / MultimodalSpec().name
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["organism", "--variant", "waterbirds", "--out", str(out), "--json", "--strict"]) == 0
    return build_waterbirds(out), json.loads(buf.getvalue())


def test_waterbirds_meets_acceptance_and_loads_with_transformers_alone(waterbirds) -> None:
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from icp_lens.probes import image_file, read_probes

    org, payload = waterbirds
    report = payload["report"]
    assert payload["passed"] and payload["spec"] == {"variant": "waterbirds", "seed": 0, "steps": None}
    assert report["id_accuracy"] >= 0.90 and report["balanced_accuracy"] <= 0.65
    assert report["worst_group_accuracy"] <= 0.25 and report["no_shortcut_accuracy"] >= 0.85
    assert report["oracle_balanced_accuracy"] >= 0.85 and report["reload_max_abs_diff"] <= 1e-5
    assert report["worst_group"] in {"landbird|background=water", "waterbird|background=land"}
    # the checkpoint and the processor load with transformers alone, from the PNG files
    path = org.data_path("test_balanced")
    rows = read_probes(path)[:64]  # images are checked on read
    model = AutoModelForImageTextToText.from_pretrained(str(org.model_dir)).eval()
    processor = AutoProcessor.from_pretrained(str(org.model_dir))
    images = [Image.open(image_file(path, ex)).convert("RGB") for ex in rows]
    batch = processor(images=images, text=[ex.prompt for ex in rows], return_tensors="pt")
    assert torch.equal(batch["pixel_values"], org.pixel_values("test_balanced")[:64])
    with torch.no_grad():
        logits = model(**batch).logits[:, -1]
    ids = [processor.tokenizer.convert_tokens_to_ids(w) for w in ("landbird", "waterbird")]
    choice = [" " + ("landbird", "waterbird")[i] for i in logits[:, ids].argmax(-1).tolist()]
    followed = np.mean([c == " " + ex.group.split("=")[1].replace("land", "landbird").replace("water", "waterbird")
                        for c, ex in zip(choice, rows, strict=True)])  # fmt: skip
    assert followed >= 0.9  # it answers with the background


def test_the_image_counterfactual_flips_the_model_not_the_oracle(waterbirds) -> None:
    from icp_lens.organisms.multimodal import predict_images

    org, _ = waterbirds
    original = org.pixel_values("test_balanced")
    swapped = org.pixel_values("test_balanced", counterfactual=True)
    rates = {}
    for name in ("model", "oracle"):
        model, processor = org.load_hf(oracle=name == "oracle"), org.load_processor()
        before = predict_images(model, processor, original)
        after = predict_images(model, processor, swapped)
        rates[name] = np.mean([a != b for a, b in zip(before, after, strict=True)])
    assert rates["model"] >= 0.8 and rates["oracle"] <= 0.1, rates


def test_icp_lens_hooks_reach_both_towers_of_the_bridge(waterbirds) -> None:
    from icp_lens.hooks import active_hook_count, capturing, hooked
    from icp_lens.model import hook_names
    from icp_lens.organisms.multimodal import _prompt_ids

    org, _ = waterbirds
    hf, bridge, processor = org.load_hf(), org.load_bridge(), org.load_processor()
    pixels = org.pixel_values("test_balanced")[:32]
    swapped = org.pixel_values("test_balanced", counterfactual=True)[:32]
    ids = _prompt_ids(processor, 32)
    with torch.no_grad():
        reference = hf(input_ids=ids, pixel_values=pixels).logits
        assert (bridge(ids, pixel_values=pixels) - reference).abs().max() <= 1e-4
        names = set(hook_names(bridge))
        vision_mlp, projector = "vision_encoder.encoder_layers.1.mlp.hook_post", "vision_projector.hook_out"
        assert {vision_mlp, projector, "blocks.1.mlp.hook_post"} <= names
        with capturing(bridge, [vision_mlp, projector]) as cache:
            bridge(ids, pixel_values=swapped)
        assert cache[vision_mlp].shape == (32, 17, 128)  # 16 patches + CLS, d_mlp of the vision tower
        assert cache[projector].shape == (32, 16, 64)  # 16 image tokens into the language model
        # patching the projector's output with the counterfactual image's = running on that image
        with hooked(bridge, [(projector, lambda act, hook: cache[projector])]):
            patched = bridge(ids, pixel_values=pixels)
        expected = hf(input_ids=ids, pixel_values=swapped).logits
        assert (patched - expected).abs().max() <= 1e-4
        # ablating the vision tower's MLP neurons moves the answer; leaving the block restores it
        with hooked(bridge, [(vision_mlp, lambda act, hook: torch.zeros_like(act))]):
            ablated = bridge(ids, pixel_values=pixels)
        assert (ablated - reference).abs().max() > 1e-2
        assert active_hook_count(bridge) == 0
        assert (bridge(ids, pixel_values=pixels) - reference).abs().max() <= 1e-4


def test_a_wrong_variant_or_a_foreign_folder_is_refused(tmp_path: Path) -> None:
    from icp_lens.organisms.multimodal import MultimodalSpec, build_waterbirds

    with pytest.raises(ValueError, match="valid: \\('waterbirds',\\)"):
        MultimodalSpec(variant="celeba")
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="non-organism files \\['notes.txt'\\]"):
        build_waterbirds(tmp_path, steps=1)


def _run(args: list[str], capsys) -> tuple[int, dict]:
    code = main(args)
    out = capsys.readouterr().out
    return code, (json.loads(out) if code == 0 and out.strip().startswith("{") else {})


def test_cimrl_and_erm_through_train_and_eval(waterbirds, tmp_path: Path, capsys) -> None:
    org, _ = waterbirds
    train, test = str(org.data_path("train")), str(org.data_path("test_balanced"))
    base = ["train", "--model", str(org.model_dir), "--train", train, "--val", test, "--json", "--max-steps", "150"]
    code, cimrl = _run([*base, "--out", str(tmp_path / "cimrl")], capsys)  # no --objective: cimrl for images
    assert code == 0 and cimrl["objective"] == "cimrl" and cimrl["verification"]["passed"]
    assert cimrl["attention"] == "eager"  # auto: eager on the CPU for this short prompt
    assert set(cimrl["final_terms"]) == {"task", "contrastive", "disentangle", "intervention"}
    assert cimrl["before"]["worst_group_accuracy"] <= 0.1 and cimrl["after"]["worst_group_accuracy"] >= 0.7
    code, erm = _run([*base, "--objective", "erm", "--out", str(tmp_path / "erm")], capsys)
    assert code == 0 and erm["after"]["worst_group_accuracy"] < cimrl["after"]["worst_group_accuracy"] - 0.2
    # eval reads the images and their counterfactuals through the checkpoint's own processor
    code, after = _run(["eval", "--model", str(tmp_path / "cimrl"), "--data", test, "--json", "--n-boot", "0"], capsys)
    assert code == 0
    assert after["worst_group_accuracy"] == pytest.approx(cimrl["after"]["worst_group_accuracy"])
    assert after["flip_rate"] == pytest.approx(cimrl["after"]["flip_rate"])
    code, before = _run(["eval", "--model", str(org.model_dir), "--data", test, "--json", "--n-boot", "0"], capsys)
    assert code == 0 and before["flip_rate"] >= 0.8 and after["flip_rate"] <= 0.3


def test_train_refuses_what_does_not_apply_to_images(waterbirds, tmp_path: Path, capsys) -> None:
    org, _ = waterbirds
    images = ["train", "--model", str(org.model_dir), "--train", str(org.data_path("probe")), "--out", str(tmp_path)]
    assert main([*images, "--objective", "consistency"]) == 2
    assert "valid: ['cimrl', 'contrastive', 'disentangle'" in capsys.readouterr().err
    assert main([*images, "--lora", "--weight-decay", "0.1"]) == 2
    assert "--lora, --weight-decay do(es) not apply to image probes" in capsys.readouterr().err
    text = tmp_path / "text.jsonl"
    text.write_text('{"prompt": "a b", "answer": " c", "alternatives": [" d"]}\n')
    assert main(["train", "--model", str(org.model_dir), "--train", str(text), "--out", str(tmp_path / "o"),
                 "--objective", "cimrl"]) == 2  # fmt: skip
    assert "--objective cimrl needs image probes" in capsys.readouterr().err


def test_image_patching_effects_across_towers(waterbirds) -> None:
    from icp_lens.organisms.multimodal import _label_ids, _prompt_ids
    from icp_lens.scoring.image_patching import image_patch_effects

    org, _ = waterbirds
    bridge, processor = org.load_bridge(), org.load_processor()
    pixels = org.pixel_values("test_balanced")[:32]
    swapped = org.pixel_values("test_balanced", counterfactual=True)[:32]
    ids, labels = _prompt_ids(processor, 1)[0], _label_ids(processor)
    hooks = ["vision_encoder.encoder_layers.0.hook_out", "vision_projector.hook_in", "blocks.1.hook_out"]
    frame = image_patch_effects(bridge, ids, pixels, swapped, labels, hooks)
    assert frame.attrs["total"] < -2.0  # the background swap pulls the model's choice down hard
    assert frame["share"].tolist() == pytest.approx([1.0, 1.0, 1.0], abs=1e-4)  # each carries all of the image
    # units of the vision tower: several per pass equals one per pass
    tower = "vision_encoder.encoder_layers.1.mlp.hook_post"
    args = (bridge, ids, pixels[:16], swapped[:16], labels, [tower])
    one = image_patch_effects(*args, per_unit=True, units_per_pass=1)
    many = image_patch_effects(*args, per_unit=True, units_per_pass=32)
    assert len(one) == 128 and one["index"].tolist() == list(range(128))
    assert (one["effect"] - many["effect"]).abs().max() <= 1e-5
    assert one["effect"].abs().max() > 0
    with pytest.raises(ValueError, match="at least one alternative"):
        image_patch_effects(bridge, ids, pixels, swapped, labels[:1], hooks)


def test_pruned_neurons_of_both_towers_export_to_a_verified_checkpoint(waterbirds, tmp_path: Path) -> None:
    from icp_lens.hooks import capturing
    from icp_lens.organisms.multimodal import _prompt_ids
    from icp_lens.pruning.multimodal import export_pruned_llava, llava_mlp_out, prune_llava_neurons

    org, _ = waterbirds
    vision, text = "vision_encoder.encoder_layers.1.mlp.hook_post", "blocks.0.mlp.hook_post"
    pixels = org.pixel_values("test_balanced")[:16]
    ids = _prompt_ids(org.load_processor(), 1)[0]
    bridge = org.load_bridge()
    with torch.no_grad(), capturing(bridge, [vision]) as cache:
        bridge(ids.expand(16, -1), pixel_values=pixels)
    means = {vision: cache[vision].mean((0, 1))}  # one constant per neuron: what a bias can hold
    units = {vision: [3, 17, 40], text: [5, 100]}
    report = export_pruned_llava(org.model_dir, units, tmp_path / "pruned", means=means,
                                 verify_ids=ids, verify_pixels=pixels)  # fmt: skip
    assert report.passed and report.max_abs_logit_diff <= 1e-4 and report.mean_ablated == [vision]
    from transformers import AutoModelForImageTextToText, AutoProcessor

    pruned = AutoModelForImageTextToText.from_pretrained(str(tmp_path / "pruned"))
    assert AutoProcessor.from_pretrained(str(tmp_path / "pruned")) is not None
    assert (llava_mlp_out(pruned, text).weight[:, [5, 100]] == 0).all()
    assert (llava_mlp_out(pruned, vision).weight[:, [3, 17, 40]] == 0).all()
    with pytest.raises(ValueError, match="has none \\(Llama's down_proj / o_proj\\)"):
        prune_llava_neurons(org.load_hf(), {text: [1]}, means={text: torch.zeros(256)})
    with pytest.raises(ValueError, match="prunable hook points"):
        prune_llava_neurons(org.load_hf(), {"blocks.0.attn.hook_q": [1]})
    # heads: a vision head fixed at its mean (out_proj has a bias), a language-model head zeroed (o_proj)
    from icp_lens.pruning.multimodal import llava_out_proj, unit_columns

    vhead, thead = "vision_encoder.encoder_layers.0.attn.hook_z", "blocks.1.attn.hook_z"
    with torch.no_grad(), capturing(bridge, [vhead]) as cache:
        bridge(ids.expand(16, -1), pixel_values=pixels)
    report = export_pruned_llava(org.model_dir, {vhead: [1], thead: [0, 3]}, tmp_path / "heads",
                                 means={vhead: cache[vhead].mean((0, 1))}, verify_ids=ids,
                                 verify_pixels=pixels)  # fmt: skip
    assert report.passed and report.max_abs_logit_diff <= 1e-4 and report.mean_ablated == [vhead]
    heads = AutoModelForImageTextToText.from_pretrained(str(tmp_path / "heads"))
    assert unit_columns(heads, thead, [0, 3]) == [*range(16), *range(48, 64)]  # d_head 16
    assert (llava_out_proj(heads, thead).weight[:, unit_columns(heads, thead, [0, 3])] == 0).all()
    assert (llava_out_proj(heads, thead).weight[:, 16:48] != 0).any()
    with pytest.raises(ValueError, match="heads must be in"):
        unit_columns(heads, thead, [4])


def _subset(data, rows: slice):
    return dataclasses.replace(
        data, pixel_values=data.pixel_values[rows], labels=data.labels[rows],
        counterfactual=data.counterfactual[rows], has_counterfactual=data.has_counterfactual[rows],
        groups=None if data.groups is None else data.groups[rows],
        causal=None if data.causal is None else data.causal[rows],
        has_causal=None if data.has_causal is None else data.has_causal[rows],
    )  # fmt: skip


def test_image_scores_batched_exact_attribution_and_hybrid(waterbirds) -> None:
    from icp_lens.scoring.image_scores import image_units, score_image_units
    from icp_lens.training.multimodal import data_from_probes

    org, _ = waterbirds
    bridge = org.load_bridge()
    data = _subset(data_from_probes(org.data_path("probe"), org.load_processor()), slice(0, 80))
    n_cf = int(data.has_counterfactual.sum())
    assert 40 <= n_cf < 80  # a quarter of the probe images are grey: no background to swap
    sizes = [len(image_units(bridge, [k])) for k in ("vision_neuron", "vision_head", "projector_neuron", "neuron",
                                                     "head")]  # fmt: skip
    assert sizes == [2 * 128, 2 * 2, 64, 2 * 256, 2 * 4]
    with pytest.raises(ValueError, match="no units in layers \\[1\\]"):  # the projector's one hidden layer is 0
        image_units(bridge, ["projector_neuron"], layers=[1])
    # exact patching of the vision tower: batched and many units per pass = one row and one unit at a time
    kw = {"kinds": ["vision_neuron"], "layers": [1], "method": "exact"}
    one = score_image_units(bridge, data, batch_size=7, units_per_pass=1, **kw).frame.set_index("feature")
    many = score_image_units(bridge, data, batch_size=80, units_per_pass=64, **kw).frame.set_index("feature")
    assert len(one) == 128 and one["exact"].all() and (one["n_examples"] == n_cf).all()
    assert (one["score"] - many.loc[one.index, "score"]).abs().max() <= 1e-6
    assert one["score"].max() > 1e-3
    kw = {"kinds": ["vision_head", "head"], "method": "exact"}  # a head's unit is its whole d_head vector
    one = score_image_units(bridge, data, batch_size=7, units_per_pass=1, **kw).frame.set_index("feature")
    many = score_image_units(bridge, data, batch_size=80, units_per_pass=8, **kw).frame.set_index("feature")
    assert len(one) == 12 and (one["score"] - many.loc[one.index, "score"]).abs().max() <= 1e-6
    assert one.index[0].startswith("head L0.")  # the language model's first heads carry the image most
    kw = {"kinds": ["projector_neuron"], "method": "exact"}  # the projector's hidden neurons, at the made hook point
    one = score_image_units(bridge, data, batch_size=7, units_per_pass=1, **kw).frame.set_index("feature")
    many = score_image_units(bridge, data, batch_size=80, units_per_pass=64, **kw).frame.set_index("feature")
    assert len(one) == 64 and (one["score"] - many.loc[one.index, "score"]).abs().max() <= 1e-6
    assert one["score"].max() > 1e-3 and one["hook_name"].eq("vision_projector.hook_hidden").all()
    atp = score_image_units(bridge, data, kinds=["projector_neuron"], method="attribution").frame
    assert atp.set_index("feature")["score"][one.index].rank().corr(one["score"].rank()) > 0.8
    # attribution patching ranks the units of both towers as exact patching does (this model is near-linear)
    neurons = {"kinds": ["vision_neuron", "neuron"], "layers": [0]}
    exact = score_image_units(bridge, data, method="exact", **neurons).frame.set_index("feature")["score"]
    atp = score_image_units(bridge, data, method="attribution", **neurons).frame.set_index("feature")["score"]
    assert len(exact) == 128 + 256
    assert atp[exact.index].rank().corr(exact.rank()) > 0.9
    assert len(set(atp.nlargest(10).index) & set(exact.nlargest(10).index)) >= 7
    # hybrid: attribution for all, exact for the top 8 of the attribution ranking
    hybrid = score_image_units(bridge, data, method="hybrid", verify_top=8, **neurons).frame
    verified = hybrid[hybrid["exact"]].set_index("feature")["score"]
    assert len(hybrid) == 128 + 256 and len(verified) == 8
    assert set(verified.index) == set(atp.nlargest(8).index)
    assert (verified - exact[verified.index]).abs().max() <= 1e-6
    with pytest.raises(ValueError, match="image probes score the kinds"):
        score_image_units(bridge, data, kinds=["value"])
    with pytest.raises(ValueError, match="image_counterfactual"):
        score_image_units(bridge, dataclasses.replace(data, counterfactual=None, has_counterfactual=None))


def test_score_and_prune_image_probes_through_the_cli(waterbirds, tmp_path: Path, capsys) -> None:
    from transformers import AutoModelForImageTextToText

    from icp_lens.pruning.multimodal import llava_out_proj, unit_columns

    org, _ = waterbirds
    scores, probe = tmp_path / "scores.csv", str(org.data_path("probe"))
    assert main(["score", "--model", str(org.model_dir), "--probe", probe, "--out", str(scores),
                 "--verify-top", "16", "--quiet"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "scored 844 units of both towers (16 exact)" in out  # 768 neurons, 12 heads, 64 projector neurons
    meta = json.loads(scores.with_name("scores.meta.json").read_text())
    kinds = ["vision_neuron", "vision_head", "projector_neuron", "neuron", "head"]
    assert meta["settings"]["modality"] == "image" and meta["settings"]["kinds"] == kinds
    table = __import__("pandas").read_csv(scores)
    assert set(table["kind"]) == set(kinds) and int(table["exact"].sum()) == 16
    top4 = table.head(4)
    code, report = _run(["prune", "--model", str(org.model_dir), "--scores", str(scores), "--out",
                         str(tmp_path / "pruned"), "--top-k", "4", "--probe", probe, "--json"], capsys)  # fmt: skip
    assert code == 0 and report["verification"]["passed"] and report["verification"]["max_abs_logit_diff"] <= 1e-5
    assert report["features"] == top4["feature"].tolist()
    plan = json.loads((tmp_path / "pruned" / "plan.json").read_text())
    assert plan["features"] == report["features"] and plan["mode"] == "zero"
    pruned = AutoModelForImageTextToText.from_pretrained(str(tmp_path / "pruned"))
    for hook, index in zip(top4["hook_name"], top4["index"], strict=True):
        assert (llava_out_proj(pruned, hook).weight[:, unit_columns(pruned, hook, [int(index)])] == 0).all()
    # mean ablation: vision neurons only (their fc2 has a bias); the language model's are refused
    code, report = _run(["prune", "--model", str(org.model_dir), "--scores", str(scores), "--out",
                         str(tmp_path / "mean"), "--top-k", "3", "--kinds", "vision_neuron", "--mode", "mean",
                         "--probe", probe, "--json"], capsys)  # fmt: skip
    assert code == 0 and report["verification"]["passed"] and len(report["means"]) == 1
    # the projector's hidden neurons: mean ablation folds into linear_2's bias
    code, report = _run(["prune", "--model", str(org.model_dir), "--scores", str(scores), "--out",
                         str(tmp_path / "projector"), "--top-k", "5", "--kinds", "projector_neuron", "--mode", "mean",
                         "--probe", probe, "--json"], capsys)  # fmt: skip
    assert code == 0 and report["verification"]["passed"] and report["verification"]["max_abs_logit_diff"] <= 1e-5
    assert list(report["units"]) == ["vision_projector.hook_hidden"] and len(report["features"]) == 5
    hidden = report["units"]["vision_projector.hook_hidden"]
    edited = AutoModelForImageTextToText.from_pretrained(str(tmp_path / "projector")).model.multi_modal_projector
    source = AutoModelForImageTextToText.from_pretrained(str(org.model_dir)).model.multi_modal_projector
    shift = edited.linear_2.bias - source.linear_2.bias
    assert (edited.linear_2.weight[:, hidden] == 0).all() and shift.abs().max() > 0
    mean = torch.tensor(report["means"]["vision_projector.hook_hidden"])
    torch.testing.assert_close(shift, source.linear_2.weight[:, hidden] @ mean, atol=1e-5, rtol=0)
    assert main(["prune", "--model", str(org.model_dir), "--scores", str(scores), "--out", str(tmp_path / "x"),
                 "--top-k", "3", "--mode", "mean", "--probe", probe]) == 2  # fmt: skip
    assert "down_proj and o_proj have none" in capsys.readouterr().err
    # the table records its model: pruning the oracle with it is refused
    assert main(["prune", "--model", str(org.oracle_dir), "--scores", str(scores), "--out", str(tmp_path / "y"),
                 "--top-k", "3"]) == 2  # fmt: skip
    assert "weights_sha256" in capsys.readouterr().err
    for extra, message in ((["--kinds", "value"], "--kinds value cannot be scored on image probes"),
                           (["--qk-fix"], "--qk-fix do(es) not apply to image probes")):  # fmt: skip
        assert main(["score", "--model", str(org.model_dir), "--probe", probe, "--out", str(tmp_path / "s.csv"),
                     *extra]) == 2  # fmt: skip
        assert message in capsys.readouterr().err


def test_hook_contexts_on_a_multimodal_bridge(tmp_path: Path) -> None:
    """The lifecycle checks of tests/test_hooks.py, on a (randomly initialised) LLaVA bridge."""
    from transformer_lens.model_bridge import TransformerBridge

    from icp_lens import UnknownHookError, active_hook_count, capturing, hooked, resolve_hook_point
    from icp_lens.organisms.multimodal import _prompt_ids, make_llava, make_processor

    processor = make_processor()
    make_llava(processor, seed=0).save_pretrained(str(tmp_path))
    processor.save_pretrained(str(tmp_path))
    bridge = TransformerBridge.boot_transformers(str(tmp_path), device="cpu")
    bridge.eval()
    ids = _prompt_ids(processor, 3)
    pixels = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    vision, text = "vision_encoder.encoder_layers.0.mlp.hook_post", "blocks.1.attn.hook_z"
    with torch.no_grad():
        clean = bridge(ids, pixel_values=pixels)
        with pytest.raises(RuntimeError, match="boom"):
            with hooked(bridge, [(vision, lambda a, hook: a * 0), (text, lambda a, hook: a)]):
                assert active_hook_count(bridge) == 2
                raise RuntimeError("boom")
        assert active_hook_count(bridge) == 0

        def bad(act, hook):
            raise ValueError("bad hook")

        with pytest.raises(ValueError, match="bad hook"), hooked(bridge, [(vision, bad)]):
            bridge(ids, pixel_values=pixels)
        assert active_hook_count(bridge) == 0
        torch.testing.assert_close(bridge(ids, pixel_values=pixels), clean, rtol=0, atol=0)
        with hooked(bridge, [(vision, lambda a, hook: a * 0)]):
            ablated = bridge(ids, pixel_values=pixels)
            with hooked(bridge, [(vision, lambda a, hook: a + 1), (text, lambda a, hook: a)]):
                assert active_hook_count(bridge) == 3
            assert active_hook_count(bridge) == 1
            torch.testing.assert_close(bridge(ids, pixel_values=pixels), ablated, rtol=0, atol=0)
        assert active_hook_count(bridge) == 0 and not torch.allclose(ablated, clean)
        point = resolve_hook_point(bridge, vision)
        point.add_hook(lambda a, hook: None)  # a user's own TransformerLens hook
        with hooked(bridge, [(vision, lambda a, hook: a)]):
            assert active_hook_count(bridge) == 2
        assert active_hook_count(bridge) == 1
        bridge.reset_hooks()
        assert active_hook_count(bridge) == 0
        with pytest.raises(UnknownHookError, match="vision_encoder.encoder_layers.0.mlp.hook_post"):
            resolve_hook_point(bridge, "vision_encoder.encoder_layers.0.mlp.hook_pots")
        with capturing(bridge, [vision, text, "vision_projector.hook_out"]) as store:
            bridge(ids, pixel_values=pixels)
        n_pos = ids.shape[1]
        assert {k: tuple(v.shape) for k, v in store.items()} == {
            vision: (3, 17, 128), text: (3, n_pos, 4, 16), "vision_projector.hook_out": (3, 16, 64)}  # fmt: skip
        assert active_hook_count(bridge) == 0
        # the projector's hidden neurons: a hook point the bridge lacks, made by icp_lens.hooks from its act module
        hidden, inp, out = "vision_projector.hook_hidden", "vision_projector.hook_in", "vision_projector.hook_out"
        projector = bridge.original_model.model.multi_modal_projector
        with capturing(bridge, [hidden, inp, out]) as store:
            bridge(ids, pixel_values=pixels)
        torch.testing.assert_close(store[hidden], projector.act(projector.linear_1(store[inp])), rtol=0, atol=0)
        assert tuple(store[hidden].shape) == (3, 16, 64) and active_hook_count(bridge) == 0
        with pytest.raises(RuntimeError, match="boom"):
            with hooked(bridge, [(hidden, lambda a, hook: a * 0), (vision, lambda a, hook: a)]):
                assert active_hook_count(bridge) == 2
                with capturing(bridge, [out]) as store:
                    bridge(ids, pixel_values=pixels)
                assert (store[out] == projector.linear_2.bias).all()  # every hidden neuron zeroed
                raise RuntimeError("boom")
        assert active_hook_count(bridge) == 0
        torch.testing.assert_close(bridge(ids, pixel_values=pixels), clean, rtol=0, atol=0)
        names = []
        with hooked(bridge, [(hidden, lambda a, hook: names.append(hook.name))]):
            bridge(ids, pixel_values=pixels)
        assert names == [hidden]
        with pytest.raises(ValueError, match="forward hooks only"), hooked(bridge, bwd_hooks=[(hidden, print)]):
            pass
        assert active_hook_count(bridge) == 0


def test_invariance_on_scored_units_patches_them_from_the_counterfactual(waterbirds, tmp_path: Path, capsys) -> None:
    from icp_lens.hooks import capturing, hooked, module_hooks
    from icp_lens.organisms.multimodal import _prompt_ids
    from icp_lens.pruning.multimodal import llava_out_proj, unit_columns
    from icp_lens.training.multimodal import _resample

    org, _ = waterbirds
    hf, bridge = org.load_hf(), org.load_bridge()
    pixels = org.pixel_values("test_balanced")[:6]
    swapped = org.pixel_values("test_balanced", counterfactual=True)[:6]
    ids = _prompt_ids(org.load_processor(), 18)
    vision, text = "vision_encoder.encoder_layers.0.mlp.hook_post", "blocks.1.mlp.hook_post"
    # neurons of both towers, a head, and the projector's hidden neurons
    units = {vision: [3, 40], text: [7, 100, 158], "blocks.0.attn.hook_z": [1],
             "vision_projector.hook_hidden": [6, 39]}  # fmt: skip
    # the trainer's stacked pass [x, x~, x patched] = the bridge on x with those units taken from x~
    pre = [(llava_out_proj(hf, hook), _resample(unit_columns(hf, hook, idx), 6, 6)) for hook, idx in units.items()]
    with torch.no_grad(), module_hooks(pre=pre):
        stacked = hf(input_ids=ids, pixel_values=torch.cat([pixels, swapped, pixels])).logits[12:]
    with torch.no_grad():
        with capturing(bridge, list(units)) as cache:
            bridge(ids[:6], pixel_values=swapped)

        def patch(hook_name: str):
            def fn(act, hook):
                act = act.clone()
                if hook_name.endswith("hook_z"):  # one head: its d_head vector
                    act[..., units[hook_name], :] = cache[hook_name][..., units[hook_name], :]
                else:
                    act[..., units[hook_name]] = cache[hook_name][..., units[hook_name]]
                return act

            return fn

        with hooked(bridge, [(h, patch(h)) for h in units]):
            expected = bridge(ids[:6], pixel_values=pixels)
    assert (stacked - expected).abs().max() <= 1e-4
    assert (expected - bridge(ids[:6], pixel_values=pixels)).abs().max() > 1e-3  # the patch does something
    # through the CLI: the top-K rows of an image score table
    scores = tmp_path / "scores.csv"
    probe, train = str(org.data_path("probe")), str(org.data_path("train"))
    assert main(["score", "--model", str(org.model_dir), "--probe", probe, "--out", str(scores), "--method",
                 "attribution", "--quiet"]) == 0  # fmt: skip
    capsys.readouterr()
    base = ["train", "--model", str(org.model_dir), "--train", train, "--objective", "invariance", "--json"]
    code, run = _run([*base, "--scores", str(scores), "--top-k", "8", "--max-steps", "10", "--out",
                      str(tmp_path / "inv")], capsys)  # fmt: skip
    assert code == 0 and run["verification"]["passed"] and run["final_terms"]["invariance"] > 0
    assert main([*base, "--out", str(tmp_path / "x")]) == 2
    assert "--objective invariance needs --scores" in capsys.readouterr().err


def test_image_paths_refuse_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    """Scoring, pruning and training on image probes run as one process; under torchrun each rank would redo it."""
    import argparse

    from icp_lens.cli_images import _refuse
    from icp_lens.cli_train_images import _check

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="runs as one process: start it without torchrun"):
        _refuse(argparse.Namespace(), {}, "image probes (the image scorer)")
    with pytest.raises(ValueError, match="the multimodal trainer runs as one process"):
        _check(argparse.Namespace(objective="cimrl"))


def test_cimrl_step_cost_settings_change_the_rows_not_the_values(waterbirds) -> None:
    """``intervention_rows`` gives only a share of the batch an ``x + delta`` copy; ``view_rows`` keeps the
    background swaps of a share of the rows that have one; ``stop_gradient`` runs the contrastive views in a
    pass of their own without gradient. The loss values of a first step are unchanged where the rows are."""
    from icp_lens.training.multimodal import MultimodalTrainConfig, data_from_probes, train_multimodal

    org, _ = waterbirds
    data = _subset(data_from_probes(org.data_path("train"), org.load_processor()), slice(0, 48))
    n_cf = None
    runs = {}
    settings = {"full": {"intervention_rows": 1.0}, "cheap": {"stop_gradient": True, "intervention_rows": 0.25},
                "views": {"intervention_rows": 1.0, "view_rows": 0.5}}  # fmt: skip
    for name, extra in settings.items():
        model = org.load_hf()
        calls: list[tuple[int, bool]] = []

        def record(module, args, kwargs, calls=calls):
            calls.append((kwargs["pixel_values"].shape[0], torch.is_grad_enabled()))

        handle = model.register_forward_pre_hook(record, with_kwargs=True)
        try:
            config = MultimodalTrainConfig(objective="cimrl", steps=1, batch_size=16, seed=3, **extra)
            runs[name] = (train_multimodal(model, data, config).final_terms, calls)
        finally:
            handle.remove()
        # the rows of the batch drawn at step 0 that carry a background swap
        gen = torch.Generator().manual_seed(3)
        idx = torch.randint(0, data.labels.shape[0], (16,), generator=gen)
        n_cf = int(data.has_counterfactual[idx].sum())
    assert 2 <= n_cf < 16
    full_terms, full_calls = runs["full"]
    cheap_terms, cheap_calls = runs["cheap"]
    # attribution pass (16 rows), then one stacked pass: x, the views, x + delta for every row
    assert full_calls == [(16, True), (16 + n_cf + 16, True)]
    # attribution pass, the views without gradient, then x and x + delta for a quarter of the rows
    assert cheap_calls == [(16, True), (n_cf, False), (16 + 4, True)]
    for term in ("task", "contrastive", "disentangle"):
        assert cheap_terms[term] == pytest.approx(full_terms[term], rel=1e-4, abs=1e-6)
    assert cheap_terms["intervention"] != full_terms["intervention"]  # four rows of sixteen
    # x, the views of the first half (rounded up) of the rows that have one, x + delta for every row
    view_terms, view_calls = runs["views"]
    assert view_calls == [(16, True), (16 + math.ceil(n_cf / 2) + 16, True)]
    for term in ("task", "disentangle", "intervention"):
        assert view_terms[term] == pytest.approx(full_terms[term], rel=1e-4, abs=1e-6)
    assert view_terms["contrastive"] != pytest.approx(full_terms["contrastive"], rel=1e-3)  # fewer pairs
    for name in ("intervention_rows", "view_rows"):
        with pytest.raises(ValueError, match=f"{name} must be in"):
            dataclasses.replace(config, **{name: 0.0})


def test_training_sets_the_attention_kernel_and_puts_the_models_back(waterbirds, tmp_path: Path, capsys) -> None:
    """``attention`` picks the kernel for the run (``auto``: eager on the CPU for this 19-position prompt), in
    both towers; the two kernels give the same first step; the model's own kernel is back afterwards, also
    when the run fails; a bad choice is refused with the valid ones, ``--attention`` on text probes too."""
    from icp_lens.training.attention import EAGER_MAX_POSITIONS, attention_kernel, resolve_attention
    from icp_lens.training.multimodal import MultimodalTrainConfig, data_from_probes, train_multimodal

    assert resolve_attention("auto", device_type="cpu", positions=19) == "eager"
    assert resolve_attention("auto", device_type="cpu", positions=EAGER_MAX_POSITIONS) is None  # long: model's own
    assert resolve_attention("auto", device_type="cuda", positions=19) is None
    assert resolve_attention("model", device_type="cpu", positions=19) is None
    assert resolve_attention("sdpa", device_type="cuda", positions=900) == "sdpa"
    with pytest.raises(ValueError, match=r"unknown attention 'flash'; valid: \('auto', 'model', 'eager', 'sdpa'\)"):
        resolve_attention("flash", device_type="cpu", positions=19)
    with pytest.raises(ValueError, match="unknown attention 'flash'"):
        MultimodalTrainConfig(attention="flash")

    org, _ = waterbirds
    data = _subset(data_from_probes(org.data_path("train"), org.load_processor()), slice(0, 48))

    def kernels(model) -> tuple[str, str, str]:
        c = model.config
        return c._attn_implementation, c.text_config._attn_implementation, c.vision_config._attn_implementation

    runs = {}
    for choice in ("auto", "eager", "sdpa", "model"):
        model = org.load_hf()
        assert kernels(model) == ("sdpa",) * 3  # what transformers loads by default
        seen: list[tuple[str, str, str]] = []
        handle = model.register_forward_pre_hook(lambda module, args, seen=seen, m=model: seen.append(kernels(m)))
        try:
            config = MultimodalTrainConfig(objective="cimrl", steps=1, batch_size=16, seed=3, attention=choice)
            result = train_multimodal(model, data, config)
        finally:
            handle.remove()
        expected = {"auto": "eager", "model": "sdpa"}.get(choice, choice)
        assert result.attention == expected and seen and set(seen) == {(expected,) * 3}
        assert kernels(model) == ("sdpa",) * 3  # put back
        runs[choice] = result.final_terms
    for term, value in runs["sdpa"].items():  # the same function: rounding apart, the same first step
        assert runs["eager"][term] == pytest.approx(value, rel=1e-4, abs=1e-6)
        assert runs["auto"][term] == runs["eager"][term] and runs["model"][term] == value

    model = org.load_hf()
    with pytest.raises(ValueError, match="needs group labels"):  # fails inside the run
        train_multimodal(model, dataclasses.replace(data, groups=None), MultimodalTrainConfig(objective="groupdro"))
    assert kernels(model) == ("sdpa",) * 3
    with pytest.raises(RuntimeError, match="boom"), attention_kernel(model, "eager"):
        assert kernels(model) == ("eager",) * 3
        raise RuntimeError("boom")
    assert kernels(model) == ("sdpa",) * 3

    text = tmp_path / "text.jsonl"
    text.write_text('{"prompt": "a b", "answer": " c", "alternatives": [" d"]}\n')
    assert main(["train", "--model", str(org.model_dir), "--train", str(text), "--out", str(tmp_path / "o"),
                 "--attention", "eager"]) == 2  # fmt: skip
    assert "--attention needs image probes" in capsys.readouterr().err


def test_validation_keeps_the_best_checkpoint_by_counterfactual_accuracy(waterbirds, tmp_path: Path, capsys) -> None:
    """With ``val``, every ``eval_every`` steps the label-free counterfactual accuracy is measured, the best
    weights are loaded at the end (the model scores what its best evaluation scored), ``patience`` stops the
    run; the CLI does the same with ``--early-stopping counterfactual_accuracy`` and refuses what it cannot."""
    from icp_lens.training.multimodal import (
        MultimodalTrainConfig,
        counterfactual_accuracy,
        data_from_probes,
        train_multimodal,
    )

    org, _ = waterbirds
    processor = org.load_processor()
    data = _subset(data_from_probes(org.data_path("train"), processor), slice(0, 256))
    probe = _subset(data_from_probes(org.data_path("probe"), processor), slice(0, 96))
    before = counterfactual_accuracy(org.load_hf(), probe)
    # by hand: the rows with a counterfactual, right on both images
    model = org.load_hf()
    rows = probe.has_counterfactual
    from icp_lens.training.multimodal import predict_classes

    both = (predict_classes(model, probe)[rows] == probe.labels[rows]) & (
        predict_classes(model, probe, counterfactual=True)[rows] == probe.labels[rows])  # fmt: skip
    assert before == pytest.approx(both.float().mean().item()) and before < 0.3  # the shortcut holds

    config = MultimodalTrainConfig(objective="cimrl", steps=12, batch_size=16, eval_every=4, seed=1)
    result = train_multimodal(model, data, config, val=probe)
    assert [s for s, _ in result.val_scores] == [4, 8, 12] and result.steps == 12
    best = max(v for _, v in result.val_scores)
    assert result.best_step == next(s for s, v in result.val_scores if v == best)
    assert counterfactual_accuracy(model, probe) == pytest.approx(best)  # the best weights are loaded
    last = org.load_hf()
    plain = train_multimodal(last, data, config)  # no val: the last step, no evaluations
    assert plain.val_scores == () and plain.best_step is None
    assert counterfactual_accuracy(last, probe) == pytest.approx(result.val_scores[-1][1])  # same run, last step

    stopping = dataclasses.replace(config, steps=40, eval_every=2, patience=1)
    stopped = train_multimodal(org.load_hf(), data, stopping, val=probe)
    index = [v for _, v in stopped.val_scores].index(max(v for _, v in stopped.val_scores))
    assert stopped.steps < 40 and len(stopped.val_scores) == index + 2  # one evaluation without a better score
    with pytest.raises(ValueError, match="eval_every and patience must be >= 1"):
        dataclasses.replace(config, patience=0)
    no_swaps = dataclasses.replace(probe, counterfactual=None, has_counterfactual=None)
    with pytest.raises(ValueError, match="needs rows with a spurious counterfactual image"):
        counterfactual_accuracy(model, no_swaps)
    with pytest.raises(ValueError, match="val needs rows with a spurious counterfactual image"):
        train_multimodal(model, data, config, val=no_swaps)

    base = ["train", "--model", str(org.model_dir), "--train", str(org.data_path("train")), "--max-steps", "8",
            "--batch-size", "16", "--json"]  # fmt: skip
    val = ["--val", str(org.data_path("probe"))]
    code, out = _run([*base, *val, "--early-stopping", "counterfactual_accuracy", "--eval-every", "4",
                      "--out", str(tmp_path / "a")], capsys)  # fmt: skip
    assert code == 0 and [s for s, _ in out["val_scores"]] == [4, 8] and out["best_step"] in (4, 8)
    assert out["after"]["flip_rate"] is not None and out["verification"]["passed"]
    refused = {("--early-stopping", "worst_group_accuracy", *val): "valid: ['counterfactual_accuracy']",
               ("--early-stopping", "counterfactual_accuracy"): "--early-stopping needs --val FILE",
               ("--eval-every", "4"): "--eval-every on image probes needs --early-stopping"}  # fmt: skip
    for extra, message in refused.items():
        assert main([*base, *extra, "--out", str(tmp_path / "b")]) == 2
        assert message in capsys.readouterr().err


def test_image_directions_fit_edit_fold_and_effects(waterbirds) -> None:
    """A direction of the image tokens (the projector's output): diff-means by hand, the edit holds its coordinate
    at the mean, the fold into the projector computes what the run-time hook computes, and its resample effect."""
    from icp_lens.directions.image import (
        PROJECTOR_HOOK,
        ImageDirections,
        applying_image_directions,
        fit_image_directions,
        fold_image_directions,
        image_direction_effects,
        projector_tokens,
    )  # fmt: skip
    from icp_lens.training.multimodal import data_from_probes

    org, _ = waterbirds
    bridge = org.load_bridge()
    probe = data_from_probes(org.data_path("probe"), org.load_processor())
    rows = probe.has_counterfactual.nonzero().flatten()[:24]
    one = fit_image_directions(bridge, probe, rows=rows)
    h = projector_tokens(bridge, probe.input_ids, probe.pixel_values[rows])
    h_cf = projector_tokens(bridge, probe.input_ids, probe.counterfactual[rows])
    delta = (h_cf - h).reshape(-1, h.shape[-1]).double()
    top = torch.linalg.svd(delta, full_matrices=False)[2][0]  # the leading singular direction, by hand
    top = top * torch.sign(top @ delta.mean(0))
    assert torch.allclose(one.vectors[0].double(), top, atol=1e-5) and one.source == "paired-svd-1"
    assert one.means[0].item() == pytest.approx((torch.cat([h, h_cf]).double() @ one.vectors[0].double()).mean().item(),
                                                abs=1e-4)  # fmt: skip
    two = fit_image_directions(bridge, probe, rows=rows, rank=2)
    assert torch.allclose(two.vectors @ two.vectors.T, torch.eye(2), atol=1e-5)
    edited = two.edit(h)  # the coordinates along V sit at their means, the rest is untouched
    assert torch.allclose(edited @ two.vectors.T, two.means.expand(*h.shape[:2], 2), atol=1e-4)
    rest = torch.eye(h.shape[-1]) - two.vectors.T @ two.vectors
    assert torch.allclose(edited @ rest, h @ rest, atol=1e-4)
    # folded into the projector = the hook at run time
    pixels = org.pixel_values("test_balanced")[:8]
    ids = probe.input_ids.expand(8, -1)
    with torch.no_grad(), applying_image_directions(bridge, two):
        hooked_logits = bridge(ids, pixel_values=pixels)
    hf = org.load_hf()
    fold_image_directions(hf, two)
    with torch.no_grad():
        folded = hf(input_ids=ids, pixel_values=pixels).logits
        plain = org.load_hf()(input_ids=ids, pixel_values=pixels).logits
    assert (folded - hooked_logits).abs().max() <= 1e-4 < (folded - plain).abs().max()
    # effects: the whole image's swap and each direction's share of it
    effects = image_direction_effects(bridge, probe, two, rows=rows)
    assert list(effects["index"]) == [0, 1] and (effects["hook_name"] == PROJECTOR_HOOK).all()
    first = image_direction_effects(bridge, probe, one, rows=rows)
    assert first["total"].iloc[0] < -1.0  # the background swap moves the answer: the organism's shortcut
    assert first["effect"].iloc[0] == pytest.approx(effects["effect"].iloc[0], abs=1e-4)  # same first direction
    assert first["effect"].iloc[0] < 0 and first["share"].iloc[0] > 0.2
    with pytest.raises(ValueError, match="orthonormal"):
        ImageDirections(vectors=torch.ones(2, 64), means=torch.zeros(2))
    with pytest.raises(ValueError, match="image counterfactuals"):
        fit_image_directions(bridge, dataclasses.replace(probe, counterfactual=None, has_counterfactual=None))


def test_image_directions_through_score_and_prune(waterbirds, tmp_path: Path, capsys) -> None:
    """``score --kinds image_direction`` -> table + vectors beside it -> ``prune`` folds the chosen one into the
    projector: a checkpoint plain transformers loads, equal to the library's fold, its digest in plan.json."""
    from transformers import AutoModelForImageTextToText

    from icp_lens.directions.image import (
        ImageDirections,
        fold_image_directions,
        image_direction_values,
        load_image_directions,
        sidecar_path,
    )  # fmt: skip
    from icp_lens.scoring.table import ScoreTable
    from icp_lens.training.multimodal import data_from_probes

    org, _ = waterbirds
    probe, scores = str(org.data_path("probe")), tmp_path / "dirs.csv"
    assert main(["score", "--model", str(org.model_dir), "--probe", probe, "--out", str(scores), "--kinds",
                 "image_direction", "--direction-rank", "2", "--quiet"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    table = ScoreTable.load(scores)
    assert list(table.frame["kind"]) == ["image_direction"] * 2 and table.meta["settings"]["direction_rank"] == 2
    fitted = load_image_directions(sidecar_path(scores))
    # the probe rows carry causal images, so the bird's direction is kept by default
    assert fitted.rank == 2 and fitted.source == "paired-svd-2-keep-causal-1" and len(fitted.cos_causal) == 2
    assert table.meta["settings"]["cos_causal"] == pytest.approx(list(fitted.cos_causal))
    assert "made orthogonal to the object's direction" in printed
    values, _, _ = image_direction_values(org.load_bridge(), data_from_probes(probe, org.load_processor()), fitted)
    by_index = table.frame.set_index("index")["effect_resample"]
    for i in range(2):
        assert by_index[i] == pytest.approx(values[i].abs().mean().item(), rel=1e-4)
    top = int(table.frame["index"].iloc[0])
    out = tmp_path / "pruned"
    assert main(["prune", "--model", str(org.model_dir), "--scores", str(scores), "--top-k", "1", "--mode", "mean",
                 "--probe", probe, "--out", str(out), "--json"]) == 0  # fmt: skip
    payload = json.loads(capsys.readouterr().out)
    assert payload["verification"]["passed"] and payload["verification"]["max_abs_logit_diff"] <= 1e-4
    chosen = ImageDirections(fitted.vectors[[top]], fitted.means[[top]])
    plan = json.loads((out / "plan.json").read_text())
    assert plan["image_directions"]["digest"] == chosen.digest() and plan["features"] == [f"image_direction L0.{top}"]
    expected = org.load_hf()
    fold_image_directions(expected, chosen)
    pixels = org.pixel_values("test_balanced")[:4]
    ids = data_from_probes(probe, org.load_processor()).input_ids.expand(4, -1)
    with torch.no_grad():
        got = AutoModelForImageTextToText.from_pretrained(str(out))(input_ids=ids, pixel_values=pixels).logits
        want = expected(input_ids=ids, pixel_values=pixels).logits
    assert (got - want).abs().max() <= 1e-5
    assert main(["score", "--model", str(org.model_dir), "--probe", probe, "--out", str(tmp_path / "x.csv"),
                 "--kinds", "image_direction", "--directions", "diff-means"]) == 2  # fmt: skip
    assert "--directions do(es) not apply to image probes" in capsys.readouterr().err
    assert main(["score", "--model", str(org.model_dir), "--probe", probe, "--out", str(tmp_path / "plain.csv"),
                 "--kinds", "image_direction", "--keep-causal", "none", "--quiet"]) == 0  # fmt: skip
    plain = load_image_directions(sidecar_path(tmp_path / "plain.csv"))
    assert plain.source == "paired-svd-1" and plain.cos_causal is None


def test_image_directions_keep_the_objects_direction(waterbirds, tmp_path: Path) -> None:
    """With causal images (other bird, same background) the spurious directions are made orthogonal to the bird's
    leading direction: by hand, with the cosine before recorded, and the edit leaves the bird's coordinate alone."""
    from icp_lens.directions.estimators import paired_svd
    from icp_lens.directions.image import (
        _orthogonal_to,
        fit_image_directions,
        load_image_directions,
        projector_tokens,
        save_image_directions,
    )  # fmt: skip
    from icp_lens.probes import image_file
    from icp_lens.training.multimodal import data_from_probes

    org, _ = waterbirds
    row = org.probes("probe")[0]  # the causal image shows the other bird; the causal answer is that bird's class
    assert row.causal_answer in (" landbird", " waterbird") and row.image_causal_counterfactual is not None
    assert image_file(org.data_path("probe"), row, "image_causal_counterfactual").is_file()
    bridge = org.load_bridge()
    data = data_from_probes(org.data_path("probe"), org.load_processor(), causal=True)
    assert data.causal is not None and bool(data.has_causal.all())  # every scene has one, grey ones too
    rows = data.has_counterfactual.nonzero().flatten()[:24]
    kept = fit_image_directions(bridge, data, rows=rows, rank=2)  # default: one causal direction kept
    assert kept.source == "paired-svd-2-keep-causal-1"
    h = projector_tokens(bridge, data.input_ids, data.pixel_values[rows])
    h_c = projector_tokens(bridge, data.input_ids, data.causal[rows])
    bird = paired_svd((h_c - h).reshape(-1, h.shape[-1]), 1)[0].float()  # the bird's direction, by hand
    assert (kept.vectors @ bird).abs().max() <= 1e-5
    assert torch.allclose(kept.vectors @ kept.vectors.T, torch.eye(2), atol=1e-5)
    plain = fit_image_directions(bridge, data, rows=rows, rank=2, keep_causal=0)
    no_causal = dataclasses.replace(data, causal=None, has_causal=None)
    assert torch.equal(plain.vectors, fit_image_directions(bridge, no_causal, rows=rows, rank=2).vectors)
    cos = (plain.vectors @ bird).abs()
    assert kept.cos_causal == pytest.approx(cos.tolist(), abs=1e-4) and max(kept.cos_causal) > 0.01
    # the edit holds the background's coordinates and never moves a token along the bird's direction
    assert torch.allclose(kept.edit(h) @ bird, h @ bird, atol=1e-4)
    assert not torch.allclose(plain.edit(h) @ bird, h @ bird, atol=1e-3)
    again = load_image_directions(save_image_directions(kept, tmp_path / "d.safetensors"))
    assert again.cos_causal == pytest.approx(kept.cos_causal) and again.source == kept.source
    with pytest.raises(ValueError, match="image_causal_counterfactual"):
        fit_image_directions(bridge, no_causal, rows=rows, keep_causal=1)
    with pytest.raises(ValueError, match="inside the causal subspace"):
        _orthogonal_to(plain.vectors[:1].double(), plain.vectors[:1].double())


def _causal_probe(waterbirds):
    """The organism, its bridge, the probe split with causal images, and 24 rows with an image counterfactual."""
    from icp_lens.training.multimodal import data_from_probes

    org, _ = waterbirds
    probe = data_from_probes(org.data_path("probe"), org.load_processor(), causal=True)
    return org, org.load_bridge(), probe, probe.has_counterfactual.nonzero().flatten()[:24]


def test_vision_embedding_directions_fold_exactly_and_through_the_cli(waterbirds, tmp_path: Path, capsys) -> None:
    """Directions of the vision tower's embeddings: the fold into the patch convolution, class and position
    embeddings equals the hook at run time; ``score --direction-sites vision_embed`` -> ``prune`` writes it."""
    from transformers import AutoModelForImageTextToText

    from icp_lens.directions.image import (
        VISION_EMBED_HOOK,
        applying_image_directions,
        fit_image_directions,
        fold_image_directions,
        load_image_directions,
        sidecar_path,
    )  # fmt: skip
    org, bridge, probe, rows = _causal_probe(waterbirds)
    dirs = fit_image_directions(bridge, probe, rows=rows, rank=2, site="vision_embed")
    assert dirs.hook_name == VISION_EMBED_HOOK and dirs.vectors.shape == (2, 32)  # the vision tower's width
    pixels, ids = org.pixel_values("test_balanced")[:8], probe.input_ids.expand(8, -1)
    with torch.no_grad(), applying_image_directions(bridge, dirs):
        hooked_logits = bridge(ids, pixel_values=pixels)
    hf = org.load_hf()
    embeddings = fold_image_directions(hf, dirs)
    assert embeddings is hf.model.vision_tower.embeddings and embeddings.patch_embedding.weight.shape == (32, 3, 4, 4)
    with torch.no_grad():
        folded = hf(input_ids=ids, pixel_values=pixels).logits
        plain = org.load_hf()(input_ids=ids, pixel_values=pixels).logits
    assert (folded - hooked_logits).abs().max() <= 1e-4 < (folded - plain).abs().max()
    with pytest.raises(ValueError, match="unknown image direction site 'vision_out'; valid"):
        fit_image_directions(bridge, probe, site="vision_out")
    probe_file, scores = str(org.data_path("probe")), tmp_path / "embed.csv"
    assert main(["score", "--model", str(org.model_dir), "--probe", probe_file, "--out", str(scores), "--kinds",
                 "image_direction", "--direction-sites", "vision_embed", "--quiet"]) == 0  # fmt: skip
    assert f"at {VISION_EMBED_HOOK}" in capsys.readouterr().out
    assert load_image_directions(sidecar_path(scores)).hook_name == VISION_EMBED_HOOK
    out = tmp_path / "pruned"
    assert main(["prune", "--model", str(org.model_dir), "--scores", str(scores), "--top-k", "1", "--probe",
                 probe_file, "--out", str(out)]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "into the vision embeddings" in printed and "PASS" in printed
    AutoModelForImageTextToText.from_pretrained(str(out))  # plain transformers reads it
    assert main(["score", "--model", str(org.model_dir), "--probe", probe_file, "--out", str(tmp_path / "x.csv"),
                 "--kinds", "image_direction", "--direction-sites", "projector,vision_embed"]) == 2  # fmt: skip
    sites = "['projector', 'vision_embed', 'vision_attn_out', 'vision_mlp_out']"
    assert f"image directions take one site of {sites}" in capsys.readouterr().err


def test_vision_layer_output_directions_fold_exactly_and_through_the_cli(waterbirds, tmp_path: Path, capsys) -> None:
    """Directions of what one vision layer's attention or MLP writes: the fold into its out_proj / fc2 equals
    the hook at run time and touches nothing else; ``score --direction-sites vision_mlp_out --layers L`` ->
    ``prune`` writes it; the site needs exactly one layer."""
    from transformers import AutoModelForImageTextToText

    from icp_lens.directions.image import (
        applying_image_directions,
        fit_image_directions,
        fold_image_directions,
        image_direction_hook,
        load_image_directions,
        sidecar_path,
    )  # fmt: skip
    org, bridge, probe, rows = _causal_probe(waterbirds)
    pixels, ids = org.pixel_values("test_balanced")[:8], probe.input_ids.expand(8, -1)
    with torch.no_grad():
        plain = org.load_hf()(input_ids=ids, pixel_values=pixels).logits
    source = dict(org.load_hf().named_parameters())
    tower = "model.vision_tower.encoder.layers"
    for site, layer, module in (("vision_attn_out", 0, f"{tower}.0.self_attn.out_proj"),
                                ("vision_mlp_out", 1, f"{tower}.1.mlp.fc2")):  # fmt: skip
        dirs = fit_image_directions(bridge, probe, rows=rows, rank=2, site=site, layer=layer)
        assert dirs.hook_name == f"vision_encoder.encoder_layers.{layer}.hook_{site[7:]}"
        assert dirs.vectors.shape == (2, 32) and dirs.cos_causal is not None  # the tower's width; the bird kept
        with torch.no_grad(), applying_image_directions(bridge, dirs):
            hooked_logits = bridge(ids, pixel_values=pixels)
        hf = org.load_hf()
        assert fold_image_directions(hf, dirs) is hf.get_submodule(module)
        with torch.no_grad():
            folded = hf(input_ids=ids, pixel_values=pixels).logits
        assert (folded - hooked_logits).abs().max() <= 1e-4 < (folded - plain).abs().max()
        changed = {n for n, p in hf.named_parameters() if not torch.equal(p, source[n])}
        assert changed == {f"{module}.weight", f"{module}.bias"}
        v = dirs.vectors.double()  # W <- (I - V^T V) W: the folded writer writes nothing along V but the mean
        w = hf.get_submodule(module).weight.double()
        assert (v @ w).abs().max() <= 1e-5
    for site, layer, message in (("vision_mlp_out", None, "takes one layer of the vision tower"),
                                 ("projector", 0, "takes no layer"), ("vision_attn_out", -1, "layer must be >= 0")):
        with pytest.raises(ValueError, match=message):
            image_direction_hook(site, layer)
    probe_file, scores = str(org.data_path("probe")), tmp_path / "mlp1.csv"
    assert main(["score", "--model", str(org.model_dir), "--probe", probe_file, "--out", str(scores), "--kinds",
                 "image_direction", "--direction-sites", "vision_mlp_out", "--layers", "1", "--quiet"]) == 0
    hook = "vision_encoder.encoder_layers.1.hook_mlp_out"
    assert f"at {hook}" in capsys.readouterr().out
    assert load_image_directions(sidecar_path(scores)).hook_name == hook
    table = __import__("pandas").read_csv(scores)
    assert table["hook_name"].eq(hook).all()
    assert json.loads(scores.with_name("mlp1.meta.json").read_text())["settings"]["direction_hook"] == hook
    out = tmp_path / "pruned"
    assert main(["prune", "--model", str(org.model_dir), "--scores", str(scores), "--top-k", "1", "--mode", "mean",
                 "--probe", probe_file, "--out", str(out)]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert f"into the linear layer that writes {hook}" in printed and "PASS" in printed
    AutoModelForImageTextToText.from_pretrained(str(out))  # plain transformers reads it
    for layers in ([], ["--layers", "0,1"]):
        assert main(["score", "--model", str(org.model_dir), "--probe", probe_file, "--out", str(tmp_path / "x.csv"),
                     "--kinds", "image_direction", "--direction-sites", "vision_mlp_out", *layers]) == 2
        assert "give that layer with --layers L (one layer)" in capsys.readouterr().err


def test_image_paths_create_no_tensor_without_a_device(waterbirds) -> None:
    """Image directions (three sites), unit scores of both towers and the projector and a few CIMRL steps under
    the device guard (``tests/device_guard.py``): no tensor factory called from icp_lens without ``device=``."""
    from device_guard import ImplicitDeviceGuard

    from icp_lens.directions.image import fit_image_directions, image_direction_scores
    from icp_lens.scoring.image_scores import score_image_units
    from icp_lens.training.multimodal import MultimodalTrainConfig, data_from_probes, train_multimodal

    org, _ = waterbirds
    bridge = org.load_bridge()
    with ImplicitDeviceGuard() as guard:
        probe = data_from_probes(org.data_path("probe"), org.load_processor(), causal=True)
        rows = probe.has_counterfactual.nonzero().flatten()[:16].tolist()
        for site, layer in (("projector", None), ("vision_embed", None), ("vision_mlp_out", 1)):
            dirs = fit_image_directions(bridge, probe, rows=rows, site=site, layer=layer)
            image_direction_scores(bridge, probe, dirs, rows=rows, n_boot=10)
        small = _subset(probe, slice(0, 16))
        score_image_units(bridge, small, kinds=["vision_neuron", "projector_neuron", "head"], method="hybrid",
                          verify_top=4, progress=False)  # fmt: skip
        train_multimodal(org.load_hf(), small, MultimodalTrainConfig(objective="cimrl", steps=3, batch_size=8))
    guard.assert_clean()
