"""Pure quantization math on tensors: NF4 (bitsandbytes layout), GPTQ, AWQ's searches, and the
GPTQ / AWQ GEMM packing. Imports no other package of the project (tests/test_structure.py)."""
