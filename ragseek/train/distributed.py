"""Several processes, one run: torchrun's ranks, DDP or FSDP2 around the trained model, each rank's share of a
global batch, metrics reduced over the ranks, and checkpoints of full weights that resume at any world size.

    python -m ragseek.train.sft --config configs/sft.yaml                                   # one process
    torchrun --nproc-per-node 4 -m ragseek.train.sft --config configs/sft.yaml              # 4: the same run

A recipe's lines (in one process each is a no-op):

    world = World.join(cfg.loop)           # torchrun's process group: gloo on CPU, nccl on GPU (cuda:LOCAL_RANK)
    sampler = EpochSampler(n, cfg.batch_size, seed, world=world)    # batch_size stays global; next_batch() is
                                                                    # this rank's contiguous 1/W of it
    trained = world.parallelize(model, cfg.loop)    # loop.parallel: DDP, or FSDP2 per block; before the optimizer
    optimizer = build_optimizer(model, cfg.loop)
    run = start_run(cfg, cfg.loop, trained, optimizer, sampler)     # every rank resumes; rank 0 alone writes
    metrics = train_step(optimizer, micro, loss_fn, cfg.loop, step, trained)   # the loss through DDP; reduced

What a global batch means at W ranks. The sampler draws the same global batch as one process would (one seeded
order, one position), and rank r trains on its r-th contiguous W-th, split into loop.grad_accum micro-batches.
The gradient is the mean over ranks (DDP's all-reduce, FSDP's reduce-scatter) of each rank's mean over its
micro-batches: with a loss that is a mean over examples (SFT's sequence mean, distillation, DPO, the reward model,
PPO, GRPO's grpo and dr_grpo) that is the one-process gradient of the whole batch, so the loss curve is the same at
any W up to rounding. A loss that is a mean over the tokens of a micro-batch (SFT reduction=token, GRPO dapo)
weighs tokens within each micro-batch, as one process does with grad_accum = W x loop.grad_accum. Pretraining's
windows are drawn from torch's generator, the same on every rank, and each rank takes its share of them.

Checkpoints hold full tensors, the single-process layout: under FSDP every rank gathers its shards (`full_state`)
and rank 0 writes; on resume every rank reads the files and keeps its own shard (`load_full_state`). So a
checkpoint written by N ranks resumes on M, and one written by `python -m` resumes under torchrun. Gathering
needs the full model in each rank's memory for a moment, which DCP's sharded checkpoints avoid: fine while one
rank can hold the model (everything ragseek trains), the thing to change beyond that.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import itertools
import os
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, distribute_tensor

if TYPE_CHECKING:
    from ragseek.train.loop import LoopConfig

T = TypeVar("T")

# what to check when the ranks cannot meet (after torch's own error)
RENDEZVOUS_HELP = (
    "launch every node with torchrun and the same --nnodes, --nproc-per-node and --master-addr/--master-port "
    "(or --rdzv-endpoint), each with its own --node-rank; a rank waits loop.dist_timeout={timeout:g} s for the others"
)


@dataclass
class World:
    """This process's place among torchrun's: its rank of `size`, its local rank on the node and its device.
    Without torchrun, rank 0 of 1 on the CPU."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @classmethod
    def join(cls, loop: LoopConfig) -> World:
        """torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) -> the process group:
        nccl with this rank on cuda:LOCAL_RANK when CUDA is there, else gloo on the CPU. A plain `python -m` run is
        one process on the CPU. Joining twice in one process (recipes run one after another) reuses the group."""
        env = os.environ
        size = int(env.get("WORLD_SIZE", "1"))
        if size == 1 and "LOCAL_RANK" not in env:
            return cls()
        rank, local_rank = int(env.get("RANK", "0")), int(env.get("LOCAL_RANK", "0"))
        cuda = torch.cuda.is_available()
        device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)
        if size > 1 and not dist.is_initialized():
            try:
                dist.init_process_group(
                    "nccl" if cuda else "gloo",
                    timeout=timedelta(seconds=loop.dist_timeout),
                    device_id=device if cuda else None,
                )
            except (ValueError, RuntimeError) as e:
                raise ValueError(
                    f"rank {rank} of WORLD_SIZE={size} could not join the others at "
                    f"{env.get('MASTER_ADDR', '(no MASTER_ADDR)')}:{env.get('MASTER_PORT', '(no MASTER_PORT)')}: "
                    f"{' '.join(str(e).split())}\n{RENDEZVOUS_HELP.format(timeout=loop.dist_timeout)}"
                ) from e
            atexit.register(_leave)
        return cls(rank, size, local_rank, device)

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes metrics, plots, checkpoints and the final model, and prints."""
        return self.rank == 0

    def share(self, n: int) -> slice:
        """This rank's contiguous part of n global items (rank r: [r·n/W, (r+1)·n/W)); n must split evenly."""
        if n % self.size:
            raise ValueError(
                f"a global batch of {n} does not split evenly over {self.size} ranks (torchrun's --nnodes x "
                f"--nproc-per-node): make the recipe's batch (batch_size, prompts_per_step) a multiple of {self.size}"
            )
        return slice(self.rank * n // self.size, (self.rank + 1) * n // self.size)

    def eval_share(self, items: Sequence[T]) -> tuple[list[T], int]:
        """This rank's part of an evaluation's n items, so the ranks split it instead of each scoring them all, and
        how many of the part are real: the c = ⌈n/W⌉ items from r·c, padded to c with repeats of the last item, so
        that every rank runs as many batches (an FSDP forward is a collective). Each item's value, gathered in rank
        order (`gather`), then cut to the first n, is the items' values in order: what one process computes."""
        if self.size == 1:
            return list(items), len(items)
        c = -(-len(items) // self.size)
        part = list(items[self.rank * c : (self.rank + 1) * c])
        return part + [items[-1]] * (c - len(part)), len(part)

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (writing a file once: pretraining's token files, distillation's teacher
        answers), the other ranks after it (reading it): each waits at most loop.dist_timeout."""
        if not self.main:
            self.barrier()
        yield
        if self.main:
            self.barrier()

    def sum(self, x: Tensor) -> Tensor:
        """x summed over the ranks (every rank gets it)."""
        if self.size == 1:
            return x
        out = x.detach().to(self.device, copy=True)
        dist.all_reduce(out)
        return out.to(x.device)

    def gather(self, x: Tensor) -> Tensor:
        """Each rank's x (equal shapes), concatenated along dim 0 in rank order: the global batch's values."""
        if self.size == 1:
            return x
        local = x.detach().to(self.device).contiguous()
        parts = [torch.empty_like(local) for _ in range(self.size)]
        dist.all_gather(parts, local)
        return torch.cat(parts).to(x.device)

    def reduce(self, metrics: Mapping[str, Any], summed: tuple[str, ...] = ()) -> dict[str, Any]:
        """Scalar metrics over the ranks, one all-reduce: the `summed` keys summed, the others averaged (each rank
        averaged over equal shares, so the mean of the means is the global mean); vectors stay this rank's."""
        out = dict(metrics)
        if self.size == 1:
            return out
        keys = sorted(k for k, v in out.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
        values = self.sum(torch.tensor([float(out[k]) for k in keys], dtype=torch.float64))
        for k, v in zip(keys, values.tolist(), strict=True):
            out[k] = v if k in summed else v / self.size
        return out

    def place(self, module: nn.Module) -> nn.Module:
        """`module` on this rank's device; on the CPU, as it is."""
        return module if self.device.type == "cpu" else module.to(self.device)

    def to_device(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """A batch's tensors on this rank's device (a no-op on the CPU)."""
        return {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}

    def parallelize(self, model: nn.Module, loop: LoopConfig) -> Parallel:
        """The trained model on this world (`Parallel`); call it before the optimizer sees the parameters."""
        return Parallel(model, self, loop)


def _leave() -> None:
    if dist.is_initialized():
        # the ranks leave together, so no rank tears gloo down while its peer still talks to it (a rank of the
        # 2-rank test launch aborted at exit, "terminate called without an active exception", in ~1 of 7 runs);
        # a peer already gone makes the barrier fail, which changes nothing here
        with contextlib.suppress(RuntimeError):
            dist.barrier()
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------------------------
# DDP, FSDP2


class _LossModule(nn.Module):
    """DDP reduces the gradients of a backward only when its forward ran through DDP, and a recipe's loss calls
    more than `model.forward` (hidden_states, the head on some positions, a KV cache): so DDP wraps this module,
    whose forward is the recipe's loss function, and whose parameters are the trained model's."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, loss_fn: Callable[[Any], Any], batch: Any) -> Any:
        return loss_fn(batch)


class Parallel:
    """The trained model on a world: as it is in one process; under torchrun with loop.parallel
      ddp   every rank holds the whole model; DistributedDataParallel around the loss all-reduces (averages) the
            gradients during backward, bucket by bucket; with grad_accum > 1 only the last micro-batch syncs.
      fsdp  FSDP2: `fully_shard` on every transformer Block, then on each root (the model; PPO's policy and critic):
            parameters, gradients and AdamW moments are sharded over the ranks, a block's weights are all-gathered
            for its forward and backward and its gradients reduce-scattered; with loop.dtype=bf16 the gathered
            weights are bf16 (MixedPrecisionPolicy) and gradients are reduced in fp32. `hidden_states` is a
            forward method of each Transformer root, so a recipe calls it, the head and the KV cache as in one
            process.
    `model` stays the recipe's module (sharded in place by fsdp); recipes keep calling it directly."""

    def __init__(self, model: nn.Module, world: World, loop: LoopConfig):
        from ragseek.model.transformer import Transformer

        for m in model.modules():
            if isinstance(m, Transformer):
                m.activation_checkpointing = loop.activation_checkpointing
        self.model, self.world = world.place(model), world
        self.kind = loop.parallel if world.size > 1 else None
        self.ddp: nn.Module | None = None
        self._skeleton: nn.Module | None = None
        if self.kind == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            # a recipe may leave weights out of its loss (MTP heads in SFT); torch warns once when it leaves none
            self.ddp = DistributedDataParallel(
                _LossModule(model),
                device_ids=[world.device.index] if world.device.type == "cuda" else None,
                find_unused_parameters=True,
                forward_sync_buffers=False,
            )
        elif self.kind == "fsdp":
            # the module without its weights (meta tensors): what `full_module` fills for the final save
            self._skeleton = _meta_copy(model)
            shard_blocks(model, loop.dtype)

    @property
    def sharded(self) -> bool:
        return self.kind == "fsdp"

    def forward(self, loss_fn: Callable[[Any], Any], batch: Mapping[str, Any]) -> Any:
        """loss_fn(batch) with the batch on this rank's device, through DDP under ddp."""
        batch = self.world.to_device(batch)
        return self.ddp(loss_fn, batch) if self.ddp is not None else loss_fn(batch)

    def sync(self, last: bool) -> contextlib.AbstractContextManager:
        """Around one micro-batch's forward and backward: DDP all-reduces only on the last one."""
        return self.ddp.no_sync() if self.ddp is not None and not last else contextlib.nullcontext()

    def full_module(self, module: nn.Module | None = None) -> nn.Module | None:
        """`module` (the model or one of its submodules, e.g. PPO's policy) with full weights, as `save_final`
        wants it: the module itself unless sharded; sharded, every rank gathers and rank 0 gets an unsharded copy
        (the others None)."""
        module = self.model if module is None else module
        if not self.sharded:
            return module
        name = next(n for n, m in self.model.named_modules() if m is module)
        state = full_state(module)
        if not self.world.main:
            return None
        # to_empty unties a tied head: each name is loaded
        plain = self._skeleton.get_submodule(name).to_empty(device="cpu")
        load_full_state(plain, *state)
        # buffers outside the state dict (rotary tables) are not sharded: copy them over
        with torch.no_grad():
            for (_, dst), (_, src) in zip(plain.named_buffers(), module.named_buffers(), strict=True):
                dst.copy_(src)
        return plain


def shard_blocks(model: nn.Module, dtype: str) -> None:
    """FSDP2 in place: fully_shard every transformer Block, then each root (a ModuleDict's values, else the model),
    with `hidden_states` registered as a forward method of the Transformer roots."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    from ragseek.model.transformer import Block, Transformer
    from ragseek.train.loop import AUTOCAST_DTYPES

    amp = AUTOCAST_DTYPES[dtype]
    mp = MixedPrecisionPolicy(param_dtype=amp, reduce_dtype=torch.float32 if amp else None)
    for m in list(model.modules()):
        if isinstance(m, Block):
            fully_shard(m, mp_policy=mp)
    for root in model.values() if isinstance(model, nn.ModuleDict) else [model]:
        fully_shard(root, mp_policy=mp)
        if isinstance(root, Transformer):
            register_fsdp_forward_method(root, "hidden_states")


def _meta_copy(model: nn.Module) -> nn.Module:
    """A deep copy of `model` whose parameters and buffers are meta tensors (no memory; ties kept)."""
    memo: dict[int, Any] = {}
    for t in itertools.chain(model.parameters(), model.buffers()):
        meta = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(meta, t.requires_grad) if isinstance(t, nn.Parameter) else meta
    return copy.deepcopy(model, memo)


# ---------------------------------------------------------------------------------------------------------------------
# full state: what checkpoints hold at any world size


def full(t: Tensor) -> Tensor:
    """A tensor in full: a DTensor's shards gathered (every rank calls this for it), else the tensor."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def _shard_like(value: Tensor, like: Any) -> Tensor:
    """A full tensor as `like` holds it: this rank's shard of it when `like` is a DTensor (no communication)."""
    if not isinstance(like, DTensor):
        return value
    value = value.to(device=like.device, dtype=like.dtype)
    return distribute_tensor(value, like.device_mesh, like.placements, src_data_rank=None)


def _tied_names(module: nn.Module) -> Iterator[list[str]]:
    """The state-dict names of each parameter or buffer, several for a tensor held twice (a tied head)."""
    state = module.state_dict(keep_vars=True)
    names: dict[int, list[str]] = defaultdict(list)
    tensors = itertools.chain(
        module.named_parameters(remove_duplicate=False), module.named_buffers(remove_duplicate=False)
    )
    for name, t in tensors:
        if name in state:
            names[id(t)].append(name)
    covered = {n for group in names.values() for n in group}
    yield from names.values()
    yield from ([n] for n in state if n not in covered)


def full_state(module: nn.Module) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Every weight and persistent buffer of `module`, in full (sharded ones gathered: every rank calls this), a
    tensor held under several names stored once under the first of them sorted, as safetensors' `save_model`
    does; and {each other name: the kept one}, the file's metadata."""
    state = module.state_dict()
    tensors, aliases = {}, {}
    for names in _tied_names(module):
        keep = sorted(names)[0]
        tensors[keep] = full(state[keep]).detach().contiguous()
        aliases.update({n: keep for n in names if n != keep})
    return tensors, aliases


def load_full_state(
    module: nn.Module, tensors: Mapping[str, Tensor], aliases: Mapping[str, str] | None = None
) -> None:
    """Load full tensors (`full_state`'s, or a single-process checkpoint's) into `module`: a sharded parameter keeps
    this rank's shard of its tensor. A tied tensor may be stored under any of its names; `aliases` ({name: stored
    name}) gives the others for a module whose ties are undone. Weights that do not fit (another config) raise
    torch's RuntimeError naming them."""
    tensors = {**tensors, **{a: tensors[k] for a, k in (aliases or {}).items() if k in tensors}}
    state = module.state_dict(keep_vars=True)
    loaded = {}
    for names in _tied_names(module):
        stored = next((n for n in names if n in tensors), None)
        for n in names if stored is not None else ():
            loaded[n] = _shard_like(tensors[stored], state[n])
    loaded.update({k: v for k, v in tensors.items() if k not in loaded})
    module.load_state_dict(loaded, strict=True)


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's state_dict with sharded moments gathered in full (every rank calls this)."""
    sd = optimizer.state_dict()
    state = {i: {k: full(v) for k, v in s.items()} for i, s in sd["state"].items()}
    return {"state": state, "param_groups": sd["param_groups"]}


def load_full_optimizer_state(optimizer: torch.optim.Optimizer, sd: Mapping) -> None:
    """Load a full optimizer state_dict; a sharded parameter's moments keep this rank's shard."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = {
        i: {k: _shard_like(v, params[i]) if torch.is_tensor(v) and v.ndim else v for k, v in s.items()}
        for i, s in sd["state"].items()
    }
    optimizer.load_state_dict({"state": state, "param_groups": sd["param_groups"]})
