"""Launching under MPI: turn an `mpirun` job into the environment torch.distributed reads.

`mpirun -hostfile HOSTS -n N python -m taxfree align CONFIG` starts N processes that know their
MPI rank but not the variables torch.distributed, accelerate and DeepSpeed read (RANK,
WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT). `discover_mpi()` asks MPI
(through mpi4py) and sets them: rank 0's address is broadcast to every rank, local ranks are
counted per host. `python -m taxfree` calls it first thing, so scripts/launch_mpi.sh needs no
per-rank wrapper. Outside an MPI job, or when a launcher already set the variables (torchrun,
accelerate, DeepSpeed's launcher), it does nothing.
"""

from __future__ import annotations

import os
import socket

from taxfree.errors import TaxfreeError

# World size as each MPI implementation's launcher exports it: Open MPI, MPICH / Intel MPI (PMI),
# MVAPICH (the same variables accelerate reads for its own multi-CPU launch).
_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")
DEFAULT_PORT = 29500


class Ranks:
    """The processes of a multi-process launch (accelerate, torchrun, mpirun): rank 0 writes
    results (directories, markers, manifests); every rank trains; the others wait for rank 0 at
    `barrier()` and take its decisions (`share`). One process: every call is a no-op."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))  # every launcher sets RANK (and WORLD_SIZE)
        self.main = self.rank == 0
        self.state = None
        if self.world > 1:
            import torch
            from accelerate import PartialState

            cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes") or not torch.cuda.is_available()
            self.state = PartialState(cpu=cpu)  # initializes the process group the Trainer then reuses

    def barrier(self) -> None:
        if self.state is not None:
            self.state.wait_for_everyone()

    def share(self, value):
        """Rank 0's value on every rank."""
        if self.state is None:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]


_RANKS: Ranks | None = None


def ranks() -> Ranks:
    """This process's place in the launch, made once per process."""
    global _RANKS
    if _RANKS is None:
        _RANKS = Ranks()
    return _RANKS


def launched_by_mpi(environ=os.environ) -> bool:
    """True inside a multi-process MPI job whose ranks lack torch.distributed's variables."""
    if all(k in environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")):
        return False  # torchrun, accelerate or DeepSpeed's launcher already set them
    for var in _SIZE_VARS:
        try:
            if int(environ.get(var, "1")) > 1:
                return True
        except ValueError:
            continue
    return False


def _host_address(hostname: str) -> str:
    """An address of this host that other hosts can reach (not loopback), for MASTER_ADDR."""
    try:
        infos = socket.getaddrinfo(hostname, None, family=socket.AF_INET)
    except OSError:
        infos = []
    for info in infos:
        addr = info[4][0]
        if not addr.startswith("127."):
            return addr
    raise TaxfreeError(f"MPI discovery: no non-loopback address for host {hostname!r}; "
                       "export MASTER_ADDR=<rank 0's address> to every rank (mpirun -x MASTER_ADDR)")


def discover_mpi(port: int | None = None, environ=os.environ) -> dict[str, str] | None:
    """Set RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT from MPI.

    Returns the values set, or None when this is not an MPI job needing them. MASTER_ADDR and
    MASTER_PORT already in the environment are kept (set them when hosts have several networks).
    """
    if not launched_by_mpi(environ):
        return None
    try:
        from mpi4py import MPI
    except ImportError:
        raise TaxfreeError("started by mpirun, but mpi4py is not installed: pip install mpi4py "
                           "(it finds each rank's place in the job)") from None
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    host = MPI.Get_processor_name()
    hosts = comm.allgather(host)
    local_rank = hosts[:rank].count(host)
    local_size = hosts.count(host)
    master = environ.get("MASTER_ADDR")
    if master is None:
        if rank == 0:
            # One host: loopback works everywhere; several: an address the others can reach.
            try:
                master = "127.0.0.1" if len(set(hosts)) == 1 else _host_address(socket.gethostname())
            except TaxfreeError as e:
                master = e  # every rank must learn of the failure, not wait in bcast
        master = comm.bcast(master, root=0)
        if isinstance(master, TaxfreeError):
            raise master
    values = {
        "RANK": str(rank),
        "WORLD_SIZE": str(size),
        "LOCAL_RANK": str(local_rank),
        "LOCAL_WORLD_SIZE": str(local_size),
        "MASTER_ADDR": str(master),
        "MASTER_PORT": environ.get("MASTER_PORT") or str(port or DEFAULT_PORT),
    }
    environ.update(values)
    # MPI's part is done: finalize now (every rank is here), so that a rank that fails later
    # exits at once and the launcher stops the job, instead of every rank blocking in the
    # collective MPI_Finalize that mpi4py would otherwise run at exit.
    MPI.Finalize()
    return values


def accelerate_env(config_file: str) -> dict[str, str]:
    """The environment `accelerate launch --config_file CONFIG_FILE` gives each process it starts
    (ACCELERATE_*, FSDP_*: the DeepSpeed / FSDP plugin settings, mixed precision), without the
    process-placement variables: for launchers other than accelerate's (scripts/launch_mpi.sh).
    Variables already in the environment are left out (they reach the ranks as they are); a
    relative DeepSpeed config file becomes absolute (relative to the current directory).

    Uses accelerate's own launch code (accelerate 1.15), so the settings mean exactly what they
    mean under `accelerate launch`.
    """
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env, prepare_simple_launcher_cmd_env

    if not os.path.isfile(config_file):
        raise TaxfreeError(f"{config_file}: accelerate config not found")
    try:
        args = launch_command_parser().parse_args(["--config_file", config_file, "-m", "taxfree"])
        args, defaults, mp_from_config = _validate_launch_command(args)
        if args.use_deepspeed:
            fields = list(defaults.deepspeed_config) if defaults is not None else []
            args.deepspeed_fields_from_accelerate_config = ",".join(fields + (["mixed_precision"] if mp_from_config else []))
            _, env = prepare_deepspeed_cmd_env(args)
        elif args.use_fsdp or args.multi_gpu:
            env = prepare_multi_gpu_env(args)
        else:
            _, env = prepare_simple_launcher_cmd_env(args)
    except (ValueError, KeyError, TypeError, AssertionError) as e:
        raise TaxfreeError(f"{config_file}: {str(e).splitlines()[0]}") from None
    # What the caller exported already reaches the ranks unchanged (and wins over the config).
    out = {k: v for k, v in env.items() if k.startswith(("ACCELERATE_", "FSDP_")) and k not in os.environ}
    ds_file = out.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if ds_file and not os.path.isabs(ds_file):
        out["ACCELERATE_DEEPSPEED_CONFIG_FILE"] = os.path.abspath(ds_file)
    return out


def _main(argv: list[str]) -> int:
    import json
    import sys

    if argv[:1] == ["discover"]:  # `mpirun -n 2 python -m taxfree.distributed discover`
        print(json.dumps(discover_mpi() or {}, sort_keys=True), flush=True)
        return 0
    if len(argv) == 2 and argv[0] == "env":  # NUL-separated KEY=VALUE for scripts/launch_mpi.sh
        for k, v in sorted(accelerate_env(argv[1]).items()):
            sys.stdout.write(f"{k}={v}\0")
        return 0
    print("usage: python -m taxfree.distributed discover | env ACCELERATE_CONFIG", file=sys.stderr)
    return 2


if __name__ == "__main__":
    import sys

    try:
        sys.exit(_main(sys.argv[1:]))
    except TaxfreeError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
