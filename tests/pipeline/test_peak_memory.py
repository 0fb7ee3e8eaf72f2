"""The CPU peak-memory figure of an evaluation is what the measured block needs, not what the
heap happens to hold from earlier work in the process."""
from __future__ import annotations

import pytest

from qlora_pipeline.stages import evaluate

MB = 1 << 20
PIECES = 100_000  # 1 KiB each: malloc's heap, not mmap, not Python's small-object allocator


def _touch_pieces() -> list[bytes]:
    return [bytes([i % 251]) * 1024 for i in range(PIECES)]


@pytest.mark.skipif(evaluate._LIBC is None, reason="glibc's malloc_trim is not available here")
def test_memory_freed_before_the_block_does_not_hide_the_block_s_own():
    """100 MB of small allocations freed before the block, with one kept above them so the heap
    cannot shrink by itself: the block allocating the same again must still read about 100 MB
    (without handing the freed heap back it reads almost nothing: it reuses those pages)."""
    earlier = _touch_pieces()
    pin = [bytes(1024) for _ in range(16)]  # above the freed pieces: the heap's top stays in use
    del earlier
    with evaluate.PeakMemory("cpu") as memory:
        block = _touch_pieces()
    assert memory.peak > 0.8 * PIECES * 1024, f"{memory.peak / MB:.1f} MB"
    del block, pin
