"""Pruning: removing weights (unstructured) or whole neurons and channels (structured)."""
