"""Cluster jobs: parallel relation-LoRA fine-tuning on Ray Train/Tune and job submission to Ray clusters."""
