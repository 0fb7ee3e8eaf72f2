"""Pure quantization math: NF4 (and later GPTQ, AWQ, packing) and the quantized nn.Modules."""
