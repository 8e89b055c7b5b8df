"""``icp-lens score`` and ``icp-lens prune`` on a vision-language model and image probes.

``icp-lens score --model DIR --probe probe.jsonl --out scores.csv``
    When ``--probe`` holds image probes (rows with ``image``; those with an
    ``image_counterfactual`` are scored), the MLP neurons and attention heads of both towers
    of a LLaVA-style checkpoint are scored on a ``TransformerBridge`` by
    :func:`icp_lens.scoring.image_scores.score_image_units`: ``--kinds
    vision_neuron,vision_head,projector_neuron,neuron,head`` (the default for images: the
    projector's hidden neurons too), ``--method hybrid|attribution|exact``,
    ``--verify-top``, ``--layers`` (of each tower), ``--batch-size``, ``--device``,
    ``--dtype``. ``--kinds image_direction`` (alone or beside the units) fits
    ``--direction-rank`` directions of the image tokens at the projector's output from the
    image counterfactual pairs (:mod:`icp_lens.directions.image`) and scores each by its
    resample effect (``--direction-sites projector``, the default, ``vision_embed``: the
    vision tower's embeddings, or ``vision_attn_out`` / ``vision_mlp_out`` with ``--layers L``:
    what that vision layer's attention or MLP writes); where the rows carry
    ``image_causal_counterfactual`` (other object, same background) the directions are made
    orthogonal to the object's leading direction first (``--keep-causal none`` turns that off);
    their vectors are written beside the table as ``<stem>.image_directions.safetensors``.
    The table and its provenance (``.meta.json``: model fingerprint, probe digest, settings)
    are written as for text probes.
``icp-lens prune --model DIR --scores scores.csv --out DIR2 --top-k K``
    When ``--model`` is a vision-language checkpoint (its config has ``vision_config``),
    the selected neurons and heads are pruned with
    :func:`icp_lens.pruning.multimodal.export_pruned_llava` (zero ablation; ``--mode mean``
    fixes vision and projector units at their mean over the ``--probe`` images, folded into
    ``fc2``'s, ``out_proj``'s or the projector's ``linear_2``'s bias; the language model's
    ``down_proj`` and ``o_proj`` have no bias, so mean mode refuses its units). The checkpoint
    (model + processor + ``plan.json``) is reloaded with ``transformers`` alone and compared
    with the same ablation done by hooks on the bridge, on the ``--probe`` images (or seeded
    random pixels). Selected ``image_direction`` rows are folded into the projector's last
    linear layer (or the vision embeddings, or the vision layer's ``out_proj`` / ``fc2``,
    where they were fitted) instead (``--mode mean``: coordinates held at their fitted means;
    ``zero``: projected out), read from the table's ``.image_directions.safetensors`` and
    verified against the same edit as a hook; ``plan.json`` records their digest. Units and
    directions are pruned in separate runs.

Options of the text paths that have no meaning here are refused by name.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

__all__ = ["is_vision_language", "run_image_scoring", "run_image_prune"]

#: score options this path refuses when set (name -> value that means "unset")
_SCORE_TEXT_ONLY = {
    "qk_fix": False, "grad_drop": False, "intervention": ["resample"], "metric": "logit_diff", "weight": "uniform",
    "checkpoint": None, "shard": None, "device_map": None, "offload_folder": None, "directions": "leace",
    "direction_positions": "last",
}  # fmt: skip
#: the kind of a fitted direction of the image tokens (``icp_lens.directions.image``)
IMAGE_DIRECTION = "image_direction"
_PRUNE_TEXT_ONLY = {"token_mode": "zero", "direction_mode": "mean", "save_dtype": None, "min_selectivity": None}


def _refuse(args: argparse.Namespace, options: dict[str, Any], what: str) -> None:
    from icp_lens.distributed import launched_by_torchrun

    if launched_by_torchrun():
        raise ValueError(f"{what} runs as one process: start it without torchrun")
    given = ["--" + k.replace("_", "-") for k, unset in options.items() if getattr(args, k, unset) != unset]
    if given:
        raise ValueError(f"{', '.join(given)} do(es) not apply to {what}")


def is_vision_language(model_dir: str | Path) -> bool:
    """Whether ``model_dir`` holds a vision-language checkpoint (``vision_config`` in its config.json)."""
    config = Path(model_dir) / "config.json"
    try:
        return "vision_config" in json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False


def _image_direction_site(sites: list[str] | None, wanted: bool, layers: list[int] | None) -> tuple[str, int | None]:
    """The one ``--direction-sites`` value of image directions (none given: ``projector``) and its layer
    (``--layers``, one layer, for the vision tower's module outputs)."""
    from icp_lens.directions.image import IMAGE_DIRECTION_SITES, VISION_OUT_HOOKS

    if sites is None:
        return "projector", None
    if not wanted:
        raise ValueError("--direction-sites applies to --kinds image_direction on image probes")
    if len(sites) != 1 or sites[0] not in IMAGE_DIRECTION_SITES:
        raise ValueError(f"--direction-sites {','.join(sites)}: image directions take one site of "
                         f"{list(IMAGE_DIRECTION_SITES)}")  # fmt: skip
    if sites[0] not in VISION_OUT_HOOKS:
        return sites[0], None
    if layers is None or len(layers) != 1:
        given = "none" if layers is None else ",".join(map(str, layers))
        raise ValueError(f"--direction-sites {sites[0]} is one vision layer's output: give that layer with "
                         f"--layers L (one layer), got {given}")  # fmt: skip
    return sites[0], layers[0]


def run_image_scoring(args: argparse.Namespace) -> int:
    """The ``score`` command's image path; returns the exit status."""
    import pandas as pd
    from transformers import AutoProcessor

    from icp_lens.devices import resolve_dtype
    from icp_lens.model import boot_bridge
    from icp_lens.scoring.image_scores import IMAGE_KINDS, score_image_units
    from icp_lens.scoring.provenance import meta_path, table_provenance
    from icp_lens.scoring.table import ScoreTable
    from icp_lens.training.multimodal import data_from_probes

    _refuse(args, _SCORE_TEXT_ONLY, "image probes (the image scorer)")
    kinds = list(args.kinds or IMAGE_KINDS)
    valid = (*IMAGE_KINDS, IMAGE_DIRECTION)
    bad = [k for k in kinds if k not in valid]
    if bad:
        raise ValueError(f"--kinds {','.join(bad)} cannot be scored on image probes; valid: {','.join(valid)}")
    verify = int(args.verify_top) if args.verify_top >= 1 or args.verify_top == 0 else float(args.verify_top)
    start = time.perf_counter()
    processor = AutoProcessor.from_pretrained(str(args.model))
    keep_causal = getattr(args, "keep_causal", None)
    site, site_layer = _image_direction_site(getattr(args, "direction_sites", None), IMAGE_DIRECTION in kinds,
                                             args.layers)  # fmt: skip
    data = data_from_probes(args.probe, processor, causal=IMAGE_DIRECTION in kinds and keep_causal != "none")
    if keep_causal == "write" and data.causal is None:
        raise ValueError("--keep-causal write on image probes needs rows with an image_causal_counterfactual")
    bridge = boot_bridge(args.model, dtype=resolve_dtype(args.dtype), device=_device(args))
    units = [k for k in kinds if k != IMAGE_DIRECTION]
    frames, directions = [], None
    if units:
        frames.append(score_image_units(
            bridge, data, kinds=units, layers=args.layers, method=args.method or "hybrid", verify_top=verify,
            batch_size=args.batch_size, progress=not args.quiet,
        ).frame)  # fmt: skip
    if IMAGE_DIRECTION in kinds:
        from icp_lens.directions.image import fit_image_directions, image_direction_scores

        # the object's direction is kept (one causal direction) whenever the rows carry causal images
        keep = 0 if data.causal is None else 1
        directions = fit_image_directions(bridge, data, rank=args.direction_rank, batch_size=args.batch_size,
                                          keep_causal=keep, site=site, layer=site_layer)  # fmt: skip
        frames.append(image_direction_scores(bridge, data, directions, batch_size=args.batch_size).frame)
    settings = {"method": args.method or "hybrid", "kinds": kinds, "layers": args.layers,
                "verify_top": args.verify_top, "intervention": ["resample"], "metric": "candidate_margin",
                "dtype": args.dtype, "modality": "image"}  # fmt: skip
    if directions is not None:
        settings.update(direction_rank=args.direction_rank, image_directions=directions.source, direction_site=site,
                        direction_hook=directions.hook_name,
                        cos_causal=None if directions.cos_causal is None else list(directions.cos_causal))  # fmt: skip
    n = int(data.has_counterfactual.sum())
    meta = table_provenance(args.model, args.probe, n_examples=n, settings=settings)
    table = ScoreTable(pd.concat(frames, ignore_index=True), meta=meta)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if directions is not None:  # the vectors first: a table never names directions that are not on disk
        from icp_lens.directions.image import save_image_directions, sidecar_path

        save_image_directions(directions, sidecar_path(args.out))
    table.save(args.out)
    n_exact = int(table.frame["exact"].sum())
    seconds = time.perf_counter() - start
    n_dirs = 0 if directions is None else directions.rank
    what = " and ".join(part for part in (f"{len(table) - n_dirs} units of both towers" if units else "",
                                          f"{n_dirs} image-token directions" if n_dirs else "") if part)  # fmt: skip
    print(f"scored {what} ({n_exact} exact) on {n} image counterfactuals in {seconds:.1f} s -> {args.out}")
    if directions is not None:
        from icp_lens.directions.image import sidecar_path

        print(f"image-token directions (rank {directions.rank}, {directions.source}, at {directions.hook_name}) -> "
              f"{sidecar_path(args.out)}")  # fmt: skip
        if directions.cos_causal is not None:
            cos = ", ".join(f"{c:.3f}" for c in directions.cos_causal)
            print(f"made orthogonal to the object's direction (image_causal_counterfactual); cosine before: {cos}")
    print(f"provenance (model fingerprint, probe digest, settings) -> {meta_path(args.out)}")
    print(table.top(10)[["feature", "hook_name", "score", "ci_low", "ci_high", "exact"]].to_string(index=False))
    return 0


def _device(args: argparse.Namespace) -> str:
    from icp_lens.devices import resolve_device

    return str(resolve_device(getattr(args, "device", "auto")))


def run_image_prune(args: argparse.Namespace) -> int:
    """The ``prune`` command's path for a vision-language ``--model``; returns the exit status."""
    from transformers import AutoProcessor

    from icp_lens.pruning.export import check_target
    from icp_lens.pruning.multimodal import MEAN_FOLDABLE_PREFIXES, export_pruned_llava
    from icp_lens.pruning.select import select_features
    from icp_lens.scoring.image_scores import IMAGE_KINDS
    from icp_lens.scoring.table import ScoreTable
    from icp_lens.training.multimodal import data_from_probes

    _refuse(args, _PRUNE_TEXT_ONLY, "a vision-language model (the image pruner)")
    if args.top_k is None and args.threshold is None and args.min_share is None:
        raise ValueError("choose features with --top-k K and/or --threshold T (or --min-share F)")
    valid = (*IMAGE_KINDS, IMAGE_DIRECTION)
    kinds = list(args.kinds or valid)
    bad = [k for k in kinds if k not in valid]
    if bad:
        raise ValueError(f"--kinds {','.join(bad)} cannot be pruned in a vision-language model; valid: "
                         f"{','.join(valid)}")  # fmt: skip
    check_target(args.out, overwrite=args.overwrite, source=args.model)
    table = ScoreTable.load(args.scores)
    _check_table_model(table, args)
    features = select_features(table, top_k=args.top_k, threshold=args.threshold, min_share=args.min_share,
                               per_layer_cap=args.per_layer_cap, kinds=kinds)  # fmt: skip
    if any(f.kind == IMAGE_DIRECTION for f in features):
        if not all(f.kind == IMAGE_DIRECTION for f in features):
            raise ValueError(
                "the selection mixes image directions with units: prune them in two runs "
                "(--kinds image_direction, then the units on the pruned checkpoint's scores)"
            )
        return _prune_image_directions(args, features)
    if args.mode == "mean" and args.probe is None:
        raise ValueError("--mode mean needs --probe FILE.jsonl (the images each neuron's mean is taken over)")
    units: dict[str, list[int]] = {}
    for f in features:
        units.setdefault(f.hook_name, []).append(f.index)
    if args.mode == "mean" and any(not name.startswith(MEAN_FOLDABLE_PREFIXES) for name in units):
        raise ValueError("--mode mean folds each unit's mean into its projection's bias, and the language "
                         "model's down_proj and o_proj have none: prune its units with --mode zero, or keep to "
                         "--kinds vision_neuron,vision_head,projector_neuron")  # fmt: skip
    processor = AutoProcessor.from_pretrained(str(args.model))
    data = data_from_probes(args.probe, processor) if args.probe is not None else None
    ids, pixels = _verification_inputs(data, processor)
    means = _vision_means(args.model, units, data) if args.mode == "mean" and data is not None else None
    plan = {"format": "icp_lens.image_prune/1", "scores": str(args.scores), "mode": args.mode,
            "features": [str(f) for f in features]}  # fmt: skip
    if means is not None:
        plan["means"] = {k: means[k][units[k]].tolist() for k in means}
    start = time.perf_counter()
    report = export_pruned_llava(args.model, units, args.out, means=means, verify_ids=None if args.no_verify else ids,
                                 verify_pixels=None if args.no_verify else pixels, tolerance=args.tolerance,
                                 plan=plan)  # fmt: skip
    seconds = time.perf_counter() - start
    source = f"{pixels.shape[0]} {'--probe' if data is not None else 'random'} images"
    summary = [f"pruned {len(features)} units ({args.mode}; {report.changed_weights} weights changed) -> {args.out}",
               "features: " + (", ".join(plan["features"]) or "(none)"),
               f"export took {seconds:.2f} s; plan written to {args.out / 'plan.json'}"]  # fmt: skip
    return _print_export(args, plan, {"units": report.units, "changed_weights": report.changed_weights}, seconds,
                         report, summary, f"hook ablation on the bridge ({source})")  # fmt: skip


def _print_export(args: argparse.Namespace, plan: dict[str, Any], extra: dict[str, Any], seconds: float,
                  report: Any, summary: list[str], against: str) -> int:  # fmt: skip
    """Print a prune's result (``--json``: one object; else ``summary`` and the verification verdict); exit status."""
    verified = {"max_abs_logit_diff": report.max_abs_logit_diff, "passed": report.passed, "tolerance": args.tolerance}
    if args.json:
        print(json.dumps({**plan, **extra, "out": str(args.out), "export_seconds": round(seconds, 2),
                          "verification": None if args.no_verify else verified}, indent=2))  # fmt: skip
    else:
        print("\n".join(summary))
        if not args.no_verify:
            verdict = "PASS" if report.passed else "FAIL"
            print(f"verification against {against}: max |logit diff| {report.max_abs_logit_diff:.1e} <= "
                  f"{args.tolerance:g}: {verdict}")  # fmt: skip
    return 0 if args.no_verify or report.passed else 1


def _prune_image_directions(args: argparse.Namespace, features: list[Any]) -> int:
    """Fold the selected image-token directions into the projector or the vision embeddings, where they were
    fitted (mean: their fitted means; zero: project out)."""
    import torch
    from transformers import AutoProcessor

    from icp_lens.directions.image import (
        PROJECTOR_HOOK,
        VISION_EMBED_HOOK,
        ImageDirections,
        export_image_directions,
        load_image_directions,
        sidecar_path,
    )  # fmt: skip
    from icp_lens.training.multimodal import data_from_probes

    fitted = load_image_directions(sidecar_path(args.scores))
    idx = sorted(f.index for f in features)
    if idx[-1] >= fitted.rank:
        raise ValueError(f"{args.scores} names image direction {idx[-1]} but {sidecar_path(args.scores)} holds "
                         f"{fitted.rank}")  # fmt: skip
    means = fitted.means[idx] if args.mode == "mean" else torch.zeros(len(idx), device="cpu")
    chosen = ImageDirections(fitted.vectors[idx], means, hook_name=fitted.hook_name, source=fitted.source)
    processor = AutoProcessor.from_pretrained(str(args.model))
    data = data_from_probes(args.probe, processor) if args.probe is not None else None
    ids, pixels = _verification_inputs(data, processor)
    plan = {"format": "icp_lens.image_prune/1", "scores": str(args.scores), "mode": args.mode,
            "features": [str(f) for f in features]}  # fmt: skip
    start = time.perf_counter()
    report = export_image_directions(args.model, chosen, args.out, verify_ids=None if args.no_verify else ids,
                                     verify_pixels=None if args.no_verify else pixels, tolerance=args.tolerance,
                                     plan=plan)  # fmt: skip
    seconds = time.perf_counter() - start
    what = "held at their means" if args.mode == "mean" else "projected out"
    sites = {VISION_EMBED_HOOK: "the vision embeddings", PROJECTOR_HOOK: "the projector"}
    into = sites.get(chosen.hook_name, f"the linear layer that writes {chosen.hook_name}")
    plan_file = args.out / "plan.json"
    summary = [f"folded {len(idx)} image-token direction(s), {what}, into {into} -> {args.out}",
               f"export took {seconds:.2f} s; plan (with the directions' digest) written to {plan_file}"]  # fmt: skip
    return _print_export(args, plan, {"digest": report.digest, "changed_weights": report.changed_weights}, seconds,
                         report, summary, "the edit as a hook on the bridge")  # fmt: skip


def _check_table_model(table: Any, args: argparse.Namespace) -> None:
    from transformers import AutoModelForImageTextToText

    from icp_lens.pruning.plan import fingerprint
    from icp_lens.scoring.provenance import check_model

    if not table.meta or "model" not in table.meta:
        return
    model = AutoModelForImageTextToText.from_pretrained(str(args.model))
    check_model(table.meta, fingerprint(model), table=str(args.scores), force=args.force)


def _verification_inputs(data: Any, processor: Any) -> tuple[Any, Any]:
    """The prompt ids and up to 16 images: from the ``--probe`` data, or seeded random pixels."""
    import torch
    from PIL import Image

    if data is not None:
        return data.input_ids, data.pixel_values[:16]
    size = getattr(processor.image_processor, "crop_size", None) or {}
    height, width = int(size.get("height", 16)), int(size.get("width", 16))
    gen = torch.Generator().manual_seed(0)
    pixels = torch.rand(16, 3, height, width, generator=gen, device="cpu") * 2 - 1
    ids = processor(images=[Image.new("RGB", (width, height))], text=["<image>"], return_tensors="pt")["input_ids"][0]
    return ids, pixels


def _vision_means(model_dir: Path, units: dict[str, list[int]], data: Any) -> dict[str, Any]:
    """Each pruned vision or projector hook's mean activation over the ``--probe`` images and their patches
    (fp32): ``[d_mlp]`` for neurons, ``[n_heads, d_head]`` for heads' ``hook_z``."""
    import torch

    from icp_lens.hooks import capturing
    from icp_lens.model import boot_bridge
    from icp_lens.pruning.multimodal import MEAN_FOLDABLE_PREFIXES

    bridge = boot_bridge(model_dir, device="cpu")
    vision = [name for name in units if name.startswith(MEAN_FOLDABLE_PREFIXES)]
    sums = {name: torch.zeros((), device="cpu") for name in vision}
    counts = dict.fromkeys(vision, 0)  # tokens per image differ: the tower has a class token, the projector not
    with torch.no_grad():
        for start in range(0, data.pixel_values.shape[0], 128):
            batch = data.pixel_values[start : start + 128]
            with capturing(bridge, vision) as cache:
                bridge(data.input_ids.expand(batch.shape[0], -1), pixel_values=batch)
            for name in vision:
                sums[name] = sums[name] + cache[name].float().sum(dim=(0, 1))
                counts[name] += cache[name].shape[0] * cache[name].shape[1]
    return {name: sums[name] / counts[name] for name in vision}
