"""Where a text shares a stretch of at least `min_chars` characters with a reference text.

The decontamination criterion (`pipeline.data`): no substring of the held-out text of
`min_chars` characters or more may appear in the training side (both normalized). Searching
for the held-out paragraphs alone misses a copy of *part* of one: a long one-line paragraph
(a JSON Lines record, a Markdown paragraph) quoted with its last words edited, or split
between two training documents mid-word; this finds every such stretch, whatever it begins
or ends inside.

How: with k = ceil(min_chars / 2) and s = min_chars - k + 1, the reference's k-grams at
positions 0, s, 2s, ... are indexed. A shared stretch of L >= min_chars = k + s - 1 characters
holds L - k + 1 >= s consecutive start positions of the reference, so one of them is sampled:
every k-gram of the text found in the index is a candidate (hashed in numpy a block at a time,
then compared as strings), and each candidate is grown to its maximal shared stretch by
comparing slices, left and right. One stretch per diagonal (text position - reference
position) is grown once, however many of its k-grams are sampled.

Where a held-out passage was copied, the characters around the copy often match those around
the original by chance (a closing period, a "The" that starts both next lines), and belong to
the training text's own neighbouring words and lines. So a stretch is trimmed, each time only
when what is left still has `min_chars` characters: of a piece shorter than `min_chars` at
either end of a line of the reference that it holds only part of, once it runs over that
line's break (`line_starts`), then of a part of a word at either end that is part of a word in
both texts.

A k-gram repeated more than `_MAX_POSITIONS` times in the reference (a separator line,
boilerplate) is indexed at its first `_MAX_POSITIONS` positions, so that a text of one repeated
line costs no more than a text of 64 of them; the k-grams r = floor(s / 2) characters before and
after each of its copies are indexed too: a stretch of `min_chars` holds one of them (it holds a
sampled k-gram and s - 1 more characters, at least r of them on one side). So a stretch through
a later copy is found unless those neighbours are themselves repeated more than
`_MAX_POSITIONS` times (boilerplate of k + 2r characters and more, repeated as often).
"""
from __future__ import annotations

from bisect import bisect_left, bisect_right

import numpy as np

_BASE = np.uint64(0x100000001B3)  # an odd multiplier: the polynomial hash is taken mod 2**64
_BLOCK = 1 << 21  # text positions hashed per block: 16 MiB of uint64 per array
_MAX_POSITIONS = 64


def _codes(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)


def _hashes(codes: np.ndarray, starts: np.ndarray | slice, k: int) -> np.ndarray:
    """The hash of the k characters from each start (an index array, or a slice of length
    len(codes) - k + 1 for every position)."""
    if isinstance(starts, slice):
        n = len(codes) - k + 1
        h = np.zeros(n, dtype=np.uint64)
        for j in range(k):
            h *= _BASE
            h += codes[j : j + n]
        return h
    h = np.zeros(len(starts), dtype=np.uint64)
    for j in range(k):
        h *= _BASE
        h += codes[starts + j]
    return h


def prefix_hashes(strings: list[str], k: int) -> list[int]:
    """The hash `hashed_hits` gives a position, of the first `k` characters of each string
    (each at least `k` long)."""
    codes = _codes("".join(s[:k] for s in strings))
    return _hashes(codes, np.arange(0, len(codes), k), k).tolist()


def hashed_hits(text: str, k: int, wanted: np.ndarray):
    """(position, hash) of every position of `text` whose next `k` characters hash (`_hashes`)
    to one of `wanted` (sorted, unique uint64), in order; hashed a block at a time."""
    if not len(wanted):
        return
    for block in range(0, len(text) - k + 1, _BLOCK):
        h = _hashes(_codes(text[block : block + _BLOCK + k - 1]), slice(None), k)
        at = np.minimum(np.searchsorted(wanted, h), len(wanted) - 1)
        hits = np.flatnonzero(wanted[at] == h)
        yield from zip((hits + block).tolist(), h[hits].tolist())


def _common_run(a: str, i: int, b: str, j: int, forward: bool) -> int:
    """Length of the common prefix of a[i:] and b[j:] (`forward`), or of the common suffix of
    a[:i] and b[:j], by comparing slices of doubling length (a stretch of n characters costs
    O(log n) comparisons, each in C)."""
    limit = min(len(a) - i, len(b) - j) if forward else min(i, j)

    def next_same(done: int, m: int) -> bool:  # the m characters beyond the `done` matched ones
        if forward:
            return a[i + done : i + done + m] == b[j + done : j + done + m]
        return a[i - done - m : i - done] == b[j - done - m : j - done]

    length, step = 0, 32
    while length < limit:
        m = min(step, limit - length)
        if next_same(length, m):
            length += m
            step *= 2
        elif m == 1:
            break
        else:
            step = m // 2
    return length


class SharedText:
    """A reference text (the held-out side, normalized), indexed for `spans`."""

    def __init__(self, reference: str, min_chars: int, line_starts: list[int] = ()):
        """`line_starts`: where in `reference` each line starts, sorted (each is 0 or follows
        the character that joins it to the line before, if any)."""
        if min_chars < 1:
            raise ValueError(f"min_chars must be at least 1, not {min_chars}")
        self.reference = reference
        self.min_chars = min_chars
        self._starts = list(line_starts)
        self.k = (min_chars + 1) // 2
        step = min_chars - self.k + 1
        self._positions: dict[str, list[int]] = {}
        if len(reference) < self.k:
            self._hashes = np.zeros(0, dtype=np.uint64)
            return
        sampled = np.arange(0, len(reference) - self.k + 1, step)
        everywhere: dict[str, list[int]] = {}
        for p in sampled.tolist():
            everywhere.setdefault(reference[p : p + self.k], []).append(p)
        # A shared stretch holds a sampled k-gram and, beside it, `reach` more characters on one
        # side at least: the k-grams that far either side of each copy of a repeated one stand
        # for it (where the repeated piece is boilerplate, they hold what follows or precedes it).
        reach = (min_chars - self.k + 1) // 2
        neighbours = [q for gram, ps in everywhere.items() if len(ps) > _MAX_POSITIONS and reach
                      for p in ps for q in (p - reach, p + reach) if 0 <= q <= len(reference) - self.k]
        starts = np.unique(np.concatenate([sampled, np.array(neighbours, dtype=sampled.dtype)]))
        for p in starts.tolist():
            found = self._positions.setdefault(reference[p : p + self.k], [])
            if len(found) < _MAX_POSITIONS:
                found.append(p)
        self._hashes = np.unique(_hashes(_codes(reference), starts, self.k))

    def spans(self, text: str, trim: bool = True) -> list[tuple[int, int]]:
        """(start, end) in `text`, in order, of every maximal stretch of at least `min_chars`
        characters that the reference also holds (stretches can overlap one another where
        the reference holds two that overlap in `text`); with `trim`, without the chance
        matches at their edges (the module's docstring): what is cut, where untrimmed is
        what is shared."""
        k, ref = self.k, self.reference
        found: list[tuple[int, int]] = []
        if len(text) < self.min_chars or not len(self._hashes):
            return found
        grown: dict[int, int] = {}  # diagonal (text position - reference position) -> end grown to
        for q, _ in hashed_hits(text, k, self._hashes):
            for p in self._positions.get(text[q : q + k], ()):
                diagonal = q - p
                if grown.get(diagonal, -1) > q:
                    continue  # inside a stretch already grown on this diagonal
                left = _common_run(text, q, ref, p, forward=False)
                end = q + k + _common_run(text, q + k, ref, p + k, forward=True)
                grown[diagonal] = end
                if end - (q - left) >= self.min_chars and not trim:
                    found.append((q - left, end))
                elif end - (q - left) >= self.min_chars:
                    a, b = self._trimmed(p - left, end - diagonal)
                    found.append(self._whole_words(text, a + diagonal, b + diagonal, diagonal))
        return sorted(set(found))

    def _whole_words(self, text: str, start: int, end: int, diagonal: int) -> tuple[int, int]:
        """Text stretch [start, end) (reference stretch [start - diagonal, end - diagonal))
        without a part of a word at either end that is part of a word in the reference too
        (a word's ending both texts share by chance; not a copy that starts a word there, say
        inside brackets), when the rest is still `min_chars` long."""
        def inside_word(s: str, i: int) -> bool:  # s[i - 1] and s[i] are one word's
            return 0 < i < len(s) and s[i - 1] not in " \n" and s[i] not in " \n"

        ref = self.reference
        a, b = start, end
        if inside_word(text, a) and inside_word(ref, a - diagonal):
            a = text.find(" ", a, b) + 1 or a
        if inside_word(text, b) and inside_word(ref, b - diagonal):
            b = max(text.rfind(" ", a, b), a)
        return (a, b) if b - a >= self.min_chars else (start, end)

    def _trimmed(self, start: int, end: int) -> tuple[int, int]:
        """Reference stretch [start, end) without a short piece of a line it holds only the
        end of (left) or the start of (right), when the rest is still `min_chars` long. (The
        character joining two lines, a space, may stay at an end: no original character
        stands behind it.)"""
        starts = self._starts
        i, j = bisect_right(starts, start), bisect_left(starts, end)  # starts[i:j]: breaks inside
        if i >= j:
            return start, end
        a, b = start, end
        if starts[i] - start < self.min_chars and not (i > 0 and starts[i - 1] == start):
            a = starts[i]  # the end of the line before, without its start
        line_end = starts[j] - 1 if j < len(starts) else len(self.reference)
        if end - starts[j - 1] < self.min_chars and end < line_end:
            b = starts[j - 1]  # the start of the last line, without its end
        return (a, b) if b - a >= self.min_chars else (start, end)
