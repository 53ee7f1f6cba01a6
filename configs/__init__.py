"""Training configuration: dataclass schema, yaml files, model presets and DeepSpeed configs."""
