"""The cluster harness's parts, without a benchmark: hosts, links, counters, the address guard.

Needs root and iproute2 (skipped otherwise, with the reason). Each test builds its own 2-host
cluster, which takes about a second.
"""
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap

import pytest

from benchmarks.cluster import counters, namespaces, shaping

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("tc") is None
    or subprocess.run(["ip", "netns", "list"], capture_output=True).returncode != 0,
    reason="needs root and iproute2 with `ip netns` (network namespaces)")


def _exec(namespace: str, code: str, timeout: float = 30) -> str:
    done = subprocess.run(["ip", "netns", "exec", namespace, sys.executable, "-c",
                           textwrap.dedent(code)], capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr
    return done.stdout


def _listen(made: namespaces.Cluster, serve: str) -> subprocess.Popen:
    """A TCP server on host 0 whose one accepted connection ``c`` runs ``serve``."""
    server = made.require_member(made.hosts[0].address)
    return subprocess.Popen(
        ["ip", "netns", "exec", made.hosts[0].namespace, sys.executable, "-c",
         textwrap.dedent(f"""
            import socket
            s = socket.create_server(("{server}", 5999)); s.settimeout(20)
            c, _ = s.accept(); c.settimeout(20)
            """) + textwrap.dedent(serve)], stdout=subprocess.PIPE, text=True)


def _client(made: namespaces.Cluster, code: str) -> str:
    """Runs ``code`` on host 1 with ``c`` connected to :func:`_listen`'s server; its output."""
    server = made.require_member(made.hosts[0].address)
    return _exec(made.hosts[1].namespace, textwrap.dedent(f"""
        import socket, time
        for _ in range(100):  # the listener may not be up yet: bounded retries
            try:
                c = socket.create_connection(("{server}", 5999), timeout=5); break
            except ConnectionRefusedError:
                time.sleep(0.05)
        """) + textwrap.dedent(code))


def _send(made: namespaces.Cluster, nbytes: int) -> None:
    """Sends ``nbytes`` over TCP from host 1 to host 0 (addresses pass the guard)."""
    listener = _listen(made, """
        while c.recv(1 << 20): pass
        print("done")""")
    try:
        _client(made, f"""
            c.sendall(b"x" * {nbytes}); c.close()""")
        assert listener.communicate(timeout=30)[0].strip() == "done"
    finally:
        listener.kill()
        listener.wait()


def test_set_up_and_tear_down():
    with namespaces.cluster(3) as made:
        existing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert all(name in existing for name in made.namespaces)
        addresses = [host.address for host in made.hosts]
        assert addresses == ["10.213.0.1", "10.213.0.2", "10.213.0.3"]
        # The hostname resolves to the host's own address inside it (Horovod's Gloo needs that).
        assert _exec(made.hosts[2].namespace, "import socket; print(socket.gethostbyname("
                     "socket.gethostname()))").strip() == "10.213.0.3"
    existing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(name in existing for name in made.namespaces)
    assert not any(os.path.exists(f"/etc/netns/{name}") for name in made.namespaces)


def test_removed_on_failure():
    with pytest.raises(RuntimeError, match="boom"):
        with namespaces.cluster(2) as made:
            raise RuntimeError("boom")
    existing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert made.switch not in existing


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_removed_on_ctrl_c_and_sigterm(signum):
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import time
        from benchmarks.cluster import namespaces
        namespaces.terminate_on_signals()
        with namespaces.cluster(2) as made:
            print(made.switch, flush=True)
            time.sleep(60)""")], stdout=subprocess.PIPE, text=True, cwd=repo,
        env={**os.environ, "PYTHONPATH": repo})
    try:
        switch = holder.stdout.readline().strip()
        assert switch.startswith(namespaces.PREFIX)
        holder.send_signal(signum)
        holder.wait(timeout=30)
    finally:
        holder.kill()
    existing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert switch not in existing


def test_stale_set_of_a_dead_run_is_removed():
    # A set named after a process that no longer exists, as a crashed run leaves it.
    dead = subprocess.Popen(["true"])
    dead.wait()
    name = f"{namespaces.PREFIX}{dead.pid}-h0"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        with namespaces.cluster(2) as made:
            existing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
            assert name not in existing
            assert made.hosts[0].namespace in existing  # a live run's set is kept
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def test_foreign_addresses_are_refused():
    with namespaces.cluster(2) as made:
        assert made.require_member("10.213.0.2") == "10.213.0.2"
        for foreign in ("10.213.0.9", "127.0.0.1", "8.8.8.8", socket.gethostname()):
            with pytest.raises(namespaces.ForeignAddressError, match="refusing"):
                made.require_member(foreign)


def test_counters_see_the_bytes_sent():
    nbytes = 4_000_000
    with namespaces.cluster(2) as made:
        sender = made.hosts[1]
        before = counters.read_namespace(sender.namespace, sender.iface)
        _send(made, nbytes)
        sent = (counters.read_namespace(sender.namespace, sender.iface) - before).sent
        # TCP/IP/Ethernet headers: a few percent on top of the payload.
        assert nbytes <= sent < nbytes * 1.08
        inside = _exec(sender.namespace, "from benchmarks.cluster import counters; "
                       "print(counters.read_local('eth0').sent)")
        assert int(inside) >= before.sent + nbytes


def test_shaping_limits_the_rate():
    nbytes = 2_500_000  # 20 Mbit: 0.2 s at 100 Mbit/s, much less unshaped
    with namespaces.cluster(2) as made:
        shaping.shape_cluster(made, shaping.LinkShape(rate_mbit=100))
        for host in made.hosts:
            assert "tbf" in shaping.describe(host.namespace, host.iface)
        import time
        start = time.perf_counter()
        _send(made, nbytes)
        elapsed = time.perf_counter() - start
        assert elapsed > 0.8 * nbytes * 8 / 100e6
        shaping.shape_cluster(made, shaping.LinkShape())
        assert "tbf" not in shaping.describe(made.hosts[0].namespace, made.hosts[0].iface)


def test_rates_parse():
    assert shaping.parse_rate("100mbit") == 100
    assert shaping.parse_rate("1gbit") == 1000
    assert shaping.parse_rate("unshaped") is None
    with pytest.raises(ValueError, match="100mbit"):
        shaping.parse_rate("fast")


@pytest.mark.parametrize("controller", ["gloo", "mpi"])
def test_a_job_counts_horovod_fp32_bytes_on_the_wire(controller):
    """Two ranks, one Horovod fp32 step on ResNet-18's shapes: the wire agrees with the payload."""
    from benchmarks.cluster import launch

    job = {"mode": "speed", "workload": "resnet18", "contenders": ["Horovod fp32"], "rounds": 1,
           "steps_per_round": 1, "warmup_steps": 1, "seed": 0, "lr": 0.01, "momentum": 0.0,
           "batch_size": 32, "collective_timeout_s": 60}
    with namespaces.cluster(2) as made:
        ranks = launch.run_job(made, job, timeout_s=240, controller=controller, cycle_time_ms=10)
    for rank in ranks:
        assert rank["horovod_cycle_time_ms"] == 10.0  # reached every rank, under either launcher
        measured = [step for step in rank["steps"] if not step["warmup"]]
        assert len(measured) == 1
        step = measured[0]
        assert step["payload_sent"] == 2 * 1 * 4 * 11_689_512 // 2  # ring allreduce, 2 ranks
        assert step["payload_sent"] <= step["wire_sent"] < 1.05 * step["payload_sent"]


def test_horovod_cycle_time_is_one_setting_for_every_horovod_job():
    from benchmarks.cluster import launch, run

    assert launch.horovod_tuning(None) == {}
    assert launch.horovod_tuning(10.0) == {"HOROVOD_CYCLE_TIME": "10"}
    assert launch.horovod_tuning(2.5) == {"HOROVOD_CYCLE_TIME": "2.5"}
    with pytest.raises(ValueError, match="positive"):
        launch.horovod_tuning(0)
    assert run.parse_args([]).horovod_cycle_time_ms == run.DEFAULT_CYCLE_TIME_MS == 10.0
    assert run.parse_args(["--quick"]).horovod_cycle_time_ms == 10.0
    assert run.parse_args(["--horovod-cycle-time-ms", "1"]).horovod_cycle_time_ms == 1.0
    with pytest.raises(SystemExit):
        run.parse_args(["--horovod-cycle-time-ms", "0"])


def test_counters_after_wait_drained_include_everything_sent():
    """On a shaped link a send returns before its bytes leave; after wait_drained they are counted."""
    nbytes = 2_500_000  # 0.2 s at 100 Mbit/s: most of it is still queued when sendall returns
    with namespaces.cluster(2) as made:
        shaping.shape_cluster(made, shaping.LinkShape(rate_mbit=100))
        listener = _listen(made, """
            while c.recv(1 << 20): pass""")
        try:
            out = _client(made, f"""
                from benchmarks.cluster import counters
                assert counters.wait_drained()
                before = counters.read_local("eth0").sent
                c.sendall(b"x" * {nbytes})
                at_return = counters.read_local("eth0").sent - before
                drained = counters.wait_drained(timeout_s=10)
                after = counters.read_local("eth0").sent - before
                print(at_return, drained, after, counters.unacknowledged_bytes())
                c.close()""")
        finally:
            listener.kill()
            listener.wait()
    at_return, drained, after, left = out.split()
    assert drained == "True" and int(left) == 0
    assert nbytes <= int(after) < nbytes * 1.08
    assert int(at_return) <= int(after)


def test_digits_workload_loads_the_example():
    """The convergence workload imports examples/pytorch_digits.py, which imports its sibling."""
    from benchmarks.cluster import workloads

    workload = workloads.get("digits", 0, num_ranks=4)
    assert workload.test_set is not None and workload.steps_per_epoch > 0
    images, labels = workload.batch(0, rank=1)
    assert images.shape == (32, 1, 8, 8) and labels.shape == (32,)


def test_shapes_parse_with_their_own_latency():
    assert shaping.parse_shape("1gbit") == shaping.LinkShape(1000, 0.0)
    assert shaping.parse_shape("1gbit", delay_ms=5) == shaping.LinkShape(1000, 5.0)
    assert shaping.parse_shape("100mbit+20ms", delay_ms=5) == shaping.LinkShape(100, 20.0)
    with pytest.raises(ValueError, match=r"\+20ms"):
        shaping.parse_shape("1gbit+20")


def test_a_cluster_with_latency_delays_every_packet_and_shapes_only_its_own_latency():
    """A TCP round trip on a 20 ms cluster takes two one-way delays; bytes arrive intact."""
    with namespaces.cluster(2, latency_ms=20) as made:
        assert made.latency_ms == 20 and all(not host.switch_port for host in made.hosts)
        with pytest.raises(ValueError, match="0 ms latency; this one has 20 ms"):
            shaping.shape_cluster(made, shaping.LinkShape(rate_mbit=100))
        shaping.shape_cluster(made, shaping.LinkShape(rate_mbit=100, delay_ms=20))
        assert "tbf" in shaping.describe(made.hosts[0].namespace, made.hosts[0].iface)
        listener = _listen(made, """
            received = 0
            while chunk := c.recv(1 << 20):
                if received == 0:
                    c.sendall(b"y")  # answers the first byte: the client's round trip
                received += len(chunk)
            print(received)""")
        try:
            out = _client(made, """
                start = time.perf_counter()
                c.sendall(b"x"); c.recv(1)
                print(time.perf_counter() - start)
                c.sendall(b"x" * 999_999); c.close()""")
            received = listener.communicate(timeout=30)[0]
        finally:
            listener.kill()
            listener.wait()
    assert 0.040 <= float(out) < 0.5
    assert int(received) == 1_000_000


def test_gossip_contenders_need_the_mpi_controller():
    from benchmarks.cluster import run

    args = run.parse_args(["--suite", "decentralized"])
    assert args.controller == "mpi" and args.epochs == 0
    assert [shape.delay_ms for shape in args.shapes] == [0.0, 0.0, 20.0]
    assert "DeepSqueeze(ScaledSign) ring" in args.contenders
    with pytest.raises(SystemExit):
        run.parse_args(["--controller", "gloo", "--contenders", "D-PSGD ring"])


def test_a_gossip_job_on_a_cluster_with_latency_counts_its_messages_on_the_wire():
    """Two ranks under mpirun, DeepSqueeze on ResNet-18's shapes: one message to the one
    neighbour per step, as the optimizer predicts, and the wire agrees."""
    from benchmarks.cluster import launch

    job = {"mode": "speed", "workload": "resnet18", "contenders": ["DeepSqueeze(ScaledSign) ring"],
           "rounds": 1, "steps_per_round": 1, "warmup_steps": 1, "seed": 0, "lr": 0.01,
           "momentum": 0.0, "batch_size": 32, "collective_timeout_s": 60}
    with namespaces.cluster(2, latency_ms=5) as made:
        shaping.shape_cluster(made, shaping.LinkShape(rate_mbit=1000, delay_ms=5))
        ranks = launch.run_job(made, job, timeout_s=240, controller="mpi", cycle_time_ms=10)
    # 11,689,512 signs in bytes, one float32 scale per tensor (62 of them), the finite flag.
    message = (11_689_512 + 7) // 8 + 4 * 62 + 1
    for rank in ranks:
        step = next(step for step in rank["steps"] if not step["warmup"])
        assert step["gossip"] == {"neighbors": 1, "message_nbytes": step["payload_sent"]}
        assert step["payload_sent"] == message
        assert step["payload_sent"] <= step["wire_sent"] < 1.05 * step["payload_sent"]
