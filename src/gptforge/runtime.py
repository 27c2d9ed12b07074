"""Where and how the numbers are computed: device, precision, TF32, and the distributed set-up (DDP, FSDP)."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch

from .errors import OptionError

TORCH_FLOOR = (2, 6)  # fully_shard is public from 2.6; fused AdamW on the CPU from 2.4 (pyproject says the same)


def torch_version(version: str | None = None) -> tuple[int, int]:
    major, minor = (version or torch.__version__).split("+")[0].split(".")[:2]
    return int(major), int(minor)


def require_torch(floor: tuple[int, int], feature: str, version: str | None = None) -> None:
    """Raise a clear error when the installed torch is older than `floor` for `feature`."""
    if torch_version(version) < floor:
        raise OptionError(
            f"{feature} needs torch>={floor[0]}.{floor[1]} (installed: {version or torch.__version__}); "
            "upgrade torch or leave the option out"
        )


DEVICE_TYPES = ("cpu", "cuda", "mps")  # where gptforge trains and generates; torch names more (xla, xpu, meta, ...)


def mps_available() -> bool:
    """Whether torch can use an Apple GPU here (Metal Performance Shaders; torch built for macOS on Apple silicon)."""
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(name: str = "auto") -> torch.device:
    """The one place a device is chosen. `auto` is CUDA when there is a GPU, else Apple's GPU (mps) on a Mac
    that has one, else the CPU; anything else as torch names it. A device type gptforge does not run on, or
    one this machine does not have, is refused in one line with what it has."""
    if name == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "mps" if mps_available() else "cpu")
    else:
        try:
            device = torch.device("cuda" if name == "gpu" else name)
        except (RuntimeError, TypeError):
            raise OptionError(f"--device {name!r}: not a device name; use auto, cpu, cuda, cuda:N or mps") from None
        if device.type not in DEVICE_TYPES:
            raise OptionError(
                f"--device {name}: gptforge runs on cpu, cuda (NVIDIA and ROCm GPUs) and mps (Apple GPUs), "
                f"not on {device.type}; use --device auto"
            )
        if device.type == "cuda" and not torch.cuda.is_available():
            raise OptionError(f"--device {name}: this machine has no CUDA GPU that torch can use; use --device cpu")
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            raise OptionError(f"--device {name}: there are only {torch.cuda.device_count()} GPU(s)")
        if device.type == "mps" and not mps_available():
            raise OptionError(
                f"--device {name}: this machine has no Apple GPU that torch can use (mps needs torch for "
                "macOS on Apple silicon); use --device cpu"
            )
    configure(device)
    return device


def fused_optimizer(device: torch.device) -> bool:
    """Whether AdamW's fused kernel runs on `device`: on CUDA, and on the CPU from torch 2.4; not on mps,
    where the multi-tensor (foreach) version is used."""
    return device.type == "cuda" or (device.type == "cpu" and torch_version() >= (2, 4))


def configure(device: torch.device) -> None:
    """Per-device math settings: TF32 for fp32 matrix products and convolutions on CUDA (Ampere and newer
    run them several times faster, at the precision training needs)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def pick_precision(precision: str, device: torch.device) -> torch.dtype:
    """The autocast dtype for a run (float32 means no autocast).

    `auto` keeps CPUs at fp32: bf16 autocast turns off the fp32 fast paths of kernels.py, and on the two
    processors we measured it did not pay for that at the small sizes a CPU run trains (docs/training.md);
    where bf16 products are fast, `cpu_bf16_products` takes them without autocast.
    On CUDA, bf16 where the GPU has it; fp16 (with a gradient scaler) only where it does not. Apple's GPU
    (mps) trains in fp32: its mixed precision is not one gptforge has tested.
    """
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    choices = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if precision not in choices:
        raise OptionError(f"--precision {precision!r}: choose auto, fp32, bf16 or fp16")
    if device.type == "mps" and precision != "fp32":
        raise OptionError(
            f"--precision {precision}: on mps (Apple GPUs) gptforge trains in fp32; leave --precision auto or give fp32"
        )
    return choices[precision]


def cpu_bf16_products(precision: str, device: torch.device) -> bool:
    """Whether a run's fp32 CPU products take bf16 inputs (kernels.bf16_products): at `--precision auto`, on a
    processor where that was measured at least calibrate.BF16_GAIN times as fast (AMX, AVX-512 BF16). Like TF32
    on a GPU: activations, sums, weights and optimizer stay fp32; `--precision fp32` keeps every product fp32."""
    if precision != "auto" or device.type != "cpu":
        return False
    from .kernels import bf16_faster

    return bf16_faster()


# --- distributed ------------------------------------------------------------------------------------


@dataclass
class Dist:
    """This process's place in a torchrun job (rank 0 of 1 for a plain process)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # this run started the process group, so it ends it

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()

    def close(self) -> None:
        """Wait for every rank, then end the process group this run started. A rank that exits while
        another still writes, with gloo's threads alive, can abort with 'terminate called without an
        active exception'."""
        self.barrier()
        if self.owns_group:
            torch.distributed.destroy_process_group()
            self.owns_group = _started_group[0] = False


def out_of_memory(e: BaseException) -> bool:
    """Whether `e` is a failed allocation: CUDA's OutOfMemoryError, or the CPU allocator's RuntimeError."""
    return isinstance(e, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(e, RuntimeError) and ("can't allocate memory" in str(e) or "not enough memory" in str(e))
    )


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(device: torch.device) -> tuple[Dist, torch.device]:
    """Join the process group torchrun set up (WORLD_SIZE > 1); a plain process is rank 0 of 1."""
    if world_size() == 1:
        return Dist(), device
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        _started_group[0] = True
    return Dist(dist.get_rank(), dist.get_world_size(), local, _started_group[0]), device


SHARED_STORE_OFF = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"  # torchrun's switch: a fresh store for each round
_started_group = [False]  # whether gptforge started the process group (then the run that ends it is ours)


def restart_count() -> int:
    """How many times torchrun's elastic agent on this node has started its workers again (0: the first try)."""
    try:
        return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    except ValueError:
        return 0


def job_restarted(device_name: str = "auto") -> bool:
    """Whether torchrun (--max-restarts) has started this job's workers again after a failure, on any node.
    Each node's agent counts only its own failures: a node whose workers were healthy when another node's
    failed starts them again with a count of 0, so the ranks agree on the largest count (a collective: every
    rank calls this)."""
    count = restart_count()
    if world_size() == 1 or os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") == "0":  # no restarts, no collective
        return count > 0
    if int(os.environ.get("GROUP_WORLD_SIZE", "1")) > 1 and os.environ.get(SHARED_STORE_OFF) != "1":
        # torch shares its rendezvous store with the workers' process group and keeps the failed round's
        # addresses in it, which restarted workers then read (pytorch/pytorch#135712): they hang or fail
        raise OptionError(
            f"torchrun --max-restarts on several nodes: set {SHARED_STORE_OFF}=1 in torchrun's environment on "
            "every node, or restarted workers can wait for the processes they replaced (docs/multinode.md)"
        )
    dist, device = init_distributed(resolve_device(device_name))
    total = torch.tensor([count], device=device)
    torch.distributed.all_reduce(total, op=torch.distributed.ReduceOp.MAX)
    return int(total.item()) > 0


def shard_model(model: torch.nn.Module) -> None:
    """FSDP (PyTorch's fully_shard): each block is one unit of all-gather / reduce-scatter; the root holds
    the embeddings, the tied head and the final LayerNorm."""
    require_torch((2, 6), "--fsdp (torch.distributed.fsdp.fully_shard)")
    from torch.distributed.fsdp import fully_shard

    for block in model.transformer.h:
        fully_shard(block)
    fully_shard(model)


def lost_processes(failures: dict) -> list[str]:
    """One line per process of a torchrun job that a signal ended (`failures`: global rank -> torchrun's
    ProcessFailure, with local_rank, exitcode, pid); a process that failed with an error has said so itself."""
    import signal

    lines = []
    for rank, f in sorted(failures.items()):
        if f.exitcode < 0:
            try:
                name = signal.Signals(-f.exitcode).name
            except ValueError:
                name = f"signal {-f.exitcode}"
            lines.append(
                f"rank {rank} (local rank {f.local_rank}, pid {f.pid}) was ended by {name}; the launcher stopped "
                "the other processes (with torchrun --max-restarts the run continues from its newest checkpoint)"
            )
    return lines


def launch_torchrun(nproc: int, args: list[str]) -> int:
    """`gptforge train --nproc N ...` (its command-line `args`) is `torchrun --nproc_per_node N -m gptforge train ...`,
    launched in this process; returns the exit code."""
    argv, skip = [], False
    for a in args:
        if skip:
            skip = False
            continue
        if a == "--nproc":
            skip = True
            continue
        if a.startswith("--nproc="):
            continue
        argv.append(a)
    launch = ["--standalone", f"--nproc_per_node={nproc}", "-m", "gptforge", *argv]
    print("launching: torchrun", " ".join(launch), file=sys.stderr)
    # torchrun's launcher in this process, so that a failed or interrupted run ends with the processes' own
    # one-line error and exit code, not the launcher's traceback
    import logging

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        run(get_args_parser().parse_args(launch))
    except ChildFailedError as e:
        for line in lost_processes(e.failures):
            print(f"gptforge: {line}", file=sys.stderr)
        codes = [f.exitcode for f in e.failures.values()]
        return next((c for c in codes if c > 0), 1)
    except (SignalException, KeyboardInterrupt):
        return 130
    return 0


__all__ = [
    "DEVICE_TYPES",
    "TORCH_FLOOR",
    "Dist",
    "configure",
    "cpu_bf16_products",
    "fused_optimizer",
    "init_distributed",
    "job_restarted",
    "launch_torchrun",
    "lost_processes",
    "mps_available",
    "out_of_memory",
    "pick_precision",
    "require_torch",
    "resolve_device",
    "restart_count",
    "shard_model",
    "torch_version",
    "world_size",
]
