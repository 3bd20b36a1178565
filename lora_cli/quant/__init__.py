"""Quantized checkpoints seen as their logical tensors: one module per format, a detector and a plain registry.

`logical_index(index)` turns a checkpoint whose config.json names a `quantization_config` into the checkpoint the
rest of loractl expects: each quantized weight becomes one `QuantizedTensor` (its `.weight` name, logical shape,
dequantized dtype) that knows its stored parts and how the format's own library dequantizes them; the auxiliary
tensors (scales, zero points, quant states) are consumed. Untouched plain tensors stay `TensorInfo`s.
"""
