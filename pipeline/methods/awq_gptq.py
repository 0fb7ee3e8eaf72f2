"""AWQ+GPTQ: AWQ's scales and clipping, then GPTQ's solve on the scaled weights (GPTQ format)."""
from __future__ import annotations

from qlora_pipeline.methods import awq, gptq

quantizer = gptq.quantizer
transform = awq.transform
