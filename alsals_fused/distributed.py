"""Data-parallel and sharded training support for the ALSALS driver (docs/algorithm.md section 6).

Two kinds of reduction, over two kinds of group:

* Losses (L0 and every trial loss) are averaged over the **data-parallel group**
  (``process_group=``), so every rank takes the same decisions.  Under DDP that is the world; under
  FSDP2 on a 1-D mesh also the world; under HSDP (a 2-D ``(replicate, shard)`` mesh) still every
  rank, because each rank sees its own mini-batch.
* Partial sums over parameters (the gradient sum of squares, the two slopes) are added over the
  **shard group only**: the mesh dimensions along which a DTensor parameter is ``Shard``-ed.  A
  replicated dimension holds the same values on every member and must not be added again (on a
  2-D mesh only the shard dimension is reduced).  Plain (non-DTensor) parameters are replicated:
  their sums are not reduced at all, unless ``sharded=True`` says the user shards them over
  ``process_group`` by hand (the reduction is then over ``process_group``).

The backends never see a DTensor: the driver hands them the local shards (``to_local()``, which
shares storage with the DTensor), so every backend's passes run unchanged on FSDP2 parameters.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple, TypeGuard, Union, overload

from torch import Tensor

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor, Shard
else:
    try:
        from torch.distributed.tensor import DTensor, Shard
    except ImportError:                              # pragma: no cover (torch without distributed)
        DTensor = None
        Shard = None


def is_dtensor(t: object) -> TypeGuard[DTensor]:
    return DTensor is not None and isinstance(t, DTensor)


@overload
def local(t: Tensor) -> Tensor: ...
@overload
def local(t: None) -> None: ...
def local(t: Optional[Tensor]) -> Optional[Tensor]:
    """The local shard of a DTensor (same storage), or the tensor itself."""
    return t.to_local() if is_dtensor(t) else t


@dataclass(frozen=True)
class ShardSpec:
    """The mesh dimensions a DTensor parameter is sharded over."""

    mesh: DeviceMesh                                 # hashable
    dims: Tuple[int, ...]

    def groups(self) -> List[ProcessGroup]:
        return [self.mesh.get_group(d) for d in self.dims]


BY_PROCESS_GROUP = "process_group"                   # key: plain tensors with sharded=True
# What shard_key returns: None (replicated), a ShardSpec (DTensor) or BY_PROCESS_GROUP.
ShardKey = Optional[Union[ShardSpec, str]]


def shard_key(p: Tensor, sharded: bool) -> ShardKey:
    """None (replicated: no reduction), a ShardSpec (DTensor), or BY_PROCESS_GROUP."""
    if is_dtensor(p):
        dims = tuple(i for i, pl in enumerate(p.placements) if isinstance(pl, Shard))
        if not dims or p.device_mesh.size() == 1:
            return None
        return ShardSpec(p.device_mesh, dims)
    return BY_PROCESS_GROUP if sharded else None


def needs_process_group(params: Sequence[Tensor]) -> bool:
    """DTensor parameters on a mesh of more than one rank: losses must be averaged."""
    return any(is_dtensor(p) and p.device_mesh.size() > 1 for p in params)


def fsdp_modules(params: Sequence[Tensor], module=None) -> tuple:
    """The FSDP2 modules (``fully_shard``) that hold any of ``params``, for ``reshard_all``.

    FSDP2 keeps an unsharded copy of a module's parameters after a forward that does not reshard
    (the root module by default, ``reshard_after_forward=False``, any forward under no_grad), and
    the next forward reuses that copy without all-gathering again; after the optimizer writes the
    sharded parameters that copy is stale.  The modules are found through torch's registry of
    composable states (every ``fully_shard`` module is in it), else among ``module.modules()``
    (``buffers=model``); RuntimeError when DTensor parameters remain and neither is available."""
    dtensors = [p for p in params if is_dtensor(p)]
    if not dtensors:
        return ()
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:                              # pragma: no cover (torch without FSDP2)
        return ()
    ids = {id(p) for p in dtensors}
    try:
        from torch.distributed._composable_state import _module_state_mapping
        candidates = list(_module_state_mapping.keys())
    except ImportError:                              # pragma: no cover (a torch that moved it)
        if module is None:
            raise RuntimeError(
                "ALSALS: DTensor (FSDP2) parameters, and this torch does not say which modules hold "
                "them; pass buffers=model so the optimizer can reshard the model after it writes "
                "the parameters (FSDP2 would otherwise reuse a stale unsharded copy)") from None
        return tuple(m for m in module.modules() if isinstance(m, FSDPModule))
    found = []
    for m in candidates:
        if not isinstance(m, FSDPModule):
            continue
        state = m._get_fsdp_state()
        groups = getattr(state, "_fsdp_param_groups", None)
        if groups is None:                           # torch < 2.8: one group per state
            group = getattr(state, "_fsdp_param_group", None)
            groups = [group] if group is not None else []
        if any(id(fp.sharded_param) in ids for g in groups for fp in g.fsdp_params):
            found.append(m)
    return tuple(found)


def reshard_all(modules: tuple) -> None:
    """Reshard FSDP2 modules (no-op for those already sharded): their next forward all-gathers
    the parameters as they are now."""
    for m in modules:
        m.reshard()


def all_reduce_sum(value: Tensor, group) -> Tensor:
    import torch.distributed as dist
    dist.all_reduce(value, group=group)              # SUM (gloo has no AVG)
    return value


def mean_over(value: Tensor, group) -> Tensor:
    """Average a (loss) tensor over ``group`` (a SUM all-reduce divided by the group's size: gloo
    has no AVG); a copy, never in place (it may alias the loss returned to the user)."""
    if group is None:
        return value
    import torch.distributed as dist
    value = all_reduce_sum(value.clone(), group)
    return value / dist.get_world_size(group)


def sum_partials(partials: Sequence[Tensor], keys: Sequence[ShardKey], process_group) -> Tensor:
    """Add per-bucket partial sums (all the same shape), reducing each over its shard group.

    Buckets with the same key are added locally first, in bucket order, then reduced with one
    collective per key (keys in order of first appearance, the same on every rank).
    """
    by_key: Dict[ShardKey, Tensor] = {}
    for value, key in zip(partials, keys):     # a copy: a backend may reuse its output buffer
        by_key[key] = value.clone() if key not in by_key else by_key[key] + value
    total: Optional[Tensor] = None
    for key, value in by_key.items():
        if key is BY_PROCESS_GROUP:
            value = all_reduce_sum(value, process_group)
        elif key is not None:
            assert isinstance(key, ShardSpec), f"unknown shard key {key!r} (see shard_key)"
            for group in key.groups():
                value = all_reduce_sum(value, group)
        total = value if total is None else total + value
    assert total is not None, "sum_partials needs at least one partial sum"
    return total


__all__ = ["is_dtensor", "local", "ShardSpec", "shard_key", "needs_process_group", "mean_over",
           "sum_partials", "BY_PROCESS_GROUP", "fsdp_modules", "reshard_all"]
