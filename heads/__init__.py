"""Stage 2: task definitions, metrics, losses, loss weightings, the heads and their training from a cache."""
