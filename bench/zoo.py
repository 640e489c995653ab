"""The standard benchmark sets, one per model family, each built from a real model's configuration with random weights
(needs the train extra).

Speed does not depend on the weights' values, so nothing is downloaded. Every family's zoo holds the same students
(STUDENTS), made from its dense teacher by the same presets, each in every variant of VARIANTS (fp32 exported, the
quantized ones made from it: block-wise int8 and int4, dynamic int8), plus optimum-onnx's own export of the dense
model (fp32, and int8-dynamic by its own quantizer) and PyTorch eager folders. Each model lands in its own folder
under the output directory, named after the family (GPT-2's names carry no prefix, as before families: gpt2-fp32,
kngpt2-int4; SmolLM2's do: smollm2-fp32, smollm2-kngpt2-int4), so the zoos of both families can share one directory;
a folder that is already complete, of the expected variant, is reused (pass `rebuild` to remake it). An -int8 folder
from before int8 meant block-wise (it holds dynamic int8) is remade.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import torch
from transformers import GPT2Config, LlamaConfig, PretrainedConfig, PreTrainedModel

from kninfer.atomic import atomic_path
from kninfer.errors import KninferError
from kninfer.export.bundle import bundle_metadata, export_bundle, quantize_bundle
from kninfer.modeling.compress import compress
from kninfer.modeling.families import family_of
from kninfer.modeling.io import save
from kninfer.runtime.bundle import describe_models, read_bundle


@dataclass(frozen=True)
class Student:
    """One model of every zoo, made from the family's dense teacher."""

    name: str  # in a GPT-2 zoo; other families prefix it with their short name
    preset: str | None  # compress's preset; None: the dense teacher itself
    tie_head: bool | None  # the Kronecker head reuses the embedding's factors; None where no Kronecker embedding
    torch: bool = False  # also saved for PyTorch eager


# the order is the order of the tables. tie_head is passed to compress explicitly: its default follows the teacher's
# tie_word_embeddings (both teachers here tie theirs), and "kngpt2" means the paper's untied dense head
STUDENTS = (Student("dense", None, None, torch=True), Student("kngpt2", "kngpt2", False, torch=True),
            Student("kngpt2-tied", "kngpt2", True), Student("krony-pt", "krony-pt", False),
            Student("distil", "distil", None))

# every student's bundles, in the tables' order: fp32 is exported, the others are quantize_bundle's of it
VARIANTS = ("fp32", "int8", "int4", "int8-dynamic")


@dataclass(frozen=True)
class ZooFamily:
    """A family's zoo: the configuration its random teacher is built from, and how its models are named."""

    family: str  # kninfer.modeling.families' name, as bench/latency.py derives it from a bundle's model_type
    short: str  # the dense model's name
    prefix: str  # before each student's name
    source: str  # the model whose configuration this is, for messages
    config: Callable[[], PretrainedConfig]

    def model_name(self, student: Student) -> str:
        """The name of `student`'s models (each adds -VARIANT) in this zoo."""
        return self.short if student.preset is None else f"{self.prefix}{student.name}"

    @property
    def reference(self) -> str:
        """The model the latency ratios are taken against: the dense fp32 bundle."""
        return f"{self.short}-fp32"


def smollm2_config() -> LlamaConfig:
    """SmolLM2-135M's configuration (ids 0 = <|endoftext|> as bos and eos, as SmolLM2's tokenizer has it). The
    context stays at 8192: neither kninfer's graph nor optimum's holds a constant sized by it (rotary angles come
    from position_ids, the causal mask from the attention mask's length), so it costs no bytes or time."""
    return LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                       num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
                       rope_theta=1e5, tie_word_embeddings=True, rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=0)


FAMILIES = {
    "gpt2": ZooFamily("gpt2", "gpt2", "", "GPT-2 small", GPT2Config),
    "llama": ZooFamily("llama", "smollm2", "smollm2-", "SmolLM2-135M", smollm2_config),
}


def build_zoo(out: Path, tokenizer_json: str, rebuild: bool = False, progress: Callable[[str], None] = print,
              family: ZooFamily | str = "gpt2") -> list[dict[str, Any]]:
    """Export every model of `family`'s zoo (each student in every variant of VARIANTS, optimum's fp32 and dynamic
    int8 of the dense one) and save its torch models; returns one entry per model, each student's variants in VARIANTS'
    order, then optimum's, then its torch folder: {name, path, runtime, family, preset, tie_head, variant}.
    `tokenizer_json` is cut to the model's vocabulary when it has more tokens (fit_tokenizer)."""
    zoo = FAMILIES[family] if isinstance(family, str) else family
    torch.manual_seed(0)
    config = zoo.config()
    teacher = family_of(config).causal_lm(config).eval()
    tokenizer_json = fit_tokenizer(tokenizer_json, config.vocab_size)
    entries = []
    for student in STUDENTS:
        name = zoo.model_name(student)
        kind = {"family": zoo.family, "preset": student.preset, "tie_head": student.tie_head}
        if student.preset is None:
            model = teacher
        else:
            model = compress(teacher, student.preset, tie_head=student.tie_head)[0].eval()
        fp32 = out / f"{name}-fp32"
        for variant in VARIANTS:
            folder = out / f"{name}-{variant}"
            if rebuild or not _current(folder, variant):
                if variant == "fp32":
                    progress(f"exporting {name} fp32")
                    export_bundle(model, folder / "model.onnx", tokenizer_json=tokenizer_json, verify=False)
                else:
                    progress(f"quantizing {name} {variant}")
                    quantize_bundle(fp32 / "model.onnx", folder / "model.onnx", variant=variant)
            entries.append(_entry(folder, kind, variant))
        if student.preset is None:
            for variant in ("fp32", "int8-dynamic"):
                folder = out / f"optimum-{zoo.short}-{variant}"
                if rebuild or _missing(folder):
                    progress(f"exporting {zoo.short} with optimum-onnx ({variant})")
                    optimum_bundle(teacher, folder, variant, out / f"optimum-{zoo.short}-fp32", tokenizer_json)
                entries.append(_entry(folder, kind, variant))
        if student.torch:
            folder = out / f"torch-{name}"
            if rebuild or not (folder / "config.json").is_file():
                progress(f"saving {name} for PyTorch eager")
                save(model, folder, overwrite=True)  # the zoo folder is the bench's own cache
            entries.append({"name": folder.name, "path": str(folder), "runtime": "torch", **kind, "variant": "fp32"})
    return entries


def _missing(folder: Path) -> bool:
    return not (folder / "kninfer.json").is_file()


def _current(folder: Path, variant: str) -> bool:
    """Whether `folder` holds a complete kninfer bundle of `variant` as it is made today: its kninfer.json says that
    variant and, for int8, the graph is block-wise (MatMulNBits); an -int8 folder built before int8 meant block-wise
    says int8 too but holds dynamic int8 (MatMulInteger)."""
    if _missing(folder):
        return False
    bundle = read_bundle(folder)
    if bundle.meta.get("variant") != variant:
        return False
    if variant != "int8":
        return True
    graph = onnx.load(str(bundle.onnx_path), load_external_data=False).graph
    return any(node.op_type == "MatMulNBits" for node in graph.node)


def _entry(folder: Path, kind: dict[str, Any], variant: str) -> dict[str, Any]:
    return {"name": folder.name, "path": str(read_bundle(folder).onnx_path), "runtime": "onnxruntime", **kind,
            "variant": variant}


def fit_tokenizer(tokenizer_json: str, vocab_size: int) -> str:
    """`tokenizer_json` itself when its ids fit `vocab_size`; otherwise a byte-level BPE cut to `vocab_size` ids:
    the special tokens first (SmolLM2 keeps <|endoftext|> at id 0), then the BPE's tokens in their order, and only
    the merges whose parts and result are kept, so every text still encodes.

    The bench times decode steps on random ids, so which tokens a vocabulary holds does not change a latency or
    memory figure; only --text-file's perplexity tokenizes (on random weights, and the same for every model of a
    zoo). GPT-2 small's zoo keeps GPT-2's tokenizer as is; SmolLM2's 49,152 ids take GPT-2's first 49,151 tokens.
    """
    from tokenizers import Tokenizer

    if Tokenizer.from_str(tokenizer_json).get_vocab_size(with_added_tokens=True) <= vocab_size:
        return tokenizer_json
    data = json.loads(tokenizer_json)
    model = data.get("model") or {}
    special = [t["content"] for t in sorted(data.get("added_tokens") or [], key=lambda t: t["id"])]
    if model.get("type") != "BPE" or vocab_size - len(special) < 256:
        raise KninferError(f"cannot fit the tokenizer to a vocabulary of {vocab_size}: that needs a byte-level BPE "
                           "and room for its 256 byte tokens")
    base = [token for token, _ in sorted(model["vocab"].items(), key=lambda item: item[1]) if token not in special]
    ids = {token: i for i, token in enumerate(special + base[: vocab_size - len(special)])}
    model["vocab"] = ids
    model["merges"] = [merge for merge in model["merges"]
                       if all(part in ids for part in (*_pair(merge), "".join(_pair(merge))))]
    for token in data.get("added_tokens") or []:
        token["id"] = ids[token["content"]]
    _renumber_post_processor(data.get("post_processor"), ids)
    return json.dumps(data)


def _pair(merge: str | list[str]) -> tuple[str, str]:
    """A merge as (left, right): tokenizers writes them as "a b" or, since 0.20, as ["a", "b"]."""
    left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
    return left, right


def _renumber_post_processor(processor: dict[str, Any] | None, ids: dict[str, int]) -> None:
    """Special-token ids a template post-processor holds (a sequence of processors included), in the new numbering."""
    if not processor:
        return
    for inner in processor.get("processors") or []:
        _renumber_post_processor(inner, ids)
    for special in (processor.get("special_tokens") or {}).values():
        special["ids"] = [ids[token] for token in special["tokens"]]


def optimum_bundle(teacher: PreTrainedModel, out: Path, variant: str, fp32_folder: Path, tokenizer_json: str) -> None:
    """optimum-onnx's own export (text-generation-with-past) of the dense model, and for int8-dynamic its
    ORTQuantizer (dynamic, per channel): the anchor a user would pick instead; kninfer.json is added so the runtime
    reads it."""
    from optimum.exporters.onnx import onnx_export_from_model

    with atomic_path(out, directory=True, kind="optimum-bundle", overwrite=True) as work:
        if variant == "fp32":
            onnx_export_from_model(teacher, work, task="text-generation-with-past", do_validation=False)
            onnx_file = "model.onnx"
        else:
            from optimum.onnxruntime import ORTQuantizer
            from optimum.onnxruntime.configuration import AutoQuantizationConfig

            quantizer = ORTQuantizer.from_pretrained(fp32_folder, file_name="model.onnx")
            quantizer.quantize(AutoQuantizationConfig.avx512_vnni(is_static=False, per_channel=True), save_dir=work)
            onnx_file = "model_quantized.onnx"
        (work / "tokenizer.json").write_text(tokenizer_json)
        metadata = bundle_metadata(teacher, "causal-lm", variant)
        data_file = f"{onnx_file}_data"  # optimum's name, written only past the 2 GB protobuf limit
        metadata["onnx_data_file"] = data_file if (work / data_file).exists() else None
        metadata["tokenizer_file"] = "tokenizer.json"
        (work / "kninfer.json").write_text(describe_models({onnx_file: metadata}))
