"""optimum's ONNX configurations per family: the family's inputs and outputs with its export-time forwards patched in,
registered for each `kn<family>` model type."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

from optimum.exporters.onnx.base import OnnxConfig
from optimum.exporters.onnx.convert import export
from optimum.exporters.onnx.model_configs import GPT2OnnxConfig, LlamaOnnxConfig
from optimum.exporters.onnx.model_patcher import ModelPatcher, PatchingSpec
from optimum.exporters.tasks import TasksManager
from transformers import PreTrainedModel

from kninfer.errors import KninferError
from kninfer.export import gpt2_forwards, llama_forwards
from kninfer.export.forwards import tied_head_reads_embedding
from kninfer.modeling.families import FAMILIES as MODEL_FAMILIES

TASKS = {"causal-lm": "text-generation", "sequence-classification": "text-classification"}
FAMILIES: dict[str, tuple[type[OnnxConfig], Callable[[bool], list[PatchingSpec]]]] = {
    "gpt2": (GPT2OnnxConfig, gpt2_forwards.patching_specs),
    "llama": (LlamaOnnxConfig, llama_forwards.patching_specs),
}


class _PatchedForwards:
    """Mixin for an optimum OnnxConfig: the export traces through `patching_specs(fused_attention)`'s forwards."""

    patching_specs: Callable[[bool], list[PatchingSpec]]
    fused_attention = True

    def patch_model_for_export(self, model: PreTrainedModel, model_kwargs: dict | None = None) -> ModelPatcher:
        self.PATCHING_SPECS = self.patching_specs(self.fused_attention)
        return super().patch_model_for_export(model, model_kwargs)

    def fix_dynamic_axes(self, model_path: Path, device: str = "cpu", dtype: str | None = None,
                         input_shapes: dict | None = None) -> None:
        """optimum's check run, on a batch of 1: GroupQueryAttention refuses a step of several tokens after a cache
        for a larger batch (docs/architecture.md, "ONNX graph rules")."""
        if self.fused_attention:
            input_shapes = {**(input_shapes or {}), "batch_size": 1}
        super().fix_dynamic_axes(model_path, device=device, dtype=dtype, input_shapes=input_shapes)


def _onnx_config(family: str, base: type[OnnxConfig],
                 specs: Callable[[bool], list[PatchingSpec]]) -> type[OnnxConfig]:
    """`base` with `specs` patched in, registered for the family's Kronecker student type (kngpt2, knllama)."""
    config = type(f"Kn{base.__name__}", (_PatchedForwards, base),
                  {"patching_specs": staticmethod(specs), "__module__": __name__})
    register = TasksManager.create_register("onnx")
    tasks = ("text-generation", "text-generation-with-past", "text-classification")
    return register(MODEL_FAMILIES[family].student_type, *tasks)(config)


ONNX_CONFIGS = {family: _onnx_config(family, *entry) for family, entry in FAMILIES.items()}


def export_onnx(model: PreTrainedModel, task: str, output: Path, opset: int, family: str,
                fused_attention: bool = True) -> None:
    """Trace `model` of `family` to `output` with optimum's patcher (traceable cache and masks for transformers
    4.5x); `fused_attention`: each layer's attention core as an onnxruntime contrib op (docs/architecture.md,
    "ONNX graph rules")."""
    if family not in ONNX_CONFIGS:
        raise KninferError(f"cannot export a {family} model: kninfer exports {', '.join(ONNX_CONFIGS)}")
    config = ONNX_CONFIGS[family](model.config, task=TASKS[task], use_past=task == "causal-lm",
                                  use_past_in_inputs=task == "causal-lm")
    config.fused_attention = fused_attention
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings about Python control flow that optimum's patches handle
        with tied_head_reads_embedding(model):
            export(model, config, output, opset=opset)
