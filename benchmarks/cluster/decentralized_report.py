"""The decentralized suite's page: gossip beside Horovod fp32 and DoubleSqueeze on shaped links.

    python -m benchmarks.cluster.decentralized_report benchmarks/results/cluster_decentralized_resnet18_4ranks_mpi.json

re-summarizes a results file of ``run --suite decentralized`` (rewriting its ``summary``) and
writes ``docs/decentralized_cluster.md`` and its plot. Definitions are :mod:`report`'s.
"""
from __future__ import annotations

import json
import pathlib
import sys

from benchmarks.cluster import report

__all__ = ["write_decentralized_docs"]

PAGE = report.DOCS / "decentralized_cluster.md"
PLOT = report.DOCS / "decentralized_cluster.png"
_GOSSIP_HEADLINE = "DeepSqueeze(ScaledSign) ring"
_UNCOMPRESSED_GOSSIP = "D-PSGD ring"
_SQUEEZE = "DoubleSqueeze(ScaledSign) sharded"


def _plot(results: dict) -> pathlib.Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    summary = results["summary"]
    names = [n for n in summary[0]["contenders"] if n != "compute only"]
    fig, (times, sizes) = plt.subplots(1, 2, figsize=(13, 0.5 * len(names) + 2.5))
    height = 0.8 / len(summary)
    for index, rate in enumerate(summary):
        entries = [rate["contenders"].get(name) for name in names]
        ys = [row + index * height for row in range(len(names))]
        medians = [e["step_s"]["median"] if e else 0 for e in entries]
        spread = [[e["step_s"]["median"] - e["step_s"]["p25"] if e else 0 for e in entries],
                  [e["step_s"]["p75"] - e["step_s"]["median"] if e else 0 for e in entries]]
        times.barh(ys, medians, height=height, xerr=spread, label=rate["label"], capsize=2)
    times.set_yticks([row + 0.4 - height / 2 for row in range(len(names))], names)
    times.set(xlabel="step time, s (median; bars: p25 to p75)",
              title=f"{results['config']['workload']}, {results['config']['ranks']} ranks")
    times.invert_yaxis()
    times.grid(True, axis="x", alpha=0.3)
    times.legend(fontsize=8)
    first = summary[0]["contenders"]
    megabytes = [first[n]["wire_sent"]["median"] / 1e6 for n in names]
    sizes.barh(names, megabytes)
    for row, value in enumerate(megabytes):
        sizes.annotate(f"{value:.3g} MB", (value, row), xytext=(3, 0), textcoords="offset points",
                       va="center", fontsize=8)
    sizes.set(xscale="log", xlim=(min(megabytes) / 3, max(megabytes) * 6),
              xlabel="MB sent per rank per step (on the wire)",
              title=f"bytes per step ({summary[0]['label']})")
    sizes.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    sizes.set_yticks(range(len(names)), [""] * len(names))
    sizes.invert_yaxis()
    sizes.grid(True, axis="x", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(PLOT, dpi=110)
    plt.close(fig)
    return PLOT


def _headline(summary: list[dict]) -> list[str]:
    lines = []
    for rate in summary:
        entries = rate["contenders"]
        if not {_GOSSIP_HEADLINE, _UNCOMPRESSED_GOSSIP, report.BASELINE} <= set(entries):
            continue
        ours, dpsgd, fp32 = (entries[n] for n in (_GOSSIP_HEADLINE, _UNCOMPRESSED_GOSSIP,
                                                   report.BASELINE))
        line = (f"- **{rate['label']}**: {_GOSSIP_HEADLINE} took "
                f"{ours['step_s']['median']:.2f} s per step and sent "
                f"{report._mb(ours['wire_sent']['median'])} MB per rank; D-PSGD "
                f"{dpsgd['step_s']['median']:.2f} s and {report._mb(dpsgd['wire_sent']['median'])} "
                f"MB ({dpsgd['wire_sent']['median'] / ours['wire_sent']['median']:.1f}x the "
                f"bytes); Horovod fp32 {fp32['step_s']['median']:.2f} s and "
                f"{report._mb(fp32['wire_sent']['median'])} MB")
        if _SQUEEZE in entries:
            squeeze = entries[_SQUEEZE]
            line += (f"; {_SQUEEZE} {squeeze['step_s']['median']:.2f} s and "
                     f"{report._mb(squeeze['wire_sent']['median'])} MB")
        lines.append(line + ".")
    return lines


def _latency_table(summary: list[dict]) -> list[str]:
    """What added latency cost each contender, against the same rate without it."""
    lines = []
    for delayed in summary:
        if not delayed.get("delay_ms"):
            continue
        plain = next((r for r in summary if r["rate_mbit"] == delayed["rate_mbit"]
                      and not r.get("delay_ms")), None)
        if plain is None:
            continue
        lines += [f"What {delayed['delay_ms']:g} ms of one-way latency added to a step at "
                  f"{plain['label']} (median step time with it minus without it; the delayed "
                  "cluster also passes every packet through its switch process):", "",
                  "| contender | without | with | added |", "| --- | --- | --- | --- |"]
        for name, entry in delayed["contenders"].items():
            if name == "compute only" or name not in plain["contenders"]:
                continue
            before, after = plain["contenders"][name]["step_s"]["median"], entry["step_s"]["median"]
            lines.append(f"| {name} | {before:.3f} s | {after:.3f} s | {after - before:+.3f} s |")
        lines.append("")
    return lines


def _neighbor_table(summary: list[dict]) -> list[str]:
    gossip = {n: e["gossip"] for n, e in summary[0]["contenders"].items() if "gossip" in e}
    if not gossip:
        return []
    return ["Each gossip contender sends one message per step to each neighbour (payload only):",
            "", "| contender | neighbours | bytes to each neighbour |", "| --- | --- | --- |",
            *(f"| {n} | {g['neighbors']} | {g['message_nbytes']:,} |" for n, g in gossip.items()),
            ""]


def render(results: dict, results_path: pathlib.Path) -> str:
    config, summary = results["config"], results["summary"]
    ranks = config["ranks"]
    lines = [
        "# Decentralized training on shaped links",
        "",
        "<!-- Generated by benchmarks/cluster/decentralized_report.py from the results file named "
        "below; edit the generator, not this page. -->",
        "",
        "DeepSqueeze, D-PSGD and CHOCO-SGD ([decentralized training](decentralized.md)) beside "
        "Horovod's fp32 allreduce and this project's DoubleSqueeze, on the same simulated "
        "cluster. Every number and figure comes from one run "
        f"(`{report._relative(results_path)}`, {results['date']}, "
        f"{results['wall_s'] / 60:.0f} minutes), made with:",
        "",
        "```bash",
        "sudo " + report.shell_command(results["command"]),
        "```",
        "",
        "## Headline (as measured)",
        "",
        *_headline(summary),
        "",
        f"![step time and bytes per step]({PLOT.name})",
        "",
        "## What was measured",
        "",
        f"- **Cluster**: {ranks} hosts, each a network namespace with one rank. At a plain link "
        "rate the hosts share a bridge and each link is shaped in both directions with `tc tbf`. "
        "With latency, each host's `eth0` is a TUN device and a switch process "
        "(`benchmarks/cluster/delay_link.py`) delivers every packet that many milliseconds late, "
        "one way (this machine's kernel has no `netem`); there `tc tbf` shapes what each host "
        "sends.",
        f"- **Launch**: `mpirun` across the hosts (Horovod's MPI controller, {report.cycle_time_text(config)}); "
        "Open MPI ranks yield the core while they wait (`mpi_yield_when_idle`). The gossip "
        "contenders exchange over MPI neighbour collectives (`Neighbor_allgather` on a "
        "distributed graph communicator), Horovod fp32 and DoubleSqueeze over Horovod.",
        f"- **Workload**: `{config['workload']}` ({report._WORKLOAD_TEXT.get(config['workload'], '')}) "
        "with a deliberately tiny computation, so the exchange dominates the step; plain SGD.",
        "- **Contenders**: Horovod fp32 (a ring allreduce: each rank sends "
        f"2({ranks}-1)/{ranks} of the model); `DoubleSqueeze(ScaledSign) sharded` (this project's "
        "compressed two-pass exchange); `D-PSGD ring` (the whole fp32 model to each of its "
        "neighbours); `DeepSqueeze(ScaledSign) ring` and `CHOCO-SGD(ScaledSign) ring` (one "
        "sign bit per entry plus a scale, to each neighbour).",
        f"- **Protocol**: per link, {config['repeats']} job(s) in which the contenders take turns, "
        f"{config['rounds']} round(s) of {config['steps']} measured steps after "
        f"{config['warmup']} warm-up steps; every step starts with a barrier. Step time is the "
        "slowest rank's; wire bytes are the interface counters' (every header and protocol "
        "included) per rank per step.",
        "",
        f"**Caveats.** {results['machine']['cpus']} CPU cores serve {ranks} ranks, so CPU work "
        "(compressing and decoding 11.7M entries per step) weighs far more than it would on a "
        "real cluster; on fast links it, not the network, sets the compressed contenders' step "
        "time. The spread columns show how noisy the steps were.",
        "",
    ]
    for rate in summary:
        lines += [f"## {ranks} ranks, {rate['label']}", "", *report._table(rate), "",
                  *report._per_rank_table(rate)]
    lines += _latency_table(summary)
    lines += _neighbor_table(summary)
    lines += ["## Failures", ""]
    if results["failures"]:
        for failure in results["failures"]:
            tail = report._error_lines(failure["error"])[-3:]
            lines += [f"- **{failure['contender'] or 'a job'}** ({failure['job']}):", "",
                      "  ```", *("  " + line for line in tail), "  ```", ""]
    else:
        lines += ["None in this run.", ""]
    lines += ["## Reproducing", "", "```bash",
              "sudo scripts/cluster_benchmark.sh --suite decentralized           # this page",
              "sudo scripts/cluster_benchmark.sh --suite decentralized --quick   # 2 ranks, no docs",
              "sudo scripts/cluster_benchmark.sh --suite decentralized --rates 100mbit+5ms",
              "```", ""]
    return "\n".join(lines)


def write_decentralized_docs(results: dict, results_path: pathlib.Path) -> list[pathlib.Path]:
    """Writes ``docs/decentralized_cluster.md`` and its plot from one run's results."""
    plot = _plot(results)
    PAGE.write_text(render(results, results_path))
    return [plot, PAGE]


def main(path: pathlib.Path) -> None:
    results = json.loads(path.read_text())
    results["summary"] = report.summarize(results)
    path.write_text(json.dumps(results, indent=1))
    print(report.text_table(results))
    print("docs:", ", ".join(str(p) for p in write_decentralized_docs(results, path)))


if __name__ == "__main__":
    main(pathlib.Path(sys.argv[1]))
