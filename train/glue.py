"""GLUE for training: rows from local TSV folders or the hub, tokenised; causal LMs turned into classifiers; scoring."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset, load_dataset
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding, PreTrainedModel

from kninfer.errors import KninferError
from kninfer.modeling.io import is_classifier
from kninfer.runtime.tasks import GlueTask, input_text, read_glue_tsv

HUB_SPLITS = {"train": "train", "dev": "validation", "dev_matched": "validation_matched",
              "dev_mismatched": "validation_mismatched"}
HUB_COLUMNS = {"cola": ("sentence",), "sst2": ("sentence",), "mrpc": ("sentence1", "sentence2"),
               "qqp": ("question1", "question2"), "stsb": ("sentence1", "sentence2"),
               "mnli": ("premise", "hypothesis"), "qnli": ("question", "sentence"), "rte": ("sentence1", "sentence2")}


def load_glue(
    task: GlueTask, split: str, data_dir: str | Path | None = None, max_samples: int | None = None
) -> Dataset:
    """A split as columns "text" and "label": from `data_dir` in the GLUE layout, else from the hub's `glue`."""
    if data_dir is None:
        try:
            rows = load_dataset("glue", task.name, split=HUB_SPLITS[split])
        except Exception as error:  # the hub raises many types: unreachable, unknown config
            raise KninferError(f"cannot load glue/{task.name} from the hub: {str(error).splitlines()[0]}") from None
        texts = list(zip(*(rows[c] for c in HUB_COLUMNS[task.name]), strict=True))
        labels = np.asarray(rows["label"])
    else:
        if not Path(data_dir).is_dir():
            raise KninferError(f"--data-dir '{data_dir}': no such directory (expected the GLUE layout, e.g. SST-2/)")
        texts, labels = read_glue_tsv(Path(data_dir) / task.folder / f"{split}.tsv", task)
        if labels is None:
            raise KninferError(f"{task.folder}/{split}.tsv has no '{task.label_column}' column: unlabelled")
    if max_samples is not None:
        texts, labels = texts[:max_samples], labels[:max_samples]
    return Dataset.from_dict({"text": [input_text(t) for t in texts], "label": labels.tolist()})


def tokenize(dataset: Dataset, tokenizer: Any, max_length: int) -> Dataset:
    """input_ids, attention_mask and labels (truncated on the right to `max_length` tokens)."""
    def encode(batch: dict[str, list]) -> dict[str, list]:
        return tokenizer(batch["text"], truncation=True, max_length=max_length) | {"labels": batch["label"]}

    return dataset.map(encode, batched=True, remove_columns=dataset.column_names, desc="tokenising")


def with_pad_token(tokenizer: Any) -> Any:
    """GPT-2 and many Llamas have no pad token: pad with EOS (the classifier pools the last non-pad token)."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def as_classifier(model: PreTrainedModel, task: GlueTask, pad_token_id: int, max_length: int) -> PreTrainedModel:
    """A sequence classifier for `task` with `model`'s body (dense or Kronecker, any family); a fitting one is kept.

    Its config records the task and the input length it is trained on, so an exported bundle reads the task's
    files and cuts inputs the same way.
    """
    config = model.config
    if is_classifier(model):
        if config.num_labels != task.num_labels:
            raise KninferError(f"the model classifies into {config.num_labels} labels, {task.name} has "
                               f"{task.num_labels}: start from a causal LM or a {task.name} classifier")
        classifier = model
    else:
        config = copy.deepcopy(config)
        config.num_labels, config.pad_token_id = task.num_labels, pad_token_id
        if task.labels is not None:
            config.id2label = dict(enumerate(task.labels))
            config.label2id = {label: i for i, label in enumerate(task.labels)}
        config.problem_type = "regression" if task.labels is None else "single_label_classification"
        classifier = AutoModelForSequenceClassification.from_config(config)
        classifier.config.architectures = [type(classifier).__name__]
        missing, _ = classifier.load_state_dict(model.state_dict(), strict=False)  # the LM head is left out
        if any(not key.startswith("score.") for key in missing):
            raise KninferError(f"cannot build a classifier from this model: missing weights {missing[:3]}")
    classifier.config.glue_task, classifier.config.max_input_length = task.name, max_length
    return classifier


def predict(model: PreTrainedModel, dataset: Dataset, tokenizer: Any, batch_size: int = 32) -> np.ndarray:
    """The model's logits for every row of a tokenised dataset, in order."""
    features = dataset.remove_columns([c for c in dataset.column_names if c == "labels"])
    loader = DataLoader(features, batch_size=batch_size, collate_fn=DataCollatorWithPadding(tokenizer))
    device = next(model.parameters()).device
    model.eval()
    logits = []
    with torch.no_grad():
        for batch in tqdm(loader, desc="predicting", leave=False):
            logits.append(model(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu().numpy())
    return np.concatenate(logits)


def evaluate(model: PreTrainedModel, task: GlueTask, tokenizer: Any, data_dir: str | Path | None,
             max_length: int = 128, batch_size: int = 32) -> dict[str, dict[str, float]]:
    """The task's metrics on each of its evaluation splits (dev; MNLI: matched and mismatched)."""
    results = {}
    for split in task.eval_splits:
        dataset = tokenize(load_glue(task, split, data_dir), tokenizer, max_length)
        logits = predict(model, dataset, tokenizer, batch_size)
        results[split] = task.metrics(task.predictions(logits), np.asarray(dataset["labels"]))
    return results
