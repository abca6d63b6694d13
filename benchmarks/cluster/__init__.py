"""A multi-host cluster on one machine: network namespaces joined by shaped links.

- :mod:`~benchmarks.cluster.namespaces`: create and remove the hosts, guard their addresses;
- :mod:`~benchmarks.cluster.shaping`: bandwidth (``tc tbf``) and latency (``netem``) of each link;
- :mod:`~benchmarks.cluster.counters`: bytes on the wire, from the kernel's interface counters;
- :mod:`~benchmarks.cluster.launch`: a rendezvous server and one rank per host;
- :mod:`~benchmarks.cluster.workloads` / :mod:`~benchmarks.cluster.contenders`: what a step computes
  and how its gradients are exchanged;
- :mod:`~benchmarks.cluster.rank`: the program each rank runs;
- :mod:`~benchmarks.cluster.report`: summaries, plots and ``docs/benchmarks.md``;
- :mod:`~benchmarks.cluster.run`: the command line.
"""
