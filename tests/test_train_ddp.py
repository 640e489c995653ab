"""Scale-out: the trainer under `torchrun --nproc_per_node 2` on CPU (gloo).

The test runs this file as the worker script: each rank trains a KnGPT2 student with ILKD for a few steps and
saves its parameters and its own per-step losses; the test then checks both ranks agree and the logged loss is
the mean over ranks.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

STEPS = 3


def _worker(out: Path) -> None:
    """One rank: identical seeded models, rank-specific batches (the distributed sampler splits them)."""
    import numpy as np
    from datasets import Dataset
    from transformers import GPT2Config, GPT2LMHeadModel, default_data_collator

    from kninfer.modeling.compress import compress
    from kninfer.train import trainer as trainer_module

    local: list[float] = []

    class RecordingTrainer(trainer_module.DistillTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            local.append(loss.item())
            return loss

    trainer_module.DistillTrainer = RecordingTrainer  # fit() builds this module's DistillTrainer
    torch.manual_seed(0)
    teacher = GPT2LMHeadModel(GPT2Config(vocab_size=500, n_positions=32, n_embd=32, n_layer=2, n_head=2)).eval()
    student, _ = compress(teacher, "kngpt2")
    with torch.no_grad():  # a student that is clearly off the teacher
        for p in student.parameters():
            p.add_(0.02 * torch.randn_like(p))
    ids = np.random.default_rng(0).integers(0, 500, (4 * STEPS, 16)).tolist()
    data = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * 16] * len(ids), "labels": ids})
    trainer = trainer_module.fit(student, data, out / "ckpt", teacher=teacher, kd="ilkd",
                                 collator=default_data_collator, max_steps=STEPS, per_device_train_batch_size=2,
                                 learning_rate=1e-2, logging_steps=1,
                                 save_strategy="no", report_to=[], disable_tqdm=True, seed=0)
    rank = trainer.args.process_index
    torch.save({"state": student.state_dict(), "local": local, "log": trainer.state.log_history,
                "world": trainer.args.world_size}, out / f"rank{rank}.pt")


def test_torchrun_two_ranks_agree(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
         __file__, str(tmp_path)], capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    for name, a in ranks[0]["state"].items():
        torch.testing.assert_close(ranks[1]["state"][name], a, rtol=0, atol=0, msg=name)
    local = [r["local"] for r in ranks]
    assert len(local[0]) == len(local[1]) == STEPS
    assert local[0] != local[1]  # the ranks saw different batches
    logged = [entry["loss"] for entry in ranks[0]["log"] if "loss" in entry]
    averaged = [(a + b) / 2 for a, b in zip(*local, strict=True)]
    assert logged == pytest.approx(averaged, abs=1e-4)  # Trainer rounds logged losses to 4 decimals


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
