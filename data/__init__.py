"""Raw corpora -> `part-NNNNN.jsonl.zst` shards: `shard.py`, the default corpus builder and the download scripts."""
