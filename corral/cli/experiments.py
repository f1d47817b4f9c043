"""corral experiment: fixed-split A/B tests with always-valid intervals and a sample-ratio check."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import click
from rich.table import Table
from rich.text import Text

from corral import names
from corral.cli.options import NEWEST_OR_NUMBER, State, endpoint_command
from corral.cli.output import (
    emit_message,
    emit_rows,
    enum_label,
    metric_label,
    out,
    traffic_text,
    version_label,
    with_interval,
)
from corral.client import parse_split
from corral.registry.v1 import registry_pb2 as reg
from corral.registry.v1 import rollouts_pb2 as pb
from corral.strategy import StrategyError, metric, parse_duration

PLOT_WIDTH = 31

_ID = click.option("--id", "experiment_id", default="-", type=NEWEST_OR_NUMBER,
                   help="Which experiment (default: the newest).")


@click.group()
def experiment() -> None:
    """A/B experiments: a fixed split between versions, measured with always-valid intervals."""


@endpoint_command(experiment.command("start"))
@click.option("--variants", required=True,
              help="VERSION=PERCENT,...; the first is the control, e.g. 2=80,3=20.")
@click.option("--until", "until", help="Run for this long, e.g. 30d.")
@click.option("--sessions", "max_sessions", type=int, default=0,
              help="Run until this many sessions.")
@click.option("--metric", "metrics", multiple=True,
              help="A metric to report, e.g. score:clinical_accuracy; repeatable.")
@click.option("--webhook", default="", help="URL that receives a JSON POST on every transition.")
def experiment_start(state: State, target: names.EndpointRef, variants: str, until: str | None,
                     max_sessions: int, metrics: tuple[str, ...], webhook: str) -> None:
    """Split ENDPOINT of AGENT between --variants and keep it so until --until or --sessions."""
    try:
        split = parse_split(variants)
        e = pb.Experiment(
            variants=[reg.TrafficTarget(version=target.parent.version(v).name, percent=p)
                      for v, p in split],
            metrics=[metric(m) for m in metrics], max_sessions=max_sessions, webhook_url=webhook)
        if until:
            e.end_time.FromDatetime(
                datetime.now(UTC) + timedelta(seconds=parse_duration(until, "--until")))
    except (ValueError, StrategyError) as exc:
        raise click.BadParameter(str(exc)) from None
    created = state.client.create_experiment(target, e)
    emit_message(state, created, lambda: out.print(created.name))


def forest(lo: float, mid: float, hi: float, scale: float) -> Text:
    """One row of a forest plot: the interval as a bar on a symmetric axis around 0 (nothing
    for an effect with no data or no interval yet)."""
    if not all(math.isfinite(x) for x in (lo, mid, hi)):
        return Text("")
    def col(x: float) -> int:
        return max(0, min(PLOT_WIDTH - 1, round((x / scale + 1) / 2 * (PLOT_WIDTH - 1))))
    cells = [" "] * PLOT_WIDTH
    cells[PLOT_WIDTH // 2] = "│"
    for c in range(col(lo), col(hi) + 1):
        cells[c] = "─"
    cells[col(lo)], cells[col(hi)], cells[col(mid)] = "[", "]", "●"
    return Text("".join(cells))


def render_report(r: pb.ExperimentReport) -> None:
    e, a = r.experiment, r.analysis
    state = enum_label(pb.ExperimentState, e.state)
    out.print(Text.assemble((e.name, "bold"), "  ", (state, "bold")))
    counts = Table("variant", "expected", "sessions")
    for t, n in zip(e.variants, a.sessions, strict=False):
        control = " (control)" if t is e.variants[0] else ""
        counts.add_row(version_label(t.version) + control, f"{t.percent:g}%", str(n))
    out.print(counts)
    srm = (f"sample ratio p = {a.sample_ratio_p_value:.3g}"
           + ("  MISMATCH" if a.sample_ratio_mismatch else "  ok"))
    out.print(Text(srm, style="bold red" if a.sample_ratio_mismatch else "green"))
    for m in a.metrics:
        scale = max([abs(x) for v in m.variants if not v.control
                     for x in (v.effect_low, v.effect_high) if math.isfinite(x)] + [1e-9])
        plot = Table(title=f"{metric_label(m.metric.name)}: {m.unit}", title_justify="left")
        for column in ("variant", "sessions", "mean \\[interval]", "effect vs control"):
            plot.add_column(column)
        plot.add_column(f"−{scale:.2g} … 0 … +{scale:.2g}", no_wrap=True, min_width=PLOT_WIDTH)
        for v in m.variants:
            plot.add_row(
                version_label(v.version), str(v.sessions),
                with_interval(v.estimate, v.ci_low, v.ci_high),
                "control" if v.control
                else with_interval(v.effect, v.effect_low, v.effect_high, signed=True),
                "" if v.control else forest(v.effect_low, v.effect, v.effect_high, scale))
        out.print(plot)
    out.print(Text(r.summary, style="bold"))


@endpoint_command(experiment.command("status"))
@_ID
def experiment_status(state: State, target: names.EndpointRef, experiment_id: int | None) -> None:
    """Per variant: sessions, each metric's mean and effect against control, the sample-ratio
    check."""
    report = state.client.experiment_report(names.ExperimentRef(target, experiment_id))
    emit_message(state, report, lambda: render_report(report))


@endpoint_command(experiment.command("list"))
def experiment_list(state: State, target: names.EndpointRef) -> None:
    """Past and present experiments of ENDPOINT."""
    emit_rows(
        state, state.client.list_experiments(target),
        ("experiment", "variants", "state", "winner", "started"),
        lambda e: (str(names.ExperimentRef.parse(e.name).id), traffic_text(e.variants),
                   enum_label(pb.ExperimentState, e.state), e.winner or "-",
                   e.create_time.ToDatetime().strftime("%Y-%m-%d %H:%M")),
    )


@endpoint_command(experiment.command("conclude"))
@_ID
@click.option("--winner", type=int, help="Set the endpoint to this version.")
@click.option("--keep-control", is_flag=True, help="Set the endpoint back to the control.")
def experiment_conclude(state: State, target: names.EndpointRef, experiment_id: int | None,
                        winner: int | None, keep_control: bool) -> None:
    """End the experiment: the endpoint goes to --winner N (or the control), audited with the
    evidence."""
    if (winner is None) == (not keep_control):
        raise click.UsageError("give exactly one of --winner N or --keep-control")
    e = state.client.conclude_experiment(
        names.ExperimentRef(target, experiment_id),
        winner=target.parent.version(winner) if winner else None, keep_control=keep_control)
    emit_message(state, e, lambda: out.print(f"{e.name}: concluded; endpoint set to {e.winner}"))


COMMANDS: tuple[click.Command, ...] = (experiment,)
