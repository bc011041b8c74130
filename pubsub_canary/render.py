"""Human-readable rendering of rollout status for the terminal."""

from __future__ import annotations

import time
from typing import Any


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.2%}"


def _secs(x: float | None) -> str:
    return "-" if x is None else f"{x * 1000:.1f}ms"


def unit_ranges(units: list[int]) -> str:
    """``[0, 1, 2, 3, 7, 9, 10]`` -> ``"0-3,7,9-10"`` (a Pub/Sub group has hundreds of units)."""
    spans: list[list[int]] = []  # [first, last] of each run of consecutive units
    for u in sorted(units):
        if spans and u == spans[-1][1] + 1:
            spans[-1][1] = u
        else:
            spans.append([u, u])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def render_status(s: dict[str, Any]) -> str:
    lines = [
        f"rollout {s['name']}  group {s['group']}",
        f"  phase {s['phase']}  step {s['step']}/{s['steps']}  canary share {s['share']:g}%"
        f"  ({s['stable_version']} -> {s['canary_version']})",
    ]
    if s.get("reason"):
        lines.append(f"  reason: {s['reason']}")
    if s.get("rollback_seconds") is not None:
        lines.append(f"  rollback took {s['rollback_seconds']:.2f}s after the decision")
    lines.append("  cohort   members units  processed  error rate  DLQ rate  p99        lag")
    for name in ("stable", "canary"):
        c = s["cohorts"][name]
        h = c["step"]
        lines.append(
            f"  {name:<8} {c['members']:>7} {c['units']:>5} {h['processed']:>10}  "
            f"{_pct(h['error_rate']):>10}  {_pct(h['dead_letter_rate']):>8}  "
            f"{_secs(h['latency_p99_seconds']):>9}  {h['lag'] if h['lag'] is not None else '-':>5}"
        )
    lines.append("  members:")
    for m in s["members"]:
        units = f"{unit_ranges(m['units'])} ({len(m['units'])})" if m["units"] else "idle"
        line = f"    {m['member_id']:<22} {m['cohort']:<7} v{m['version']:<8} units {units}"
        if m.get("standby"):  # kept warm for a rollback (stateful groups)
            line += "  standby " + unit_ranges(m["standby"])
        lines.append(line)
    j = s.get("judgement")
    if j:
        lines.append(f"  analysis: {j['verdict']} - {j['reason']}")
        for m in j["metrics"]:
            lines.append(f"    {m['metric']:<22} {m['verdict']:<12} {m['reason']}")
    if s.get("decisions"):
        lines.append("  decisions:")
        for d in s["decisions"][-8:]:
            at = time.strftime("%H:%M:%S", time.localtime(d["at"]))
            lines.append(f"    {at} {d['kind']:<11} {d['reason']}")
    return "\n".join(lines)


def render_list(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no rollouts"
    out = [f"{'NAME':<24} {'GROUP':<36} {'PHASE':<18} {'STEP':<6} SHARE"]
    for r in rows:
        out.append(
            f"{r['name']:<24} {r['group']:<36} {r['phase']:<18} "
            f"{r['step']}/{r['steps']:<4} {r['share']:g}%"
        )
    return "\n".join(out)
