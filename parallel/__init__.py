"""Tensor- and expert-parallel building blocks on torch.distributed; knows tensors and process groups only."""
