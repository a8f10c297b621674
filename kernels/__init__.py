"""Fused ops, one file each: the Triton kernels (when present), the autograd Function, and
the pure-PyTorch reference they are tested against. Installed as `epg_fast.kernels`.

The model never imports from here directly: `epg_fast.ops` picks the path once.
"""
