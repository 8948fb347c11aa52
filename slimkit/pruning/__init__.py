"""Pruning: unstructured magnitude (with schedules and masks), N:M, SparseGPT, Wanda, and structured pruning."""
