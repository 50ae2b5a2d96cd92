"""Task families. Each provides data, models, its task loss, its KD loss and its metrics."""
