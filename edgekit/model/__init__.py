"""The model: family table, loading, exit-layer surgery, sizes, tiny checkpoints and the embedded demo model."""
