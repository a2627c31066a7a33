"""The retention flow (deployment `retention`, daily on `retention.cron`): keep the growing stores bounded.

cut-offs (settings, raised to what monitoring still reads) -> prediction log purge -> monitoring history purge ->
offline compaction (a finished month's per-batch files become one file per table) -> a summary artifact.
The audit log, the trigger decisions and the outcomes are never touched; no offline row is ever deleted.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Literal

from prefect import flow
from pydantic import BaseModel, Field

from flywheel.compaction import CompactionReport
from flywheel.retention import Cutoff, Purge, cutoff
from tasks.retention import (
    compact_offline_store,
    publish_retention_summary,
    purge_monitoring_history,
    purge_prediction_log,
    retention_floor,
)


class RetentionParams(BaseModel):
    """What the Prefect UI shows as the run form."""

    now: datetime | None = Field(None, description="Apply the policy as of this time (default: the project's clock)")
    profile: Literal["local", "ci", "production"] | None = Field(None, description="Settings profile")
    config_dir: str | None = Field(None, description="Folder holding base.yaml (default: ./configs)")


class RetentionResult(BaseModel):
    prediction_log: Cutoff
    monitoring_history: Cutoff
    purged: list[Purge]
    compaction: CompactionReport | None  # None: compaction is off (retention.compact_after_days: null)

    def markdown(self) -> str:
        rows = [f"| {p.table} | {p.before:%Y-%m-%d %H:%M} | {p.deleted} | {p.kept} |" for p in self.purged]
        out = ["## Retention", "", "| table | deleted before | deleted | kept |", "|---|---|---:|---:|", *rows]
        for name, cut in (("prediction log", self.prediction_log), ("monitoring history", self.monitoring_history)):
            if cut.raised:
                out.append(f"\n{name}: kept {cut.days:.0f} days, not the configured {cut.configured_days:.0f}: "
                           "the monitoring policy's performance lookback reads them")
        c = self.compaction
        if c is not None:
            out += ["", f"Offline store {c.dataset}: {len(c.months)} month(s) compacted, part files "
                    f"{c.files_before} -> {c.files_after}, {c.bytes_before:,} -> {c.bytes_after:,} bytes"]
        return "\n".join(out) + "\n"


@flow(name="retention", log_prints=True)
def retention(params: RetentionParams | None = None) -> RetentionResult:
    """Cut-offs -> purge the prediction log -> purge the monitoring history -> compact the offline store."""
    from flywheel.clock import build_clock
    from flywheel.runtime import start_run_context

    params = params or RetentionParams()
    ctx = start_run_context(params.profile, params.config_dir)
    settings, keep = ctx.settings, ctx.settings.retention
    now = params.now or build_clock(settings.clock).now()
    floor = retention_floor(settings.resolve(settings.monitor.policy_file), ctx.dataset)
    log_cut = cutoff(now, keep.prediction_log_days, floor)
    history_cut = cutoff(now, keep.monitoring_history_days, floor)
    purged = purge_prediction_log(settings.store_url(settings.serve.prediction_log_url), log_cut)
    purged += purge_monitoring_history(ctx.audit_db_url, history_cut)
    compaction = None
    if keep.compact_after_days is not None:
        compaction = compact_offline_store(ctx.dataset, ctx.offline_dir,
                                           now.astimezone(UTC) - timedelta(days=keep.compact_after_days))
    result = RetentionResult(prediction_log=log_cut, monitoring_history=history_cut, purged=purged,
                             compaction=compaction)
    publish_retention_summary(result.markdown())
    print(result.markdown())
    return result
