"""Can the two cohorts read each other's state? Checked before any partition moves (I4).

Pure. A stateful member declares the state format it writes, the formats it reads and the
formats it can migrate from. A rollout may also declare migrations (``state_migrations`` in the
rollout file). On a rollback, stable members restore state the canary wrote; on a promotion,
canary members restore state stable wrote: both directions must work.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class FormatSupport:
    """What one member version can do with state formats."""

    version: str
    writes: int
    reads: frozenset[int]
    migrates: frozenset[int] = frozenset()
    #: The changelog record encoding (how stamps are stored, not the state's format) the
    #: member's library writes, and those it reads. A member that does not say writes and
    #: reads only encoding 1 (stamps in headers), the first one.
    encoding: int = 1
    encodings: frozenset[int] = frozenset({1})

    @classmethod
    def from_meta(cls, version: str, meta: Mapping[str, Any]) -> FormatSupport | None:
        f = meta.get("state_formats")
        if not f:
            return None
        enc = f.get("encoding") or {}
        return cls(
            version,
            int(f["writes"]),
            frozenset(int(x) for x in f.get("reads", [f["writes"]])),
            frozenset(int(x) for x in f.get("migrates", [])),
            int(enc.get("writes", 1)),
            frozenset(int(x) for x in enc.get("reads", [enc.get("writes", 1)])),
        )

    def can_read(self, fmt: int, rollout_migrations: Iterable[tuple[int, int]] = ()) -> bool:
        if fmt in self.reads or fmt in self.migrates:
            return True
        return any(src == fmt and dst in self.reads for src, dst in rollout_migrations)


def state_format_problems(
    stable: Iterable[FormatSupport],
    canary: Iterable[FormatSupport],
    rollout_migrations: Iterable[tuple[int, int]] = (),
) -> list[str]:
    """Why the cohorts cannot hand state to each other; empty when they can."""
    migrations = list(rollout_migrations)
    problems: list[str] = []
    stable, canary = list(stable), list(canary)
    for c in canary:
        for s in stable:
            for reader, writer, role in ((s, c, "a rollback"), (c, s, "a promotion")):
                if writer.encoding not in reader.encodings:
                    problems.append(
                        f"version {reader.version} cannot read changelog encoding "
                        f"{writer.encoding} that version {writer.version} writes (it reads "
                        f"{sorted(reader.encodings)}): {role} would lose state; run both "
                        "versions on a pubsub-canary library that reads both encodings"
                    )
            if not s.can_read(c.writes, migrations):
                problems.append(
                    f"stable version {s.version} cannot read state format {c.writes} that canary "
                    f"version {c.version} writes (it reads {sorted(s.reads)}): a rollback would "
                    f"lose state; add a migration from format {c.writes} to one of "
                    f"{sorted(s.reads)} in the rollout's state_migrations"
                )
            if not c.can_read(s.writes, migrations):
                problems.append(
                    f"canary version {c.version} cannot read state format {s.writes} that "
                    f"stable version {s.version} writes (it reads {sorted(c.reads)}): a promotion "
                    "would lose state"
                )
    return sorted(set(problems))
