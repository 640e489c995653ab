"""Sliding-window perplexity of a causal LM (the standard transformers recipe, with exact token counts)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedModel


def perplexity(model: PreTrainedModel, input_ids: torch.Tensor, block_size: int, stride: int) -> tuple[float, int]:
    """exp(mean NLL) over tokens 1..n-1 of a 1-D id tensor, and how many tokens were scored.

    Windows of `block_size` tokens start every `stride` tokens; only the tokens a window adds beyond the
    previous one are scored (the overlap is context, labels -100), so each token is predicted once, with
    at least `block_size - stride` tokens of context after the first window.
    """
    if not 0 < stride <= block_size:
        raise ValueError(f"stride must be in (0, block_size={block_size}], got {stride}")
    device = next(model.parameters()).device
    model.eval()
    total, count, previous_end = 0.0, 0, 0
    n = input_ids.numel()
    with torch.no_grad():
        for begin in tqdm(range(0, n, stride), desc="perplexity", leave=False):
            end = min(begin + block_size, n)
            window = input_ids[begin:end].to(device)[None]
            targets = window.clone()
            targets[:, : -(end - previous_end)] = -100
            logits = model(window).logits[:, :-1].float()
            shifted = targets[:, 1:]
            total += F.cross_entropy(logits.transpose(1, 2), shifted, ignore_index=-100, reduction="sum").item()
            count += int((shifted != -100).sum())
            previous_end = end
            if end == n:
                break
    return math.exp(total / count), count
