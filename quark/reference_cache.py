"""The frozen reference model's logits per trained sample, kept between training steps.

Best-quantile training draws each pooled sample several times (an epoch over the best
quantile every few steps), and the reference model never changes: its logits for a sample
are the same every time. Recomputing them was a forward of the reference model per step, a
quarter of a step's compute. The cache keeps them, least recently used first out, within a
byte budget; a sample's logits are stored only at its completion positions (the ones the KL
term reads), so a 20-token completion over SmolLM2's vocabulary costs 3.9 MB in float32.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence

import torch


class ReferenceCache:
    """Completion-position logits of the reference model per sample key, LRU within
    ``max_bytes`` (0: nothing is kept, every batch is computed)."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._rows: OrderedDict[Hashable, torch.Tensor] = OrderedDict()

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def hit_rate(self) -> float:
        """Share of the rows asked for so far that came from the cache."""
        return self.hits / max(self.hits + self.misses, 1)

    def logits(
        self,
        keys: Sequence[Hashable],
        label_mask: torch.Tensor,
        compute: Callable[[list[int]], torch.Tensor],
    ) -> torch.Tensor:
        """The reference logits of a batch, [B, T, V], from the cache where it has them.

        keys:       one per row; rows with equal keys have equal reference inputs.
        label_mask: [B, T], 1 at the completion positions (the only ones returned filled;
                    the rest are 0, and the KL term masks them out).
        compute:    runs the reference on the given row indices -> [len(rows), T, V].
        """
        found = [self._get(key) for key in keys]
        missing = [i for i, rows in enumerate(found) if rows is None]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        if missing:
            fresh = compute(missing)  # [M, T, V]
            for j, i in enumerate(missing):
                rows = fresh[j][label_mask[i].bool()]  # [n_i, V], a copy
                self._put(keys[i], rows)
                found[i] = rows
        filled = [rows for rows in found if rows is not None]
        assert len(filled) == len(keys)
        out = filled[0].new_zeros(len(keys), label_mask.shape[1], filled[0].shape[-1])
        for i, rows in enumerate(filled):
            out[i, label_mask[i].bool()] = rows
        return out  # [B, T, V]

    def _get(self, key: Hashable) -> torch.Tensor | None:
        rows = self._rows.get(key)
        if rows is not None:
            self._rows.move_to_end(key)
        return rows

    def _put(self, key: Hashable, rows: torch.Tensor) -> None:
        size = rows.numel() * rows.element_size()
        if size > self.max_bytes or key in self._rows:
            return
        while self.bytes + size > self.max_bytes:
            _, evicted = self._rows.popitem(last=False)
            self.bytes -= evicted.numel() * evicted.element_size()
        self._rows[key] = rows
        self.bytes += size
