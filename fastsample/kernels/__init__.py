"""Fused kernels (Triton) beside their pure-torch twins; `dispatch` picks one per call."""
