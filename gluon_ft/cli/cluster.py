"""``launch``: a local ps-lite cluster, or one node of several hosts, running a command."""

from __future__ import annotations

import argparse

from gluon_ft.cli.common import Command, positive_float, positive_int


def add_launch_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-n", "--num-workers", type=positive_int, required=True, help="worker processes")
    p.add_argument(
        "-s",
        "--num-servers",
        type=int,
        default=1,
        help="server processes (default 1; per host with --nnodes, where 0 is allowed on a "
        "host while another runs one)",
    )
    p.add_argument("--port", type=int, help="the scheduler's port on 127.0.0.1 (default: free)")
    hosts = p.add_argument_group(
        "several hosts", "run the same command on every host, each with its --node-rank"
    )
    hosts.add_argument("--nnodes", type=positive_int, help="number of hosts")
    hosts.add_argument("--node-rank", type=int, help="this host's rank, 0 to NNODES-1")
    hosts.add_argument(
        "--scheduler",
        metavar="HOST:PORT",
        help="node 0's address, where its launcher listens for the others",
    )
    hosts.add_argument(
        "--join-timeout",
        type=positive_float,
        default=300.0,
        metavar="S",
        help="how long the nodes wait for each other at the start (default %(default)g s)",
    )
    p.add_argument(
        "command",
        nargs=argparse.REMAINDER,
        metavar="-- COMMAND",
        help="what each worker runs, e.g. -- gluon-ft train --kvstore dist_sync ...",
    )


def _run_launch(args: argparse.Namespace) -> int:
    from gluon_ft.cluster.launch import launch, launch_node
    from gluon_ft.errors import UsageError

    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    several = (args.nnodes, args.node_rank, args.scheduler)
    if all(value is None for value in several):
        return launch(command, args.num_workers, args.num_servers, port=args.port)
    if any(value is None for value in several) or args.port is not None:
        raise UsageError(
            "Several hosts need --nnodes, --node-rank and --scheduler HOST:PORT together "
            "(and no --port), e.g. `gluon-ft launch --nnodes 2 --node-rank 0 --scheduler "
            "10.0.0.1:29400 -n 1 -- gluon-ft train --kvstore dist_sync ...` on node 0."
        )
    return launch_node(
        command,
        args.nnodes,
        args.node_rank,
        args.scheduler,
        args.num_workers,
        args.num_servers,
        join_timeout=args.join_timeout,
    )


LAUNCH = Command(
    "start a local ps-lite cluster and run a command as each worker",
    add_launch_arguments,
    _run_launch,
)
