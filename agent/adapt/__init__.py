"""Adapting to the device: the resource monitor, the swap policy and the loop that applies
its decisions through the model manager (the one owner of every variant change)."""
