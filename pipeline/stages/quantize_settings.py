"""The recipe-side rules of the `quantize-<name>` stages, without torch.

`build_stages` (and so `validate`, `plan`, `status`) needs them to check a recipe and to
fingerprint the quantize stages; `pipeline.stages.quantize`, which does the work, imports
them from here.
"""
from __future__ import annotations

import math

from qlora_pipeline.errors import InputError

METHODS = ("rtn", "gptq", "awq", "awq+gptq")


def values_per_word_run(bits: int) -> int:
    """Rows that fill whole int32 words: 8 for 4-bit, 16 for 2-bit, 4 for 8-bit, 32 for 3-bit."""
    return 32 // math.gcd(bits, 32)


def divisors_hint(n: int, bits: int) -> list[int]:
    pf = values_per_word_run(bits)
    return [d for d in range(8, n + 1) if n % d == 0 and d % pf == 0]


def check_shapes(entry, config: dict, key: str) -> None:
    """A group size that does not divide a layer's input size is a recipe error."""
    sizes = {"hidden_size": int(config["hidden_size"]), "intermediate_size": int(config["intermediate_size"])}
    pf = values_per_word_run(entry.bits)
    for what, n in sizes.items():
        if entry.group_size != -1 and n % entry.group_size:
            common = [d for d in divisors_hint(sizes["hidden_size"], entry.bits) if sizes["intermediate_size"] % d == 0]
            raise InputError(f"{key}.group_size: {entry.group_size} does not divide the model's {what} {n}; "
                             f"group sizes that work: {', '.join(map(str, common[:12]))} or -1")
        if n % pf:
            raise InputError(f"{key}.bits: {entry.bits}-bit packing needs sizes divisible by {pf}; {what} is {n}")
    if entry.method == "awq":
        heads = int(config.get("num_attention_heads", 1))
        head_dim = int(config.get("head_dim") or sizes["hidden_size"] // heads)
        kv = int(config.get("num_key_value_heads", heads)) * head_dim
        for what, n in {**sizes, "key/value size": kv}.items():
            if n % 8:
                raise InputError(f"{key}.method: the AWQ GEMM layout packs 8 output columns per word; "
                                 f"the model's {what} is {n}; use method: gptq")


def relevant_settings(q) -> dict:
    """The entry's settings that change this method's output (its stage fingerprint): AWQ's
    options do not concern rtn or gptq entries."""
    entry = q.model_dump(mode="json")
    if not q.method.startswith("awq"):
        entry.pop("awq")
    return entry
