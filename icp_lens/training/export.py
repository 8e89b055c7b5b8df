"""Exporting the trained model as an ordinary Hugging Face checkpoint, and verifying it.

The trainer trains inside a ``TransformerBridge``, possibly on LoRA adapters, possibly
with a pruning plan's hook edits active. An export has to turn that into weights that
``transformers`` loads with no icp_lens installed and that compute what was trained:

1. :meth:`ExportMixin.trained_hf_model` gives a plain HF model with the trained weights:
   LoRA adapters merged into a copy of the original weights
   (:func:`~icp_lens.training.lora.merge_lora`), or, for full fine-tuning, the bridge's
   HF model after writing split q/k/v copies back into a fused qkv weight
   (:func:`~icp_lens.training.fused.sync_fused_qkv`, GPT-NeoX);
2. the pruning plan (hybrid runs) is baked into those weights
   (:func:`~icp_lens.pruning.apply_plan_to_model`) and the result written by the
   pruner's exporter (contiguous, storage-independent tensors; the bridge's own
   ``save_pretrained`` fails on its shared q/k/v views);
3. the checkpoint is reloaded with ``transformers`` alone and compared with the trained
   model ablated by module hooks and with the trained bridge under the plan's hook edits
   (:func:`~icp_lens.pruning.verify.verify_export`);
4. ``training.json`` (the run's identity and result), ``history.csv`` and
   ``verification.json`` go next to it. All of it is written, and the checkpoint verified,
   inside the temporary folder before the one rename, so ``out`` holds all of it or
   nothing (a run killed before the rename leaves ``out`` absent and resumable).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from icp_lens.atomic import fault_point
from icp_lens.distributed import barrier, is_main
from icp_lens.pruning.plan import PrunePlan
from icp_lens.training.fused import sync_fused_qkv
from icp_lens.training.result import TrainResult, jsonable

if TYPE_CHECKING:  # pragma: no cover
    from icp_lens.training.trainer import Trainer

__all__ = ["ExportMixin"]


class ExportMixin:
    """``Trainer``'s export methods."""

    def trained_hf_model(self: Trainer) -> nn.Module:
        """An ordinary HF model with the trained weights (LoRA merged), before the pruning plan."""
        from icp_lens.pruning.source import clean_hf_model

        if self.lora is not None:
            from icp_lens.training.lora import merge_lora

            return merge_lora(self.base, self.lora)
        sync_fused_qkv(self._fused)  # GPT-NeoX: the bridge trained split copies of the fused qkv weight
        return clean_hf_model(self.model)

    def export(
        self: Trainer,
        out: str | Path,
        *,
        overwrite: bool = False,
        verify: bool = True,
        tolerance: float = 1e-4,
        n_prompts: int = 64,
        result: TrainResult | None = None,
        save_dtype: Any = None,
    ) -> Any:
        """Write the trained model (LoRA merged, pruning plan baked in) as an HF checkpoint; verify it.

        Returns the pruner's ``VerificationReport`` or the output path when
        ``verify=False``. The checkpoint is reloaded with ``transformers`` alone and
        compared with the trained HF model ablated per the plan by module hooks (the weight
        edit) and with the trained bridge under the plan's hook edits (what was trained,
        ``hooked_max_abs_logit_diff``). ``training.json``, ``history.csv`` and
        ``verification.json`` are written next to the weights, inside the temporary folder
        before it becomes ``out``. ``save_dtype`` (``"bfloat16"``, ``"float16"``) writes the
        verified weights in that dtype.

        Under a process group every rank calls it: rank 0 writes and verifies, the others
        wait for it and return ``None``.
        """
        if not is_main():
            barrier()
            return None
        try:
            return self._export(out, overwrite=overwrite, verify=verify, tolerance=tolerance, n_prompts=n_prompts,
                                result=result, save_dtype=save_dtype)  # fmt: skip
        finally:
            barrier()

    def _export(
        self: Trainer, out: str | Path, *, overwrite: bool, verify: bool, tolerance: float, n_prompts: int,
        result: TrainResult | None, save_dtype: Any,
    ) -> Any:  # fmt: skip
        """:meth:`export`'s work (on one process)."""
        from icp_lens.devices import resolve_dtype
        from icp_lens.pruning import apply_plan_to_model, export_checkpoint, fingerprint
        from icp_lens.pruning.export import check_target
        from icp_lens.pruning.verify import verification_batches, verify_export, write_report

        out = check_target(out, overwrite=overwrite)
        trained = self.trained_hf_model()
        plan = self.plan
        edited = trained
        if plan is not None:
            edited, _ = apply_plan_to_model(copy.deepcopy(trained), plan, check=False)
        reports: list[Any] = []

        def finish(tmp: Path) -> None:  # everything is written and verified before the one rename
            record = {**self._identity(), "result": None if result is None else jsonable(result.to_dict())}
            (tmp / "training.json").write_text(json.dumps(record, indent=2) + "\n")
            self.history.to_csv(tmp / "history.csv", index=False)
            if verify:
                prompts = [ex.prompt for ex in self.train_data.examples[:n_prompts]]
                reference_plan = plan or PrunePlan(features=(), mode="zero", fingerprint=fingerprint(trained))
                batches = verification_batches(self.model, prompts=prompts)
                self.model.eval()
                reports.append(verify_export(
                    trained, reference_plan, tmp, hooked=self.model, batches=batches, tolerance=tolerance,
                    subject="fine-tune",
                ))  # fmt: skip
                write_report(tmp, reports[0])
            fault_point("train-export:before-swap")

        dtype = None if save_dtype is None else resolve_dtype(save_dtype)
        out = export_checkpoint(edited, out, tokenizer=self.tokenizer, plan=plan, overwrite=overwrite, finish=finish,
                                save_dtype=dtype)  # fmt: skip
        return reports[0] if reports else out
