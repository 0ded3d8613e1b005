"""Pure analyses: (pipeline, tensors) -> dataclasses of tensors and numbers. No files, no figures, no CLI."""
