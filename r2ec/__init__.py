"""r2ec: RL post-training for reasoning recommenders (R2ec / RecPO)."""
