"""Training utilities shared by the recipes: the fine-tuning loop, checkpoints, generation, evaluation."""
