"""Checkpoints and weights: save/load with resharding, export, and loading pretrained weights.

See store.py ([Note: checkpoint layout], [Note: atomic save]), weights.py, and manifest.py for how a
checkpoint's own files are read and checked (see [Note: untrusted files] in elixir/validation.py);
layout.py, buffers.py and files.py hold what those share. `weights` imports `store`, never the reverse.
"""

from elixir.checkpoint.files import CheckpointError
from elixir.checkpoint.store import load, save
from elixir.checkpoint.weights import export, export_checkpoint, load_pretrained

__all__ = ["CheckpointError", "export", "export_checkpoint", "load", "load_pretrained", "save"]
