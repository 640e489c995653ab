"""Train a small GPT-2 from scratch on a text corpus, with its own byte-level BPE tokenizer."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

from kninfer.atomic import write_text
from kninfer.errors import KninferError
from kninfer.modeling.io import check_output, save
from kninfer.train.data import lm_blocks, load_lm_text
from kninfer.train.trainer import checkpoints_beside, fit

EOS = "<|endoftext|>"
DTYPES = ("float32", "float16")


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> GPT2TokenizerFast:
    """A GPT-2-style byte-level BPE tokenizer (round-trips any UTF-8 text) trained on `texts`."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=True,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return GPT2TokenizerFast(tokenizer_object=tokenizer, bos_token=EOS, eos_token=EOS, unk_token=EOS)


def pretrain(
    data: str, out: str | Path, *, n_layer: int = 4, n_embd: int = 256, n_head: int = 4, vocab_size: int = 8192,
    block_size: int = 256, epochs: float = 1.0, max_steps: int = -1, batch_size: int = 16, lr: float = 1e-3,
    seed: int = 0, eval_data: str | None = None, dtype: str = "float32", overwrite: bool = False,
) -> GPT2LMHeadModel:
    """Train a GPT-2 of the given shape from scratch on `data` (train split) and save it to `out`.

    Plain causal-LM loss, cosine schedule with 5% warm-up, weight decay 0.1, Adam β2 0.95; the valid split (of
    `eval_data`, else of a `data` folder) is scored each epoch. A run stopped by Ctrl-C or SIGTERM saves a
    checkpoint in `OUT.checkpoints` and raises TrainingInterrupted; the next run resumes it.
    """
    if dtype not in DTYPES:
        raise KninferError(f"--dtype {dtype}: expected one of {', '.join(DTYPES)}")
    if n_embd % n_head:
        raise KninferError(f"--n-embd {n_embd} is not a multiple of --n-head {n_head}")
    check_output(out, overwrite)
    torch.manual_seed(seed)
    text = load_lm_text(data, "train")
    tokenizer = train_tokenizer((row["text"] for row in text), vocab_size)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=block_size, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    model = GPT2LMHeadModel(config)
    train_blocks = lm_blocks(text, tokenizer, block_size)
    eval_source = eval_data or (data if Path(data).is_dir() else None)
    eval_blocks = lm_blocks(load_lm_text(eval_source, "valid"), tokenizer, block_size) if eval_source else None
    trainer = fit(
        model, train_blocks, checkpoints_beside(out), eval_dataset=eval_blocks, resume="auto", tokenizer=tokenizer,
        per_device_train_batch_size=batch_size, learning_rate=lr, num_train_epochs=epochs, max_steps=max_steps,
        lr_scheduler_type="cosine", warmup_ratio=0.05, weight_decay=0.1, adam_beta2=0.95, logging_steps=20,
        save_steps=200, save_total_limit=1, eval_strategy="epoch" if eval_blocks is not None else "no",
        per_device_eval_batch_size=batch_size, seed=seed, dataloader_num_workers=0,
    )
    model = model.to(getattr(torch, dtype)).eval()
    save(model, out, tokenizer, overwrite=overwrite)
    write_text(Path(out) / "train_log.json", json.dumps(trainer.state.log_history, indent=1))
    return model
