"""Triton kernels, each with a plain-torch reference twin and a dispatcher (Triton on CUDA,
the twin elsewhere). Not written yet: until then `quant/` modules compute in plain torch."""
