"""Triton kernels of vllm-dwdp, installed as ``vllm_dwdp_kernels``.

Each op has a launcher module with its formula, shape checks and a pure-torch reference
(``<op>_reference``), and its ``@triton.jit`` code under ``triton/``.
"""
