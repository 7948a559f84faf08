"""One rank's bad-sample fraction over the samples it read, and the stop once it passes
``data.max_bad_fraction``."""

from __future__ import annotations

from typing import Any


class BadSampleGuard:
    """Totals one rank's reads and skipped samples from its batches; raises once the bad fraction passes the
    limit.

    The fraction is skipped / read over the samples this rank's loader workers read (``batch["read"]``: each
    sample once per epoch, the shuffle buffer's read-ahead included, re-reads in the same epoch not), so
    numerator and denominator count the same reads. It is judged only after ``min_samples`` reads, so one bad
    sample in the first batch does not stop a run. A batch without "read" (not made by ``ShardDataset``)
    counts its delivered and skipped samples as its reads.
    """

    def __init__(self, max_bad_fraction: float | None = 0.01, min_samples: int = 1000, rank: int = 0) -> None:
        if max_bad_fraction is not None and not 0 <= max_bad_fraction <= 1:
            raise ValueError(f"max_bad_fraction must be in [0, 1] or null, got {max_bad_fraction}")
        self.max_bad_fraction = max_bad_fraction
        self.min_samples = min_samples
        self.rank = rank
        self.read = 0
        self.delivered = 0
        self.reasons: dict[str, int] = {}
        self.shards: dict[str, dict[str, int]] = {}

    @property
    def bad(self) -> int:
        return sum(self.reasons.values())

    @property
    def fraction(self) -> float:
        return self.bad / self.read if self.read else 0.0

    def update(self, batch: dict[str, Any]) -> None:
        delivered = len(batch["__key__"])
        skipped = {reason: int(n) for reason, n in batch.get("skipped", {}).items()}
        self.delivered += delivered
        self.read += int(batch["read"]) if "read" in batch else delivered + sum(skipped.values())
        for reason, n in skipped.items():
            self.reasons[reason] = self.reasons.get(reason, 0) + n
        for shard, reasons in batch.get("skipped_shards", {}).items():
            mine = self.shards.setdefault(shard, {})
            for reason, n in reasons.items():
                mine[reason] = mine.get(reason, 0) + int(n)

    def worst(self, k: int = 3) -> list[tuple[str, dict[str, int]]]:
        return sorted(self.shards.items(), key=lambda item: -sum(item[1].values()))[:k]

    def check(self) -> None:
        limit = self.max_bad_fraction
        if limit is None or self.read < self.min_samples or self.fraction <= limit:
            return
        worst = "; ".join(
            f"{shard} ({sum(r.values())}: {', '.join(f'{k} {n}' for k, n in sorted(r.items()))})"
            for shard, r in self.worst()
        )
        raise RuntimeError(
            f"{self.fraction:.2%} of the {self.read} samples read on rank {self.rank} were bad, "
            f"over data.max_bad_fraction={limit}: worst shards {worst or '(none named)'}; fix or drop them, "
            f"or raise data.max_bad_fraction (null turns the check off)"
        )

    def state(self) -> dict[str, Any]:
        """The running totals, for checkpoints (a resumed run's fraction and report cover the whole run)."""
        return {
            "read": self.read,
            "delivered": self.delivered,
            "reasons": dict(self.reasons),
            "shards": {k: dict(v) for k, v in self.shards.items()},
        }

    def load(self, state: dict[str, Any]) -> None:
        self.read, self.delivered = int(state["read"]), int(state["delivered"])
        self.reasons = {k: int(v) for k, v in state["reasons"].items()}
        self.shards = {k: {r: int(n) for r, n in v.items()} for k, v in state["shards"].items()}

    def summary(self) -> dict[str, Any]:
        return {
            "samples_read": self.read,
            "skipped": self.bad,
            "delivered": self.delivered,
            "bad_fraction": self.fraction,
            "max_bad_fraction": self.max_bad_fraction,
            "reasons": dict(sorted(self.reasons.items())),
            "shards": dict(self.worst(len(self.shards))),
        }
