"""The project's logic takes `now` from the clock its entry point built (flywheel/clock.py); only the places
listed here read the wall clock, each for a stated reason. A new wall-time read elsewhere in flywheel/,
flows/ or tasks/ fails this test: move it onto the project clock, or add it here with its reason."""

from __future__ import annotations

import ast
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).parents[2]

# file -> (how many wall-time reads, why they stay on the wall clock)
ALLOWED: dict[str, tuple[int, str]] = {
    "flywheel/clock.py": (2, "the wall clock itself"),
    "flywheel/cli.py": (1, "HMAC signature timestamp of `flywheel webhook sign`"),
    "flywheel/notify.py": (2, "HMAC signature timestamp; the HTTP delivery's record"),
    "flows/demo.py": (4, "Prefect's run times; the webhook's HMAC signature and its wall latency"),
    "tasks/triggers.py": (1, "the Prefect event's `occurred` (the project time is in its payload)"),
    "tasks/monitor.py": (1, "MLflow's metric record time"),
    "tasks/evaluate.py": (1, "MLflow's metric record time"),
    "tasks/train.py": (1, "MLflow's metric record time"),
    "flywheel/locks.py": (4, "rollout lock leases: machinery between processes"),
    "flywheel/version_claims.py": (1, "version claim leases: machinery between processes"),
    "flywheel/challenger_queue.py": (1, "compares a lock lease (wall) when no `now` is given"),
    "flywheel/outbox.py": (1, "event outbox back-off (Prefect's events)"),
    "flywheel/trigger_decisions.py": (2, "recorded_at (wall beside the project `at`); emitted_at (Prefect)"),
    "flywheel/serving.py": (3, "the service's own status: load and reload times, error reports"),
    "flywheel/predictionlog.py": (1, "the routing policy's updated_at, shown only"),
    "flywheel/rollout_controls.py": (1, "a supersede request's time, shown only"),
    "flywheel/migrations.py": (1, "when a schema upgrade ran"),
    "flywheel/validation.py": (1, "the quarantine report's time, for people"),
    "flywheel/compaction.py": (1, "compaction bookkeeping (its cutoffs take `now`)"),
    "flywheel/monitoring/profile.py": (1, "the reference profile's created_at metadata"),
    "flywheel/featurestore.py": (2, "a library default for direct calls (the flows pass the project time); "
                                    "materialization bookkeeping"),
    "flywheel/outcomes.py": (1, "a library default for direct calls (the entry points pass the project time)"),
    "flywheel/loopcontrol.py": (1, "a library default for direct calls (the CLI passes the project time)"),
}


def is_wall_read(node: ast.AST) -> bool:
    """`datetime.now(...)`, `datetime.utcnow()`, `time.time()` or `wall_now()` (docstrings and comments don't count)."""
    if not isinstance(node, ast.Call):
        return False
    f = node.func
    if isinstance(f, ast.Name):
        return f.id == "wall_now"
    return isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and (
        (f.value.id == "datetime" and f.attr in ("now", "utcnow")) or (f.value.id == "time" and f.attr == "time"))


def wall_reads() -> Counter[str]:
    found: Counter[str] = Counter()
    for folder in ("flywheel", "flows", "tasks"):
        for path in (ROOT / folder).rglob("*.py"):
            n = sum(is_wall_read(node) for node in ast.walk(ast.parse(path.read_text())))
            if n:
                found[path.relative_to(ROOT).as_posix()] = n
    return found


def test_only_the_listed_places_read_the_wall_clock() -> None:
    found = wall_reads()
    unexpected = {f: n for f, n in found.items() if f not in ALLOWED}
    assert not unexpected, (f"wall-clock reads in the project's logic: {unexpected}; take `now` from the project "
                            "clock the entry point built (flywheel/clock.py), or list the place in ALLOWED with why")
    grown = {f: (n, ALLOWED[f][0]) for f, n in found.items() if n > ALLOWED[f][0]}
    assert not grown, f"more wall-clock reads than listed (found, allowed): {grown}"


def test_the_guard_sees_each_form_of_a_wall_read_and_not_a_docstring() -> None:
    code = '''"""Logic never calls `datetime.now()` itself."""
a = datetime.now(UTC)
b = datetime.utcnow()
c = int(time.time())
d = wall_now()
e = clock.now()  # the project clock: not a wall read
'''
    assert sum(is_wall_read(n) for n in ast.walk(ast.parse(code))) == 4
