"""Model adapters: how each family's checkpoints load and where its hook points are."""
