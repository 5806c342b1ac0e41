"""Data parallelism over processes with `torch.distributed`, as launched by `torchrun`.

    torchrun --nproc_per_node 2 run.py --model vae            # 2 processes on this machine (gloo on CPU)
    torchrun --nproc_per_node 8 run.py --model vae --device cuda      # one GPU per process (NCCL)

Every process (a rank) holds the whole model and takes its share of every batch. Three rules make
a run of N processes end where a run of one would, up to the order of floating-point sums:

- The objectives are sums over digits, so the gradient on the global batch is the sum of the
  shards' gradients: `World.sum` all-reduces them before the one optimizer step, which every rank
  takes from the same params (rank 0's, broadcast at the start).
- Every rank keeps the RNG state one process would have. `SameDraws` has each guide sample site
  draw for the whole global batch, as one process would, and keep its own rows; evaluation seeds
  each batch of digits with a number drawn for it from the run's seeded stream
  (`evaluate.per_digit_estimate`), so a shard of batches draws what one process draws for them.
  A checkpoint is therefore the same whatever the world size, and resumes in any.
- Rank 0 alone writes files, prints and shows progress.

`World()` is one process, where every collective is the identity, so shared code is written once.
"""

import os
import pickle
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from pyro.poutine.messenger import Messenger

from .config import SettingError

DATA_PLATE = "data"  # the plate over digits every family's model and guides use (see Family)


@dataclass(frozen=True)
class World:
    """The processes training one model: this one's `rank` among `size`."""

    rank: int = 0
    size: int = 1

    @property
    def main(self):
        """Rank 0: the one that writes, prints and shows progress."""
        return self.rank == 0

    def share(self, n):
        """This rank's contiguous share of range(n) (see `share_of`)."""
        return share_of(n, self.rank, self.size)

    @property
    def backend(self):
        """The collectives' library: gloo (CPU), nccl (CUDA); None for one process."""
        return dist.get_backend() if self.size > 1 else None

    def shard(self, batch):
        """This rank's rows of a global batch whose length the world size divides."""
        rows = len(batch) // self.size
        return batch[self.rank * rows:(self.rank + 1) * rows]

    # ---- collectives (the identity for one process) -----------------------------------------
    def sum(self, tensor):
        """The elementwise sum over ranks, in place, on every rank."""
        if self.size > 1:
            dist.all_reduce(tensor)
        return tensor

    def gather(self, tensor):
        """Every rank's tensor (lengths may differ) concatenated in rank order, on every rank."""
        if self.size == 1:
            return tensor
        lengths = torch.zeros(self.size, dtype=torch.long, device=tensor.device)
        lengths[self.rank] = len(tensor)
        longest = int(self.sum(lengths).max())
        padded = torch.zeros((longest, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
        padded[:len(tensor)] = tensor
        parts = [torch.empty_like(padded) for _ in range(self.size)]
        dist.all_gather(parts, padded)
        return torch.cat([part[:length] for part, length in zip(parts, lengths.tolist())])

    def logsumexp(self, tensor):
        """log sum over ranks of exp(tensor): partial log-sums of disjoint terms made whole."""
        if self.size == 1:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.size)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.logsumexp(torch.stack(parts), 0)

    def from_main(self, value):
        """Rank 0's `value` (any picklable object, tensors included), on every rank."""
        if self.size == 1:
            return value
        box = [value if self.main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def on_main(self, work):
        """`work()` on rank 0 only; its result on every rank, or its error raised on every rank."""
        failure = None
        try:
            outcome = (work(), None) if self.main else None
        except Exception as error:  # noqa: BLE001 (it is raised again, on every rank)
            failure, outcome = error, (None, sendable(error))
        result, error = self.from_main(outcome)
        if failure is not None:
            raise failure
        if error is not None:
            raise error
        return result

    def main_first(self, work):
        """`work()` on rank 0, then (if it worked) on the others: for work that fills a shared cache."""
        results = []
        self.on_main(lambda: results.append(work()))  # only whether it worked is sent, not the result
        return results[0] if self.main else work()

    def broadcast_params(self, params):
        """Rank 0's values of `params`, copied in place on every rank."""
        if self.size > 1:
            with torch.no_grad():
                for param in params:
                    dist.broadcast(param, src=0)


def share_of(n, index, count):
    """Share `index` of `count` contiguous shares of range(n); the first n % count shares hold one more."""
    per, extra = divmod(n, count)
    start = index * per + min(index, extra)
    return range(start, start + per + (index < extra))


def sendable(error):
    """`error`, or a RuntimeError saying it where it cannot be pickled to the other ranks."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:  # noqa: BLE001 (any failure to round-trip means: send its text instead)
        return RuntimeError(f"{type(error).__name__}: {error}")


ONE_PROCESS = World()


def current():
    """The world this process belongs to: torch.distributed's process group if one is initialized."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return ONE_PROCESS


def launched():
    """Whether torchrun (or another launcher setting its variables) started more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def launch_command(program):
    """How to start `program` ("python run.py", "ppl-models train") as this launch did: under torchrun,
    the torchrun command with this launch's processes (a multi-node launch's rendezvous flags are
    not known here: ``...`` stands for them)."""
    if not launched():
        return program
    size, per_node = int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
    nodes = f"--nnodes {size // per_node} ... " if size > per_node else ""
    script = program.removeprefix("python ") if program.startswith("python ") else f"--no-python {program}"
    return f"torchrun {nodes}--nproc_per_node {per_node} {script}"


def launched_as_main():
    """Whether this process is rank 0 of the launch (or not launched by torchrun at all)."""
    return int(os.environ.get("RANK", "0")) == 0


def start(device):
    """Join the process group torchrun described in the environment: gloo on CPU, NCCL on CUDA with
    GPU `LOCAL_RANK` for this process. Returns (world, this process's device)."""
    size, local_rank = int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0"))
    local_size = int(os.environ.get("LOCAL_WORLD_SIZE", size))
    if device.startswith("cuda"):
        gpus = torch.cuda.device_count()
        if device != "cuda":
            raise SettingError(f"`device='{device}'` names one GPU, but each of the {size} processes takes its own "
                               "(GPU LOCAL_RANK); use `device='cuda'`")
        if gpus < local_size:
            raise SettingError(f"`device='cuda'` with {local_size} processes on this machine needs {local_size} GPUs, "
                               f"one per process, and PyTorch sees {gpus}; start at most {gpus} "
                               "(torchrun --nproc_per_node)")
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    start_heartbeat(dist.get_rank())
    return current(), device


def stop():
    """Leave the process group, the heartbeat first (a thread left inside the store's client as the
    interpreter ends aborts the process)."""
    global _heart
    if _heart is not None:
        _heart[1].set()
        _heart[0].join(timeout=5)
        _heart = None
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ---- which rank stopped, and why -------------------------------------------------------------
# torchrun's key-value store (at MASTER_ADDR:MASTER_PORT, kept by the launcher, not by a rank) holds
# a counter per rank that a thread of the rank advances while it lives, and a failed rank's last
# word: after a collective fails, the survivors can say which rank stopped and why.
BEAT_SECONDS = 0.2
_store = None  # this process's client of the launcher's store; None where there is none
_heart = None  # (the heartbeat thread, the event that stops it)


def launcher_store():
    return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                         timeout=timedelta(seconds=30))


def start_heartbeat(rank):
    """A daemon thread that counts, in the launcher's store, that this rank is alive."""
    global _store, _heart
    if "MASTER_ADDR" not in os.environ:
        return
    _store, beats, stopping = launcher_store(), launcher_store(), threading.Event()  # the thread has its own client

    def beat():
        while not stopping.is_set():
            try:
                beats.add(f"ppl_models/beat/{rank}", 1)
            except (RuntimeError, ValueError):  # the launcher is gone: so is the job
                return
            stopping.wait(BEAT_SECONDS)

    _heart = threading.Thread(target=beat, name="ppl_models heartbeat", daemon=True), stopping
    _heart[0].start()


def stopped_ranks(world, wait=1.0):
    """After a collective failed: the ranks whose heartbeat did not move in `wait` seconds (None if
    there is no store to tell)."""
    if _store is None:
        return None
    keys = [f"ppl_models/beat/{rank}" for rank in range(world.size)]
    try:
        before = [_store.add(key, 0) for key in keys]
        time.sleep(wait)
        return [rank for rank, key in enumerate(keys) if _store.add(key, 0) == before[rank]]
    except (RuntimeError, ValueError):
        return None


def first_to_report():
    """Whether this rank is the first survivor to report the stop (then it says it; the others stay
    silent, even those that fail later, when the first has gone)."""
    try:
        return _store is None or _store.add("ppl_models/reported", 1) == 1
    except (RuntimeError, ValueError):
        return True


def leave_word(rank, message):
    """Keep this rank's error message where the survivors' report of its stop will read it."""
    if _store is not None:
        try:
            _store.set(f"ppl_models/word/{rank}", message)
        except (RuntimeError, ValueError):
            pass


def last_words(ranks):
    """{rank: the message it left} for those of `ranks` that left one."""
    words = {}
    for rank in ranks:
        key = f"ppl_models/word/{rank}"
        try:
            if _store is not None and _store.check([key]):
                words[rank] = _store.get(key).decode()
        except (RuntimeError, ValueError):
            pass
    return words


def failed_collective(error):
    """Whether `error` is a collective that failed because another rank went away."""
    return isinstance(error, getattr(dist, "DistError", ())) or (isinstance(error, RuntimeError) and any(
        phrase in str(error) for phrase in ("Connection closed by peer", "Connection reset", "Broken pipe", "gloo",
                                            "NCCL")))


class SameDraws(Messenger):
    """Draw a guide's per-digit latents as one process would for the whole global batch, and keep
    this rank's rows: the site's distribution is expanded to (world size, its batch shape), sampled
    in one call (so the random stream fills it in the order one process fills its (global batch,
    ...) draw), and indexed by rank, keeping reparameterized gradients. Every rank consumes the same
    random numbers, so the RNG state stays that of one process. Exactly one process's draws where
    the data plate is the leftmost batch dim (one particle); with particles to its left the draws
    are as random, but laid out differently. Enter it outside the ELBO, so that its particle plate
    has broadcast the site before this messenger sees it.

    It relies on a sampler using the random stream by position, whatever the parameters: true of
    Normal, Bernoulli, Categorical and the Concrete relaxation the guides use, not of rejection
    samplers (Gamma, Beta, Dirichlet, Poisson), with which ranks would drift apart. Sites outside
    the data plate (global latents) draw as usual: every rank then draws the same value."""

    def __init__(self, world):
        super().__init__()
        self.world = world

    def _pyro_sample(self, msg):
        if (msg["is_observed"] or msg["value"] is not None or msg["infer"].get("enumerate")
                or not any(frame.name == DATA_PLATE for frame in msg["cond_indep_stack"])):
            return
        fn = msg["fn"]
        draws = fn.expand((self.world.size, *fn.batch_shape))
        msg["value"] = (draws.rsample() if fn.has_rsample else draws.sample())[self.world.rank]
