"""The training loop shared by pretrain_llama.py and sft.py: optimizer, checkpoints, metrics."""
