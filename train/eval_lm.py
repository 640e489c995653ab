"""Sliding-window perplexity of a causal LM in torch, with the runtime's text join and window rule."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from kninfer.runtime.perplexity import lm_text, windows
from kninfer.train.data import load_lm_text


def eval_text(source: str, split: str = "test") -> str:
    """The text eval-lm scores: local files as `kninfer eval` reads one (lm_text), hub rows joined by blank lines."""
    rows = load_lm_text(source, split)["text"]
    return lm_text("".join(rows)) if Path(source).exists() else "\n\n".join(rows)


def perplexity(model: PreTrainedModel, input_ids: torch.Tensor, block_size: int, stride: int) -> tuple[float, int]:
    """exp(mean NLL) of a 1-D id tensor under the runtime's window rule (`windows`), and how many tokens it scored.

    Windows of `block_size` tokens start every `stride` tokens; each scores only the tokens the previous one did
    not reach (the overlap is context), so with stride < block_size every token but the first is scored once,
    with at least `block_size - stride` tokens of context after the first window.
    """
    if not 0 < stride <= block_size:
        raise ValueError(f"stride must be in (0, block_size={block_size}], got {stride}")
    device = next(model.parameters()).device
    model.eval()
    total, scored = 0.0, 0
    with torch.no_grad():
        for begin, end, first in tqdm(list(windows(input_ids.numel(), block_size, stride)), desc="perplexity",
                                      leave=False):
            window = input_ids[begin:end].to(device)
            logits = model(window[None]).logits[0, first - begin - 1 : end - begin - 1].float()  # t - 1 predicts t
            total += F.cross_entropy(logits, window[first - begin :], reduction="sum").item()
            scored += end - first
    return math.exp(total / scored), scored
