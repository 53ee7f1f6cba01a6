"""Tokenizer, streaming jsonl.zst loading, packing and SFT rendering."""
