"""Tensor I/O: where the tensors of a checkpoint are, reading one, and writing tensors as a stream."""
