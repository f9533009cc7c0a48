"""Checkpoints on disk: adapter folders, sharded safetensors I/O, LoRA merges and weight diffs. Below training/,
generation/ and export/, which all read checkpoints."""
