"""LightningModules for the training stages: sft (SL-CAI), and later pm and ppo."""
