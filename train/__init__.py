"""Training: ILKD distillation, GLUE fine-tuning, baselines (kninfer.train)."""
