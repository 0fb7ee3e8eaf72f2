"""Replaying a decoder layer's finished modules from their captured inputs.

GPTQ's true-sequential passes run a layer once per group of linears (each group's Hessian is
taken after the groups before it are quantized) and once more for the next layer's inputs.
Most of that work recomputes modules whose linears are all quantized already: the attention
while the MLP's groups are captured, the attention and the MLP again for the layer's output.
A family's `Replay` modules end with one linear (attention: `o_proj`, MLP: `down_proj`);
the pass that captures that linear's Hessian sees its input after every earlier linear of
the module is quantized, which is exactly the input every later pass would compute again. So
the engine keeps those inputs, chunk by chunk, and once the last linear is quantized the
module is replaced by that linear applied to them: the same operation on the same tensors,
so the layer's outputs are the same bytes, for a fraction of the work (measured in
`scripts/bench_quantize_floor.py`).

The inputs cost memory (windows x tokens x the linear's input width); a module is replayed
only when they fit in a quarter of the memory available, on the device the layer computes on,
when its capture starts (the MLP's 14336-wide input at the llama3 recipe's 256 x 2048 windows
would be 28 GiB: not replayed).
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator, Optional

import torch
from torch import nn

from qlora_pipeline.layerwise.families import Family, Replay
from qlora_pipeline.layerwise.placement import host_available_bytes


def available_memory_bytes(device: torch.device = torch.device("cpu")) -> int:
    """Free memory of `device`: the GPU's free memory on CUDA; MemAvailable on Linux; else the
    free physical pages."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    available = host_available_bytes()
    if available is not None:
        return available
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


class LayerReplays:
    """The replayable modules of one decoder layer: which inputs to keep, and the stand-ins.

    The engine tells it which linears are quantized (`quantized`), asks which of a pass's
    linears to capture (`capture_for`), hands it each chunk's input (`keep`), and runs the
    layer inside `installed(chunk_index)`, where every module whose last linear is quantized
    and whose inputs were all kept is replaced by that linear applied to the kept chunk.
    """

    def __init__(self, layer: nn.Module, family: Family, n_chunks: int, rows: int):
        self.layer = layer
        self.family = family
        self.n_chunks = n_chunks
        self.rows = rows  # windows x tokens of the calibration set
        self.quantized: set[str] = set()
        self.kept: dict[str, list[torch.Tensor]] = {}

    def _ready_to_capture(self, replay: Replay) -> bool:
        """The last linear's input is final once every other linear of the module is quantized."""
        others = [lin for lin in self.family.linears
                  if lin.startswith(replay.module + ".") and lin != replay.last_linear]
        return all(lin in self.quantized for lin in others) and replay.last_linear not in self.quantized

    def capture_for(self, linears: list[str]) -> set[str]:
        """Of `linears` (the first linears of a pass's groups), those whose inputs to keep."""
        wanted = set()
        # kept where the layer computes (its inputs arrive there)
        budget = available_memory_bytes(next(self.layer.parameters()).device) // 4
        for replay in self.family.replays:
            if replay.last_linear not in linears or not self._ready_to_capture(replay):
                continue
            width = self.layer.get_submodule(replay.last_linear).in_features
            need = self.rows * width * 4
            if need <= budget:
                wanted.add(replay.last_linear)
                budget -= need
        for linear in wanted:
            self.kept[linear] = []
        return wanted

    def keep(self, linear: str, x: torch.Tensor) -> None:
        self.kept[linear].append(x.detach())

    def _active(self) -> list[Replay]:
        return [r for r in self.family.replays
                if r.last_linear in self.quantized and len(self.kept.get(r.last_linear, ())) == self.n_chunks]

    @contextlib.contextmanager
    def installed(self, chunk_index: int) -> Iterator[None]:
        """Within the block, each finished module computes its last linear on its kept input
        of chunk `chunk_index` instead of running."""
        replaced: list[nn.Module] = []
        try:
            for replay in self._active():
                module = self.layer.get_submodule(replay.module)
                module.forward = _stand_in(self.layer.get_submodule(replay.last_linear),
                                           self.kept[replay.last_linear][chunk_index], replay.returns_tuple)
                replaced.append(module)
            yield
        finally:
            for module in replaced:
                del module.forward  # the instance attribute: the class's forward again


def _stand_in(linear: nn.Module, x: torch.Tensor, returns_tuple: bool):
    def forward(*args, **kwargs):
        y = linear(x)
        return (y, None) if returns_tuple else y
    return forward


@contextlib.contextmanager
def nothing_installed(chunk_index: int) -> Iterator[None]:
    yield


def installer(replays: Optional[LayerReplays]):
    return replays.installed if replays is not None else nothing_installed
