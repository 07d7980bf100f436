"""Triton kernels of the HART ops.

Importing anything here imports triton: only `diffusers_hart.ops` does so, lazily, after
`diffusers_hart.ops.dispatch.use_fused` said the fused path applies.
"""
