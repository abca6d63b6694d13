"""A multi-host cluster on one machine: network namespaces joined by shaped links.

- :mod:`~benchmarks.cluster.namespaces`: create and remove the hosts, guard their addresses;
- :mod:`~benchmarks.cluster.shaping`: the bandwidth of each link (``tc tbf``);
- :mod:`~benchmarks.cluster.delay_link`: a switch that delays every packet (latency without
  ``netem``, which this kernel lacks);
- :mod:`~benchmarks.cluster.counters`: bytes on the wire, from the kernel's interface counters;
- :mod:`~benchmarks.cluster.launch`: a rendezvous server and one rank per host;
- :mod:`~benchmarks.cluster.workloads` / :mod:`~benchmarks.cluster.contenders`: what a step computes
  and how its gradients are exchanged;
- :mod:`~benchmarks.cluster.rank`: the program each rank runs;
- :mod:`~benchmarks.cluster.report`: summaries, plots and ``docs/benchmarks.md``;
- :mod:`~benchmarks.cluster.decentralized_report`: the decentralized suite's page;
- :mod:`~benchmarks.cluster.run`: the command line.
"""
