"""Training (kninfer.train): ILKD distillation, GLUE fine-tuning and scoring, torch perplexity, teacher pre-training."""

from kninfer.train.pretrain import pretrain
from kninfer.train.recipes import LMPerplexity, distill, evaluate_glue, finetune, lm_perplexity
from kninfer.train.trainer import TrainingInterrupted

__all__ = ["LMPerplexity", "TrainingInterrupted", "distill", "evaluate_glue", "finetune", "lm_perplexity", "pretrain"]
