"""optimum's ONNX configuration for `kngpt2`: GPT-2's inputs, outputs and tracing patches, registered by name."""

from __future__ import annotations

import warnings
from pathlib import Path

from optimum.exporters.onnx.convert import export
from optimum.exporters.onnx.model_configs import GPT2OnnxConfig
from optimum.exporters.onnx.model_patcher import ModelPatcher
from optimum.exporters.tasks import TasksManager
from transformers import PreTrainedModel

from kninfer.export.lean import patching_specs, tied_head_reads_embedding

TASKS = {"causal-lm": "text-generation", "sequence-classification": "text-classification"}


@TasksManager.create_register("onnx")("kngpt2", "text-generation", "text-generation-with-past", "text-classification")
class KnGPT2OnnxConfig(GPT2OnnxConfig):
    """KnGPT2 keeps GPT-2's graph interface; only some of its modules are Kronecker layers. Both model types
    trace through export.lean's forwards (constant reshape targets, one mask per graph)."""

    def patch_model_for_export(self, model: PreTrainedModel, model_kwargs: dict | None = None) -> ModelPatcher:
        self.PATCHING_SPECS = patching_specs()
        return super().patch_model_for_export(model, model_kwargs)


def export_onnx(model: PreTrainedModel, task: str, output: Path, opset: int) -> None:
    """Trace `model` to `output` with optimum's patcher (traceable cache and masks for transformers 4.5x)."""
    config = KnGPT2OnnxConfig(model.config, task=TASKS[task], use_past=task == "causal-lm",
                              use_past_in_inputs=task == "causal-lm")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings about Python control flow that optimum's patches handle
        with tied_head_reads_embedding(model):
            export(model, config, output, opset=opset)
