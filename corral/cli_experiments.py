"""corral experiment: fixed-split A/B tests with always-valid intervals and a sample-ratio check."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import click
from rich.table import Table
from rich.text import Text

from corral import names
from corral.cli import State, cli, emit, json_option, out, pass_state, to_dict
from corral.client import parse_split
from corral.registry.v1 import registry_pb2 as reg
from corral.registry.v1 import rollouts_pb2 as pb
from corral.strategy import StrategyError, metric, parse_duration

PLOT_WIDTH = 31


def _name(agent: str, endpoint: str, experiment_id: str) -> str:
    return f"{names.endpoint_name(agent, endpoint)}/experiments/{experiment_id}"


@cli.group()
def experiment() -> None:
    """A/B experiments: a fixed split between versions, measured with always-valid intervals."""


@experiment.command("start")
@click.argument("agent")
@click.argument("endpoint")
@click.option("--variants", required=True, help="VERSION=PERCENT,...; the first is the control, e.g. 2=80,3=20.")
@click.option("--until", "until", help="Run for this long, e.g. 30d.")
@click.option("--sessions", "max_sessions", type=int, default=0, help="Run until this many sessions.")
@click.option("--metric", "metrics", multiple=True, help="A metric to report, e.g. score:clinical_accuracy; repeatable.")
@click.option("--webhook", default="", help="URL that receives a JSON POST on every transition.")
@json_option
@pass_state
def experiment_start(state: State, agent: str, endpoint: str, variants: str, until: str | None,
                     max_sessions: int, metrics: tuple[str, ...], webhook: str) -> None:
    """Split ENDPOINT of AGENT between --variants and keep it so until --until or --sessions."""
    try:
        split = parse_split(variants)
        e = pb.Experiment(variants=[reg.TrafficTarget(version=names.version_name(agent, v), percent=p)
                                    for v, p in split],
                          metrics=[metric(m) for m in metrics], max_sessions=max_sessions, webhook_url=webhook)
        if until:
            e.end_time.FromDatetime(datetime.now(UTC) + timedelta(seconds=parse_duration(until, "--until")))
    except (ValueError, StrategyError) as exc:
        raise click.BadParameter(str(exc)) from None
    created = state.client.rollouts.CreateExperiment(
        pb.CreateExperimentRequest(parent=names.endpoint_name(agent, endpoint), experiment=e),
        metadata=state.client.metadata)
    emit(state, to_dict(created), lambda: out.print(created.name))


def forest(lo: float, mid: float, hi: float, scale: float) -> Text:
    """One row of a forest plot: the interval as a bar on a symmetric axis around 0."""
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
    out.print(Text.assemble((e.name, "bold"), "  ", (pb.ExperimentState.Name(e.state).removeprefix("EXPERIMENT_STATE_"), "bold")))
    counts = Table("variant", "expected", "sessions")
    for t, n in zip(e.variants, a.sessions):
        counts.add_row(f"v{names.parse_version(t.version).number}" + (" (control)" if t is e.variants[0] else ""), f"{t.percent:g}%", str(n))
    out.print(counts)
    srm = f"sample ratio p = {a.sample_ratio_p_value:.3g}" + ("  MISMATCH" if a.sample_ratio_mismatch else "  ok")
    out.print(Text(srm, style="bold red" if a.sample_ratio_mismatch else "green"))
    for m in a.metrics:
        scale = max([abs(x) for v in m.variants if not v.control for x in (v.effect_low, v.effect_high)] + [1e-9])
        t = Table(title=f"{m.metric.name} ({m.unit})", title_justify="left")
        for col in ("variant", "sessions", "mean [interval]", "effect vs control"):
            t.add_column(col)
        t.add_column(f"−{scale:.2g} … 0 … +{scale:.2g}", no_wrap=True, min_width=PLOT_WIDTH)
        for v in m.variants:
            t.add_row(f"v{names.parse_version(v.version).number}", str(v.sessions), f"{v.estimate:.4g} [{v.ci_low:.4g}, {v.ci_high:.4g}]",
                      "control" if v.control else f"{v.effect:+.4g} [{v.effect_low:+.4g}, {v.effect_high:+.4g}]",
                      "" if v.control else forest(v.effect_low, v.effect, v.effect_high, scale))
        out.print(t)
    out.print(Text(r.summary, style="bold"))


@experiment.command("status")
@click.argument("agent")
@click.argument("endpoint")
@click.option("--id", "experiment_id", default="-", help="Which experiment (default: the newest).")
@json_option
@pass_state
def experiment_status(state: State, agent: str, endpoint: str, experiment_id: str) -> None:
    """Per variant: sessions, each metric's mean and effect against control, the sample-ratio check."""
    report = state.client.rollouts.GetExperimentReport(
        pb.GetExperimentReportRequest(name=_name(agent, endpoint, experiment_id)), metadata=state.client.metadata)
    emit(state, to_dict(report), lambda: render_report(report))


@experiment.command("list")
@click.argument("agent")
@click.argument("endpoint")
@json_option
@pass_state
def experiment_list(state: State, agent: str, endpoint: str) -> None:
    """Past and present experiments of ENDPOINT."""
    rows = state.client.rollouts.ListExperiments(
        pb.ListExperimentsRequest(parent=names.endpoint_name(agent, endpoint), page_size=100),
        metadata=state.client.metadata).experiments

    def human() -> None:
        t = Table("experiment", "variants", "state", "winner", "started")
        for e in rows:
            t.add_row(e.name.rsplit("/", 1)[1], ", ".join(f"v{names.parse_version(v.version).number}={v.percent:g}%"
                                                          for v in e.variants),
                      pb.ExperimentState.Name(e.state).removeprefix("EXPERIMENT_STATE_"), e.winner or "-",
                      e.create_time.ToDatetime().strftime("%Y-%m-%d %H:%M"))
        out.print(t)

    emit(state, [to_dict(e) for e in rows], human)


@experiment.command("conclude")
@click.argument("agent")
@click.argument("endpoint")
@click.option("--id", "experiment_id", default="-", help="Which experiment (default: the newest).")
@click.option("--winner", type=int, help="Set the endpoint to this version.")
@click.option("--keep-control", is_flag=True, help="Set the endpoint back to the control.")
@json_option
@pass_state
def experiment_conclude(state: State, agent: str, endpoint: str, experiment_id: str, winner: int | None,
                        keep_control: bool) -> None:
    """End the experiment: the endpoint goes to --winner N (or the control), audited with the evidence."""
    if (winner is None) == (not keep_control):
        raise click.UsageError("give exactly one of --winner N or --keep-control")
    e = state.client.rollouts.ConcludeExperiment(pb.ConcludeExperimentRequest(
        name=_name(agent, endpoint, experiment_id), winner=names.version_name(agent, winner) if winner else "",
        keep_control=keep_control), metadata=state.client.metadata)
    emit(state, to_dict(e), lambda: out.print(f"{e.name}: concluded; endpoint set to {e.winner}"))

