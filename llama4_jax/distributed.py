"""Multi-host start-up: a thin wrapper over JAX's own runtime, `jax.distributed`.

One process per host (or per GPU), all running the same program; after `initialize`
`jax.devices()` lists every device of every process, a mesh built from them spans the
hosts, and `llama4_jax.load(path, mesh=mesh)` gives each process only the tensor slices
of its own devices (each device's slice is read by the process that owns it).

    # on every host (process id 0 .. N-1; host 0's address is the coordinator)
    llama4-jax generate --coordinator 10.0.0.1:1234 --num-processes 2 --process-id $ID \\
        --model DIR --mesh data=2,expert=8 --input prompts.jsonl --output out.jsonl

or from Python, before anything else touches JAX:

    import llama4_jax
    llama4_jax.distributed.initialize("10.0.0.1:1234", num_processes=2, process_id=ID)

On clusters JAX detects by itself (SLURM, Open MPI, TPU pod slices, Kubernetes with
the JAX environment) `initialize()` needs no arguments.
"""

from __future__ import annotations

import os
import sys

import jax
import numpy as np

from . import sharding

ENV = {"coordinator_address": "LLAMA4_JAX_COORDINATOR", "num_processes": "LLAMA4_JAX_NUM_PROCESSES",
       "process_id": "LLAMA4_JAX_PROCESS_ID"}


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, local_device_ids=None, timeout_s: int = 300) -> None:
    """Join the multi-process JAX runtime (`jax.distributed.initialize`).

    Arguments not given are read from LLAMA4_JAX_COORDINATOR / LLAMA4_JAX_NUM_PROCESSES /
    LLAMA4_JAX_PROCESS_ID, else left to JAX (which reads JAX_COORDINATOR_ADDRESS,
    JAX_NUM_PROCESSES, JAX_PROCESS_ID and detects SLURM, MPI and TPU environments).
    On CPU the collectives run over gloo (TCP), so processes on one machine or on
    several, talking over loopback or the network, form one mesh.
    """
    if coordinator_address is None:
        coordinator_address = os.environ.get(ENV["coordinator_address"])
    if num_processes is None and ENV["num_processes"] in os.environ:
        num_processes = _int_env(ENV["num_processes"])
    if process_id is None and ENV["process_id"] in os.environ:
        process_id = _int_env(ENV["process_id"])
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"num_processes must be >= 1, got {num_processes}")
    if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
        raise ValueError(f"process_id must be in [0, {num_processes}), got {process_id}")
    if (num_processes or 0) > 1 and not coordinator_address:
        raise ValueError("several processes need a coordinator address (host:port of process 0)")
    # CPU collectives between processes (a no-op for GPU/TPU runs, which use NCCL / ICI).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address, num_processes, process_id, local_device_ids=local_device_ids,
                               initialization_timeout=timeout_s)


def _int_env(name: str) -> int:
    try:
        return int(os.environ[name])
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {os.environ[name]!r}") from None


def is_main_process() -> bool:
    """True on process 0 (the one that writes outputs and shows progress)."""
    return jax.process_index() == 0


def add_arguments(parser) -> None:
    """--coordinator / --num-processes / --process-id for a subcommand."""
    g = parser.add_argument_group("multi-host (jax.distributed)")
    g.add_argument("--distributed", action="store_true",
                   help="join jax.distributed with settings JAX detects (SLURM, Open MPI, TPU slices) or reads "
                        "from the environment")
    g.add_argument("--coordinator", default=None, metavar="HOST:PORT", help="address of process 0")
    g.add_argument("--num-processes", type=int, default=None)
    g.add_argument("--process-id", type=int, default=None)


def from_args(args) -> bool:
    """Initialize from the command line's flags, if any were given; returns whether it did."""
    if not args.distributed and args.coordinator is None and args.num_processes is None and args.process_id is None:
        return False
    initialize(args.coordinator, args.num_processes, args.process_id)
    return True


def start(args, prog: str, *, weight_bytes: int = 0):
    """A subcommand's start-up: join jax.distributed if its flags ask for it, then build
    --mesh (one process on CPU with --cpu-devices N: of N CPU devices, e.g. --mesh seq=2
    --cpu-devices 2), else (one process, on CPU) the --cpu-devices mesh of `cpu_lanes`
    devices (weight_bytes: the checkpoint's bytes on disk, for its memory bound).
    Returns (mesh or None, whether this is process 0); ValueError with a message naming
    the flag."""
    try:
        multi = from_args(args)
        if multi:
            print(f"{prog}: process {jax.process_index()} of {jax.process_count()}, "
                  f"{jax.local_device_count()} of {jax.device_count()} devices", file=sys.stderr)
    except (ValueError, RuntimeError) as e:
        raise ValueError(f"multi-host start-up failed: {e}") from None
    lanes, devices = 1, None
    if not multi and getattr(args, "cpu_devices", "1") != "1":
        if not args.mesh:
            lanes = cpu_lanes(args.cpu_devices, weight_bytes)
        elif args.cpu_devices != "auto":  # on CPU, the --mesh is made of that many CPU devices
            n = cpu_lanes(args.cpu_devices)
            if jax.default_backend() == "cpu":
                devices = jax.local_devices()[:n]
    mesh = None
    if args.mesh:
        try:
            mesh = sharding.make_mesh(args.mesh, devices=devices)
        except ValueError as e:  # includes sharding.ShardingError
            hint = ("; on CPU, --cpu-devices N makes the mesh of N CPU devices"
                    if devices is None and not multi and jax.default_backend() == "cpu" else "")
            raise ValueError(f"--mesh: {e}{hint}") from None
    elif lanes > 1 and jax.default_backend() == "cpu":
        mesh = jax.sharding.Mesh(np.array(jax.local_devices()[:lanes]), ("data",))
        print(f"{prog}: decoding on {lanes} CPU devices side by side, each with a copy of the weights "
              "(--cpu-devices 1: one)", file=sys.stderr)
    return mesh, is_main_process()


def cpu_lanes(request: str, weight_bytes: int = 0) -> int:
    """How many CPU devices a CPU-only run decodes on side by side (`--cpu-devices`).

    XLA:CPU runs a decode step's small products on about one core; a mesh of one
    device per core, each decoding its own rows, uses them all (`engine.decode`'s
    data_parallel). request: a count, or "auto": 1 for checkpoints under
    `AUTO_MIN_WEIGHT_BYTES` on disk (whose decode step is per-op overhead rather than
    weight reads: the devices' per-step agreement on whether to go on then costs more
    than the second core saves), else the cores this process may run on, at most
    `MAX_CPU_DEVICES`, and at most as many as hold 4x `weight_bytes` each in half the
    available memory (each device keeps its own copy of the weights, a float32 one of a
    bfloat16 checkpoint is twice its size, and the decode parameters hold the gate and
    up weights a second time, fused: `layers.fuse_gate_up`; 4x leaves room to spare).
    Asks JAX for that many CPU devices if its backends have not started yet; otherwise
    (e.g. in a notebook) uses at most the CPU devices it already has.
    ValueError for a request that is not "auto" or a positive integer.
    """
    if request == "auto":
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        n = 1 if weight_bytes < AUTO_MIN_WEIGHT_BYTES else min(
            cores, MAX_CPU_DEVICES, max(1, _available_memory() // 2 // (4 * weight_bytes)))
    else:
        try:
            n = int(request)
        except ValueError:
            n = 0
        if n < 1:
            raise ValueError(f"--cpu-devices: expected a positive integer or 'auto', got {request!r}")
    if n == 1:
        return 1
    try:
        jax.config.update("jax_num_cpu_devices", n)
    except (RuntimeError, AttributeError):  # backends already started (or a jax without the option): keep
        pass  # the devices there are
    return min(n, len(jax.devices("cpu")))


MAX_CPU_DEVICES = 8
# Measured on 2 cores (`llama4-jax generate`, decode tokens/s, 2 devices vs 1): the
# shipped 8 MB checkpoint 345 vs 530 (slower), the 226 MB benchmark model
# (benchmarks/generate.py --part batch) 1.5x faster.
AUTO_MIN_WEIGHT_BYTES = 32 << 20


def _available_memory() -> int:
    """Bytes of memory available to new allocations (Linux's MemAvailable, else free pages)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
