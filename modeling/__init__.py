"""The Llama model, its config, checkpoint conversion and generation, written in `parallel` layers."""
