"""From raw per-rank step records to summaries, plots and ``docs/benchmarks.md``.

    python -m benchmarks.cluster.report benchmarks/results/cluster_resnet18_4ranks.json [MORE.json]

re-summarizes results files (rewriting their ``summary``) and regenerates the page and plots
from the first; further files are appended as tables (e.g. the same run under MPI).

Definitions used everywhere:

- a step's time is the slowest rank's (ranks start each step together, after a barrier);
- exchange time = median step time - median step time of ``compute only`` on the same link,
  so communication hidden behind backward counts the same for every contender;
- bytes are per rank per step (mean over ranks), measured steps only (warm-up steps excluded);
- protocol overhead = wire bytes / payload bytes - 1: headers, acknowledgements, negotiation
  and, for Horovod-based contenders, Horovod's background chatter (reported on its own as the
  idle rate).
"""
from __future__ import annotations

import json
import pathlib
import statistics
import sys

from benchmarks.cluster.contenders import uses_horovod

__all__ = ["summarize", "text_table", "write_docs"]

DOCS = pathlib.Path(__file__).resolve().parents[2] / "docs"
BASELINE = "Horovod fp32"


def _quantiles(values: list[float]) -> dict:
    ordered = sorted(values)
    if len(ordered) == 1:
        return {"median": ordered[0], "p25": ordered[0], "p75": ordered[0], "min": ordered[0],
                "max": ordered[0], "n": 1}
    quartiles = statistics.quantiles(ordered, n=4, method="inclusive")
    return {"median": statistics.median(ordered), "p25": quartiles[0], "p75": quartiles[2],
            "min": ordered[0], "max": ordered[-1], "n": len(ordered)}


def _steps_by_contender(rate: dict) -> dict[str, list[list[dict]]]:
    """contender -> list of steps, each the list of every rank's record of that step."""
    steps: dict[str, list[list[dict]]] = {}
    for job in rate["jobs"]:
        for records in zip(*(rank["steps"] for rank in job["ranks"])):
            if not records[0]["warmup"]:
                steps.setdefault(records[0]["contender"], []).append(list(records))
    return steps


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def _summarize_rate(rate: dict) -> dict:
    by_contender = _steps_by_contender(rate)
    summary: dict[str, dict] = {}
    for name, steps in by_contender.items():
        entry = {
            "step_s": _quantiles([max(r["step_s"] for r in step) for step in steps]),
            "wire_sent": _quantiles([_mean(r["wire_sent"] for r in step) for step in steps]),
            "wire_received": _quantiles([_mean(r["wire_received"] for r in step) for step in steps]),
            "payload_sent": _quantiles([_mean(r["payload_sent"] for r in step) for step in steps]),
            "wire_sent_per_rank": [statistics.median(step[rank]["wire_sent"] for step in steps)
                                   for rank in range(len(steps[0]))],
            "wire_received_per_rank": [statistics.median(step[rank]["wire_received"]
                                                         for step in steps)
                                       for rank in range(len(steps[0]))],
        }
        telemetry = [r["telemetry"] for step in steps for r in step if "telemetry" in r]
        if telemetry:
            entry["telemetry"] = {key: statistics.median(t[key] for t in telemetry)
                                  for key in ("compress_s", "communicate_s", "decode_s")}
        gossip = [r["gossip"] for step in steps for r in step if "gossip" in r]
        if gossip:  # a pure function of the model and compressor: the same on every step
            entry["gossip"] = gossip[0]
        summary[name] = entry
    idle = [rank["idle_wire_bytes_per_s"] for job in rate["jobs"] for rank in job["ranks"]
            if uses_horovod(job["contenders"])]
    idle_rate = statistics.median(idle) if idle else 0.0
    compute = summary.get("compute only", {}).get("step_s", {}).get("median", 0.0)
    baseline = summary.get(BASELINE)
    for name, entry in summary.items():
        payload, wire = entry["payload_sent"]["median"], entry["wire_sent"]["median"]
        entry["overhead"] = wire / payload - 1 if payload else None
        entry["exchange_s"] = max(0.0, entry["step_s"]["median"] - compute)
        entry["exchange_spread_s"] = [max(0.0, entry["step_s"][q] - compute) for q in ("p25", "p75")]
        if baseline and name != "compute only":
            entry["step_speedup_vs_fp32"] = baseline["step_s"]["median"] / entry["step_s"]["median"]
            # Undefined when either exchange time vanished into the compute-only noise.
            entry["exchange_speedup_vs_fp32"] = (
                baseline["exchange_s"] / entry["exchange_s"]
                if entry["exchange_s"] > 0 and baseline["exchange_s"] > 0 else None)
            entry["wire_reduction_vs_fp32"] = (baseline["wire_sent"]["median"]
                                               / max(entry["wire_sent"]["median"], 1))
    return {"label": rate["label"], "rate_mbit": rate["rate_mbit"],
            "delay_ms": rate.get("delay_ms", 0.0), "contenders": summary,
            "horovod_idle_bytes_per_s": idle_rate or None}


def summarize(results: dict) -> list[dict]:
    """Per link rate: per contender step/exchange time, bytes, overhead and ratios vs fp32."""
    return [_summarize_rate(rate) for rate in results["rates"]]


def _mb(nbytes: float) -> str:
    return f"{nbytes / 1e6:.3f}" if nbytes < 1e7 else f"{nbytes / 1e6:.1f}"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:+.1f}%"


def _table(rate: dict) -> list[str]:
    lines = ["| contender | step s (median [p25, p75]) | exchange s | wire MB sent/rank/step "
             "| payload MB | overhead | bytes vs fp32 | step speedup "
             "| exchange speedup |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, entry in rate["contenders"].items():
        step = entry["step_s"]
        lines.append(
            f"| {name} | {step['median']:.3f} [{step['p25']:.3f}, {step['p75']:.3f}] "
            f"| {entry['exchange_s']:.3f} | {_mb(entry['wire_sent']['median'])} "
            f"| {_mb(entry['payload_sent']['median'])} | {_percent(entry['overhead'])} "
            f"| {_ratio(entry.get('wire_reduction_vs_fp32'))} "
            f"| {_ratio(entry.get('step_speedup_vs_fp32'))} "
            f"| {_ratio(entry.get('exchange_speedup_vs_fp32'))} |")
    return lines


def _per_rank_table(rate: dict) -> list[str]:
    entries = {n: e for n, e in rate["contenders"].items() if n != "compute only"}
    ranks = len(next(iter(entries.values()))["wire_sent_per_rank"]) if entries else 0
    lines = ["Wire MB per step, each rank (median of steps; sent / received):", "",
             "| contender | " + " | ".join(f"rank {r}" for r in range(ranks)) + " |",
             "| --- |" + " --- |" * ranks]
    for name, entry in entries.items():
        cells = [f"{_mb(sent)} / {_mb(received)}" for sent, received
                 in zip(entry["wire_sent_per_rank"], entry["wire_received_per_rank"])]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines + [""]


def text_table(results: dict) -> str:
    out = []
    for rate in results["summary"]:
        out += [f"\n## {rate['label']}", *_table(rate)]
    for failure in results["failures"]:
        out.append(f"FAILED: {failure['job']}: {failure['contender'] or 'job'}")
    return "\n".join(out)


def _plots(results: dict, stem: str) -> list[pathlib.Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    summary = results["summary"]
    shaped = [rate for rate in summary if rate["rate_mbit"] is not None]
    names = list(summary[0]["contenders"]) if summary else []

    if shaped:
        fig, ax = plt.subplots(figsize=(11, 5.5))
        colors = plt.cm.tab20.colors
        for index, name in enumerate(n for n in names if n != "compute only"):
            points = [(rate["rate_mbit"], rate["contenders"][name]["step_s"]["median"])
                      for rate in shaped if name in rate["contenders"]]
            if points:
                xs, ys = zip(*points)
                # Solid: what users would pick instead; dashed: this project.
                ax.plot(xs, ys, marker="os^Dv<>"[index % 7], color=colors[index % len(colors)],
                        label=name, linestyle="-" if "Horovod" in name or "DDP" in name else "--")
        ax.set(xscale="log", yscale="log", xlabel="link rate (Mbit/s, both directions)",
               ylabel="median step time (s)",
               title=f"{results['config']['workload']}, {results['config']['ranks']} ranks")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
        path = DOCS / f"{stem}_time_vs_bandwidth.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    if summary:
        rate = summary[0]
        entries = [(n, e) for n, e in rate["contenders"].items() if n != "compute only"]
        fig, ax = plt.subplots(figsize=(9, 0.4 * len(entries) + 1.5))
        labels = [n for n, _ in entries]
        ax.barh(labels, [e["wire_sent"]["median"] / 1e6 for _, e in entries], label="on the wire")
        ax.scatter([max(e["payload_sent"]["median"], 1) / 1e6 for _, e in entries], labels,
                   color="black", marker="|", s=200, label="payload (telemetry)", zorder=3)
        ax.set(xscale="log", xlabel="MB sent per rank per step",
               title=f"bytes per step, {results['config']['workload']}, "
                     f"{results['config']['ranks']} ranks, {rate['label']}")
        ax.invert_yaxis()
        ax.grid(True, axis="x", which="both", alpha=0.3)
        ax.legend(fontsize=8)
        path = DOCS / f"{stem}_bytes_per_step.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    convergence = (results.get("convergence") or {}).get("results")
    if convergence:
        fig, ax = plt.subplots(figsize=(8, 5))
        for name, entry in convergence.items():
            bits = 8 * entry["wire_sent_per_step"]
            ax.scatter(bits, 100 * entry["accuracy"])
            ax.annotate(name, (bits, 100 * entry["accuracy"]), fontsize=7,
                        xytext=(4, 2), textcoords="offset points")
        ax.set(xscale="log", xlabel="bits sent per rank per step (on the wire)",
               ylabel="test accuracy (%)",
               title=f"digits CNN, {results['convergence']['ranks']} ranks, "
                     f"{results['convergence']['epochs']} epochs")
        ax.grid(True, which="both", alpha=0.3)
        path = DOCS / f"{stem}_accuracy_vs_bits.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def write_docs(results: dict, results_path: pathlib.Path,
               others: list[tuple[dict, pathlib.Path]] = ()) -> list[pathlib.Path]:
    """Writes the plots and ``docs/benchmarks.md`` from one run's results (plus tables of others)."""
    plots = _plots(results, "cluster")
    page = DOCS / "benchmarks.md"
    text = render_page(results, results_path, [p.name for p in plots])
    for other, path in others:
        text += _other_run(other, path)
    text += _SEE_ALSO
    page.write_text(text)
    return plots + [page]


_SEE_ALSO = """
## Other benchmarks

- [Compressor throughput and convergence](training_benchmarks.md): GB/s per compressor and framework,
  and accuracy against bytes on the example task.
"""


def _other_run(results: dict, path: pathlib.Path) -> str:
    config = results["config"]
    lines = ["", f"## Another run: {config['ranks']} ranks, "
                 f"Horovod's {config['controller']} controller",
             "", f"From `{_relative(path)}` ({results['date']}), made with:", "", "```bash",
             "sudo " + shell_command(results["command"]), "```", ""]
    if uses_horovod(config.get("contenders", [])):
        lines += [f"Horovod-based contenders ran with {cycle_time_text(config)}.", ""]
    if config.get("controller") == "mpi" and not config.get("mpi_yield_when_idle"):
        compute = ", ".join(
            f"{rate['contenders']['compute only']['step_s']['median']:.2f} s at {rate['label']}"
            for rate in results["summary"] if "compute only" in rate["contenders"])
        lines += ["Bytes on the wire are comparable with the Gloo run; times are not. Each host "
                  "holds one MPI slot, so Open MPI considers nothing oversubscribed and its "
                  "ranks poll aggressively while they wait, competing for the 2 cores with the "
                  f"ranks that compute: even the compute-only step took {compute}.", ""]
    for rate in results["summary"]:
        lines += [f"### {rate['label']}", "", *_table(rate), ""]
    for failure in results["failures"]:
        cause = (_error_lines(failure["error"])
                 or [line for line in failure["error"].splitlines() if len(line.split()) > 3])[-1:]
        lines += [f"- failed: **{failure['contender'] or 'a job'}** ({failure['job']}): "
                  + "; ".join(cause)]
    return "\n".join(lines) + "\n"


def _error_lines(error: str) -> list[str]:
    """The exception lines of a failure: what went wrong, without the traceback's frames."""
    return [line.strip() for line in error.splitlines()
            if ("Error" in line and not line.startswith(" ")) or line.strip().startswith("what():")]


def _relative(path: pathlib.Path) -> pathlib.Path:
    resolved = path.resolve()
    return resolved.relative_to(DOCS.parent) if resolved.is_relative_to(DOCS.parent) else path


_WORKLOAD_TEXT = {
    "resnet18": "ResNet-18's 11,689,512 parameters in their real layer shapes",
    "mlp25m": "an MLP 1024-4096-4096-1024-1000, 26.2M parameters",
    "bert-base": "BERT-base's 12 encoder layers, 85.1M parameters",
    "digits": "the example's CNN on scikit-learn digits, a real forward and backward",
}


_HEADLINE = "DoubleSqueeze(ScaledSign) sharded"
#: Horovod's own default ``HOROVOD_CYCLE_TIME`` (runs recorded before the harness set one used it).
HOROVOD_DEFAULT_CYCLE_TIME_MS = 1.0


def cycle_time_text(config: dict) -> str:
    """The Horovod cycle time a run used, in words (older results files did not record it)."""
    value = config.get("horovod_cycle_time_ms")
    if value is None:
        return f"Horovod's default cycle time ({HOROVOD_DEFAULT_CYCLE_TIME_MS:g} ms)"
    return f"a Horovod cycle time of {value:g} ms (`HOROVOD_CYCLE_TIME`)"


def _headline(results: dict) -> list[str]:
    """The project's headline contender against Horovod fp32 and DDP + PowerSGD, per link."""
    lines = []
    for rate in results["summary"]:
        entries = rate["contenders"]
        if _HEADLINE not in entries or BASELINE not in entries:
            continue
        ours, fp32 = entries[_HEADLINE], entries[BASELINE]
        payload_ratio = fp32["payload_sent"]["median"] / ours["payload_sent"]["median"]
        line = (f"- **{rate['label']}**: {_HEADLINE} sent {ours['wire_reduction_vs_fp32']:.1f}x "
                f"fewer bytes on the wire than Horovod fp32 ({payload_ratio:.1f}x fewer payload "
                f"bytes); step time {ours['step_s']['median']:.2f} s vs "
                f"{fp32['step_s']['median']:.2f} s ({ours['step_speedup_vs_fp32']:.2f}x), "
                f"exchange time {ours['exchange_s']:.2f} s vs {fp32['exchange_s']:.2f} s")
        powersgd = {n: e for n, e in entries.items() if n.startswith("DDP PowerSGD")}
        if powersgd:
            best = min(powersgd, key=lambda n: powersgd[n]["step_s"]["median"])
            line += (f"; fastest PowerSGD ({best}): {powersgd[best]['step_s']['median']:.2f} s "
                     f"per step, {_mb(powersgd[best]['wire_sent']['median'])} MB on the wire")
        lines.append(line + ".")
    return (["## Headline (as measured)", "", *lines, ""]) if lines else []


def shell_command(command: str) -> str:
    """The script invocation equivalent to a recorded ``python -m ...run`` command."""
    arguments = [a for a in command.split()[3:] if a not in ("--docs", "--no-docs")]
    return " ".join(["scripts/cluster_benchmark.sh", *arguments])


def render_page(results: dict, results_path: pathlib.Path, plots: list[str]) -> str:
    config = results["config"]
    relative = _relative(results_path)
    lines = [
        "# Benchmarks: compressed exchanges on shaped links",
        "",
        "<!-- Generated by benchmarks/cluster/report.py from the results file named below; "
        "edit the generator, not this page. -->",
        "",
        "Every number and figure on this page comes from one run of the cluster harness "
        f"(`{relative}`, {results['date']}, {results['wall_s'] / 60:.0f} minutes), made with:",
        "",
        "```bash",
        "sudo " + shell_command(results["command"]),
        "```",
        "",
        "## What was measured",
        "",
        f"- **Cluster**: {config['ranks']} hosts, each a network namespace with its own address on "
        "a bridge (a switch namespace not connected to anything else), one rank per host. Each "
        "host's link is shaped in both directions with `tc tbf` (latency, where a run asks for "
        "it, comes from a switch process that delays every packet, "
        f"`benchmarks/cluster/delay_link.py`: {config['delay_ms']:g} ms here). Ranks rendezvous over the hosts' addresses: Horovod "
        f"({config.get('controller', 'gloo')} controller) through its own rendezvous, PyTorch "
        "through its TCP store on host 0.",
        f"- **Horovod settings**: every Horovod-based contender (fp32, fp16 and this project's) "
        f"ran with {cycle_time_text(config)}, the pause between the negotiation rounds of "
        "Horovod's background thread (`--horovod-cycle-time-ms`; Horovod's own default is "
        f"{HOROVOD_DEFAULT_CYCLE_TIME_MS:g} ms). Every round sends a small message to the "
        "coordinator even when no tensor is pending, so the cycle time sets how much Horovod "
        "sends between and during exchanges; DDP contenders do not run Horovod.",
        f"- **Workload**: `{config['workload']}` ({_WORKLOAD_TEXT.get(config['workload'], '')}), "
        "with a deliberately tiny computation (`grad = a*d + b*p`, two element-wise operations "
        "per entry) so the exchange dominates the step. Plain SGD, same seed and inputs for every "
        "contender.",
        f"- **Protocol**: per link rate, {config['repeats']} alternation(s) of two jobs (Horovod-based "
        "contenders; DDP contenders), each with the compute-only baseline; inside a job the "
        f"contenders take turns, {config['rounds']} round(s) of {config['steps']} measured steps "
        f"after {config['warmup']} warm-up steps. Every step starts with a barrier and is "
        "bracketed by readings of the host's interface counters (`/sys/class/net/eth0/statistics`).",
        "- **Step time** is the slowest rank's; **exchange time** is the median step time minus "
        "the median compute-only step time on the same link; **wire bytes** are what the "
        "interface sent per rank per step (headers and every protocol included), read once the "
        "peers have acknowledged everything the rank sent (what a collective sent last can "
        "still wait in the shaper's queue when it returns); **payload** is "
        "what the collectives carry (this project's telemetry, or the ring-allreduce formula for "
        "Horovod and DDP, PowerSGD's P and Q included); **overhead** is wire / payload - 1.",
        "- Ratios (`bytes vs fp32`, speedups) are against Horovod fp32 **in the same run**, "
        "exactly as measured.",
        "",
        f"**Caveats.** The machine has {results['machine']['cpus']} CPU cores for {config['ranks']} "
        "ranks (and was shared with other work), so "
        "anything that costs CPU time is inflated: compression and decompression of the "
        "project's algorithms, PowerSGD's orthogonalisation, even Gloo's reductions. On an "
        "unshaped link this, not the network, decides the ranking. The spread columns show how "
        "noisy the steps were.",
        "",
    ]
    if results["summary"]:
        idle = results["summary"][0]["horovod_idle_bytes_per_s"]
        if idle:
            cycle = config.get("horovod_cycle_time_ms") or HOROVOD_DEFAULT_CYCLE_TIME_MS
            lines += [f"Horovod's background thread negotiates every cycle ({cycle:g} ms here) "
                      f"even when idle: {idle / 1e3:.0f} kB/s per rank measured between steps "
                      "(the rate falls in proportion to the cycle time; the earlier run with "
                      "Horovod's default 1 ms is kept in "
                      "`benchmarks/results/cluster_resnet18_4ranks_cycle1ms.json`, its "
                      "`horovod_idle_bytes_per_s`). It is part of the wire bytes "
                      "of Horovod fp32/fp16 and of this project's contenders (which run on "
                      "Horovod), not of DDP's (separate jobs, no Horovod). It grows with the time "
                      "a step spends away from the network (compression on starved cores), which "
                      "is why a compressed contender's wire ratio to fp32 can fall below its "
                      "payload ratio.", ""]
    lines += _headline(results)
    for plot in plots:
        lines += [f"![{plot}]({plot})", ""]
    for rate in results["summary"]:
        lines += [f"## {config['ranks']} ranks, {rate['label']}", "", *_table(rate), ""]
        lines += _per_rank_table(rate)
        squeeze = {n: e["telemetry"] for n, e in rate["contenders"].items() if "telemetry" in e}
        if squeeze:
            lines += ["Telemetry of this project's contenders (median per rank per step, seconds):",
                      "", "| contender | compress | communicate (waiting) | decode |",
                      "| --- | --- | --- | --- |"]
            lines += [f"| {n} | {t['compress_s']:.3f} | {t['communicate_s']:.3f} "
                      f"| {t['decode_s']:.3f} |" for n, t in squeeze.items()]
            lines.append("")
    convergence = (results.get("convergence") or {}).get("results")
    if convergence:
        conv = results["convergence"]
        lines += ["## Accuracy vs bits (the example model)", "",
                  f"The example's CNN on scikit-learn digits, {conv['ranks']} ranks, "
                  f"{conv['epochs']} epochs, batch 32 per rank, SGD lr 0.05 x ranks, momentum 0.9, "
                  "on the fastest link of the run (bytes do not depend on the link). A step of "
                  "this model takes milliseconds, so its wire bytes include a visible share of "
                  "what Horovod's background thread sends while the harness waits for the last "
                  "acknowledgements after each step (Horovod-based contenders only; the payload "
                  "column is the collectives alone).", "",
                  "| contender | test accuracy | wire bytes/rank/step | payload bytes/rank/step |",
                  "| --- | --- | --- | --- |"]
        lines += [f"| {n} | {100 * e['accuracy']:.2f}% | {e['wire_sent_per_step']:.0f} "
                  f"| {e['payload_sent_per_step']:.0f} |" for n, e in convergence.items()]
        lines.append("")
    lines += ["## Failures", ""]
    if results["failures"]:
        lines += ["Contenders that failed are recorded, not hidden (last lines of the error):", ""]
        for failure in results["failures"]:
            tail = _error_lines(failure["error"])[-3:]
            lines += [f"- **{failure['contender'] or 'a job'}** ({failure['job']}):", "",
                      "  ```", *("  " + line for line in tail), "  ```", ""]
    else:
        lines += ["None in this run.", ""]
    lines += [
        "## Reproducing and extending",
        "",
        "```bash",
        "sudo scripts/cluster_benchmark.sh --quick          # 2 ranks, under 5 minutes, no docs",
        "sudo scripts/cluster_benchmark.sh --rates 100mbit --delay-ms 5 --workload mlp25m",
        "sudo scripts/cluster_benchmark.sh --contenders 'Horovod fp32,DoubleSqueeze(ScaledSign) sharded'",
        "sudo scripts/cluster_benchmark.sh --horovod-cycle-time-ms 1   # Horovod's own default",
        "```",
        "",
        "Needs root (network namespaces, veth pairs, `tc`). Only addresses of namespaces the "
        "harness created are ever targeted (anything else raises `ForeignAddressError`); "
        "namespaces are removed on exit, Ctrl-C, SIGTERM and failure, and a crashed run's set is "
        "removed by the next start. Horovod-based jobs run under Horovod's Gloo controller by "
        "default; `--controller mpi` runs them under MPI: `mpirun` in host 0 starts the other "
        "hosts' ranks through `benchmarks/cluster/mpi_agent.sh` (`ip netns exec` in place of "
        "ssh) with its traffic kept on `eth0`. DDP always uses PyTorch's gloo backend. Results "
        "keep every rank's every step (`benchmarks/results/`), so per-step and per-rank figures "
        "can be recomputed from them.",
        "",
    ]
    return "\n".join(lines)


def _resummarize(path: pathlib.Path) -> dict:
    results = json.loads(path.read_text())
    results["summary"] = summarize(results)
    path.write_text(json.dumps(results, indent=1))
    return results


def main(paths: list[pathlib.Path]) -> None:
    """The first file makes the page and plots; the others are appended as tables."""
    loaded = [(_resummarize(path), path) for path in paths]
    print(text_table(loaded[0][0]))
    print("docs:", ", ".join(str(p) for p in write_docs(*loaded[0], others=loaded[1:])))


if __name__ == "__main__":
    main([pathlib.Path(arg) for arg in sys.argv[1:]])
