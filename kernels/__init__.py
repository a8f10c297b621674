"""Fused ops, one file each: the Triton kernels, the autograd Function, and the pure-PyTorch
reference they are tested against. Installed as `epg_fast.kernels`.

The model never imports from here directly: its `epg_fast.ops.Ops` picks the path per call.
"""
