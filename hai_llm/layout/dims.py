"""One place that decides where every rank sits in the 4D (pp, dp, sp, ep) layout.

DeepSeek-V3 trains on 2048 GPUs as PP16 x DP128 with a 64-way expert-parallel group folded
inside the 128 data-parallel ranks of each pipeline stage and spanning 8 nodes
(docs/deepseek_v3.md#cluster-and-layout). Every part of the framework (launcher, ZeRO-1
optimizer, MoE all-to-all, DualPipe, sequence parallelism) must agree on which global rank
holds which coordinate, or collectives silently pair the wrong tensors. ``ParallelDims`` is that single source of truth:

* it validates the degrees against the world and the node size (``__post_init__``) and the
  model against the degrees (``check_experts``, ``check_seq_len``), raising ``ValueError``
  that names the fix; the schedule's rules live with the schedules (``layout.schedules``) and
  the whole layout is assembled and checked by ``layout.build_layout``;
* its rank arithmetic is pure Python, so the 2048-GPU layout is unit-testable without processes;
* ``build_mesh`` turns the same arithmetic into a named ``DeviceMesh`` plus process groups and
  checks that torch's groups contain exactly the ranks the arithmetic predicts.

Rank layout (fixed; sp innermost, then dp, then pp)::

    rank      = pp_rank * (dp * sp) + dp_rank * sp + sp_rank
    f         = dp_rank * sp + sp_rank          # "dp_sp" index inside a pipeline stage
    ep_rank   = f % ep                          # EP groups are contiguous blocks of ep ranks in f
    edp_rank  = f // ep                         # expert-data-parallel replica index
    edp       = dp * sp / ep                    # replicas of each expert inside a stage
    node      = rank // gpus_per_node,  local = rank % gpus_per_node

Groups: ``pp`` (same dp, sp; stride dp*sp), ``dp`` (same pp, sp; stride sp), ``sp`` (contiguous),
``dp_sp`` (the whole stage: the gradient group of dense parameters), ``ep`` (contiguous ep ranks
of one stage) and ``edp`` (ranks of one stage with the same ep_rank; stride ep).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

GROUP_NAMES = ("pp", "dp", "sp", "dp_sp", "ep", "edp")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass(frozen=True)
class ParallelDims:
    """Parallel degrees of one run; validated on construction.

    Node rules checked here (skipped when the whole world fits on one partial node,
    ``world_size < gpus_per_node``, because then nothing can straddle a node):

    * ``world_size`` is a multiple of ``gpus_per_node``;
    * ``ep <= gpus_per_node``: ``gpus_per_node % ep == 0``. EP groups start at multiples of ep
      (stages start at multiples of dp*sp, which ep divides) and node boundaries are multiples
      of gpus_per_node, hence of ep: an EP group always lies inside one node;
    * ``ep > gpus_per_node``: ``ep % gpus_per_node == 0``. Then gpus_per_node | ep | dp*sp, so
      stages and EP groups both start on node boundaries and an EP group is ep/gpus_per_node
      whole nodes.
    """

    world_size: int
    pp: int = 1
    dp: int = 1
    sp: int = 1
    ep: int = 1
    gpus_per_node: int = 8

    def __post_init__(self) -> None:
        for name in ("world_size", "pp", "dp", "sp", "ep", "gpus_per_node"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r} must be an integer >= 1")
        product = self.pp * self.dp * self.sp
        if product != self.world_size:
            raise ValueError(
                f"pp={self.pp} x dp={self.dp} x sp={self.sp} = {product} but "
                f"world_size={self.world_size}: {self._product_fix()}"
            )
        if self.stage_size % self.ep:
            raise ValueError(
                f"ep={self.ep} must divide dp x sp = {self.stage_size} (the EP group folds "
                f"inside the data-parallel ranks of a stage): choose ep in "
                f"{_divisors(self.stage_size)}"
            )
        gpn = self.gpus_per_node
        if self.world_size < gpn:
            return  # one partial node: every group is intra-node, nothing can straddle
        if self.world_size % gpn:
            raise ValueError(
                f"world_size={self.world_size} is not a whole number of nodes of "
                f"gpus_per_node={gpn}: use a multiple of {gpn} GPUs, or fewer than {gpn} "
                f"(a single partial node is allowed)"
            )
        if self.ep <= gpn and gpn % self.ep:
            raise ValueError(
                f"ep={self.ep} does not divide gpus_per_node={gpn}, so some EP group would "
                f"straddle two nodes unevenly: choose ep in {_divisors(gpn)} or a multiple of {gpn}"
            )
        if self.ep > gpn and self.ep % gpn:
            lower = self.ep // gpn * gpn
            raise ValueError(
                f"ep={self.ep} spans several nodes but is not a multiple of "
                f"gpus_per_node={gpn}: an EP group must cover whole nodes, change ep to "
                f"{lower} or {lower + gpn}"
            )

    def _product_fix(self) -> str:
        # Prefer changing dp (the degree the reference layout derives: 2048 / 16 = 128).
        if self.world_size % (self.pp * self.sp) == 0:
            return f"change dp to {self.world_size // (self.pp * self.sp)}"
        if self.world_size % (self.dp * self.sp) == 0:
            return f"change pp to {self.world_size // (self.dp * self.sp)}"
        return (
            f"world_size must be a multiple of pp x sp = {self.pp * self.sp}; "
            f"change pp/sp or world_size"
        )

    # ----------------------------------------------------------------- derived sizes
    @property
    def stage_size(self) -> int:
        """Ranks per pipeline stage: dp * sp (the size of the ``dp_sp`` group)."""
        return self.dp * self.sp

    @property
    def edp(self) -> int:
        """Expert-data-parallel degree = copies of each expert inside a stage."""
        return self.stage_size // self.ep

    @property
    def n_nodes(self) -> int:
        # ceil: a world smaller than a node still occupies one node
        return -(-self.world_size // self.gpus_per_node)

    @property
    def nodes_per_ep_group(self) -> int:
        """How many nodes one EP group touches (1 when it fits inside a node)."""
        return max(1, self.ep // self.gpus_per_node)

    def group_size(self, name: str) -> int:
        self._check_name(name)
        return {"pp": self.pp, "dp": self.dp, "sp": self.sp, "dp_sp": self.stage_size,
                "ep": self.ep, "edp": self.edp}[name]

    # ----------------------------------------------------------------- model checks
    def check_experts(self, n_routed_experts: int, n_expert_groups: int) -> None:
        """Check that the routed experts fit this layout; raise ``ValueError`` naming the fix.

        * ``n_routed_experts % n_expert_groups == 0`` and ``n_routed_experts % ep == 0``.
        * expert groups vs nodes: one expert group never spans two nodes, and when an EP group
          spans several nodes (``ep > gpus_per_node``) ``n_expert_groups == ep / gpus_per_node``,
          so that each node hosts exactly one expert group and group-limited routing (keep the
          best M groups) is node-limited routing (each token crosses IB to at most M nodes).
          Production: 256 experts, ep 64 = 8 nodes, 8 groups -> 4 experts per GPU, 32 per node,
          one group per node. When ``ep <= gpus_per_node`` the whole EP group is one node and
          every expert group trivially lives on it.
        """
        e, g = n_routed_experts, n_expert_groups
        if e < 1 or g < 1:
            raise ValueError(f"n_routed_experts={e} and n_expert_groups={g} must be >= 1")
        if e % g:
            raise ValueError(
                f"n_routed_experts={e} does not split into n_expert_groups={g} equal groups: "
                f"choose n_expert_groups in {_divisors(e)}"
            )
        if e % self.ep:
            raise ValueError(
                f"n_routed_experts={e} is not divisible by ep={self.ep}: every EP rank must host "
                f"the same number of experts; choose ep in "
                f"{[d for d in _divisors(self.stage_size) if e % d == 0]}"
            )
        if self.ep > self.gpus_per_node and g != self.nodes_per_ep_group:
            # experts are laid out in order: rank k of the EP group hosts experts
            # [k*E/ep, (k+1)*E/ep); a node hosts gpus_per_node consecutive ranks, i.e.
            # E / nodes_per_ep_group consecutive experts, which must be exactly one group.
            per_node = e // self.ep * self.gpus_per_node
            raise ValueError(
                f"expert groups do not line up with nodes: ep={self.ep} spans "
                f"{self.nodes_per_ep_group} nodes ({per_node} experts per node) but "
                f"n_expert_groups={g} ({e // g} experts per group); group-limited routing is "
                f"node-limited only when each node hosts exactly one expert group: set "
                f"n_expert_groups={self.nodes_per_ep_group} or ep={g * self.gpus_per_node}"
            )

    def check_seq_len(self, seq_len: int) -> None:
        """With ``sp > 1`` each sp rank gets two chunks (i and 2*sp-1-i) to balance causal
        attention work, so ``seq_len % (2*sp) == 0``; raise ``ValueError`` naming the fix."""
        if self.sp > 1 and seq_len % (2 * self.sp):
            raise ValueError(
                f"seq_len={seq_len} must be divisible by 2*sp={2 * self.sp} (each sp rank takes "
                f"two load-balanced causal chunks): pad seq_len to "
                f"{-(-seq_len // (2 * self.sp)) * 2 * self.sp} or change sp"
            )

    # ----------------------------------------------------------------- rank arithmetic
    def rank_of(self, pp: int, dp: int, sp: int) -> int:
        for name, value, size in (("pp", pp, self.pp), ("dp", dp, self.dp), ("sp", sp, self.sp)):
            if not 0 <= value < size:
                raise ValueError(f"{name} coordinate {value} out of range [0, {size})")
        return pp * self.stage_size + dp * self.sp + sp

    def coords(self, rank: int) -> dict[str, int]:
        """All coordinates of ``rank``: pp, dp, sp, dp_sp, ep, edp, node, local."""
        self._check_rank(rank)
        pp_rank, f = divmod(rank, self.stage_size)  # stage, then index inside the stage
        dp_rank, sp_rank = divmod(f, self.sp)
        edp_rank, ep_rank = divmod(f, self.ep)
        node, local = divmod(rank, self.gpus_per_node)
        return {"pp": pp_rank, "dp": dp_rank, "sp": sp_rank, "dp_sp": f, "ep": ep_rank,
                "edp": edp_rank, "node": node, "local": local}

    def group_ranks(self, name: str) -> list[list[int]]:
        """Every group of kind ``name``, each a sorted list of global ranks.

        The order of the groups is deterministic (it is the order in which ``build_mesh``
        creates the ep/edp groups, and every rank must create groups in the same order).
        """
        self._check_name(name)
        s, S = self.sp, self.stage_size
        if name == "pp":  # fixed (dp, sp); pp varies with stride S
            return [[p * S + f for p in range(self.pp)] for f in range(S)]
        if name == "dp":  # fixed (pp, sp); dp varies with stride sp
            return [[p * S + d * s + k for d in range(self.dp)]
                    for p in range(self.pp) for k in range(s)]
        if name == "sp":  # fixed (pp, dp); sp contiguous
            return [[p * S + d * s + k for k in range(s)]
                    for p in range(self.pp) for d in range(self.dp)]
        if name == "dp_sp":  # a whole stage
            return [list(range(p * S, (p + 1) * S)) for p in range(self.pp)]
        if name == "ep":  # contiguous block of ep ranks of one stage
            return [[p * S + e * self.ep + k for k in range(self.ep)]
                    for p in range(self.pp) for e in range(self.edp)]
        # edp: same stage, same ep_rank; edp_rank varies with stride ep
        return [[p * S + e * self.ep + k for e in range(self.edp)]
                for p in range(self.pp) for k in range(self.ep)]

    def group_of(self, name: str, rank: int) -> list[int]:
        """The group of kind ``name`` that contains ``rank`` (computed directly, O(group size))."""
        self._check_name(name)
        c = self.coords(rank)
        S, base = self.stage_size, c["pp"] * self.stage_size
        if name == "pp":
            return [p * S + c["dp_sp"] for p in range(self.pp)]
        if name == "dp":
            return [base + d * self.sp + c["sp"] for d in range(self.dp)]
        if name == "sp":
            return [base + c["dp"] * self.sp + k for k in range(self.sp)]
        if name == "dp_sp":
            return list(range(base, base + S))
        if name == "ep":
            return [base + c["edp"] * self.ep + k for k in range(self.ep)]
        return [base + e * self.ep + c["ep"] for e in range(self.edp)]

    def nodes_of_group(self, ranks: list[int]) -> list[int]:
        """Sorted distinct node ids hosting ``ranks``."""
        for r in ranks:
            self._check_rank(r)
        return sorted({r // self.gpus_per_node for r in ranks})

    def describe(self) -> str:
        """A short table: size, number of groups, rank stride and nodes touched per group kind."""
        strides = {"pp": self.stage_size, "dp": self.sp, "sp": 1, "dp_sp": 1, "ep": 1,
                   "edp": self.ep}
        lines = [
            f"ParallelDims world={self.world_size} nodes={self.n_nodes} "
            f"({self.gpus_per_node} GPUs/node) pp={self.pp} dp={self.dp} sp={self.sp} "
            f"ep={self.ep} edp={self.edp}",
            f"  {'group':<6}{'size':>6}{'groups':>8}{'stride':>8}{'nodes':>7}",
        ]
        for name in GROUP_NAMES:
            size = self.group_size(name)
            first = self.group_of(name, 0)
            lines.append(
                f"  {name:<6}{size:>6}{self.world_size // size:>8}"
                f"{strides[name] if size > 1 else 0:>8}{len(self.nodes_of_group(first)):>7}"
            )
        return "\n".join(lines)

    # ----------------------------------------------------------------- torch.distributed
    def build_mesh(self, device_type: str = "cpu") -> "MeshGroups":
        """Build the (pp, dp, sp) DeviceMesh, the flattened dp_sp mesh and the ep/edp groups.

        Must be called by every rank of an initialized default process group of size
        ``world_size``. ep and edp groups are always separate communicators (even when they
        coincide with dp_sp, i.e. ep == dp*sp or ep == 1) so that the MoE all-to-all and the
        dense-gradient reduction never serialize on one communicator's stream.
        """
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh

        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("build_mesh needs torch.distributed.init_process_group first")
        if dist.get_world_size() != self.world_size:
            raise ValueError(
                f"default process group has {dist.get_world_size()} ranks but "
                f"ParallelDims.world_size={self.world_size}"
            )
        mesh = init_device_mesh(
            device_type, (self.pp, self.dp, self.sp), mesh_dim_names=("pp", "dp", "sp")
        )
        # Keep the mesh object _flatten returns: slicing a flattened name back out of the
        # root mesh (mesh["dp_sp"]) is deprecated in recent torch.
        sub = mesh["dp", "sp"]
        if hasattr(sub, "_flatten"):
            dp_sp_mesh = sub._flatten("dp_sp")
            dp_sp_group = dp_sp_mesh.get_group()
        else:  # torch without DeviceMesh._flatten: plain process groups, same ranks
            dp_sp_mesh = None
            dp_sp_group, _ = dist.new_subgroups_by_enumeration(self.group_ranks("dp_sp"))
        ep_group, _ = dist.new_subgroups_by_enumeration(self.group_ranks("ep"))
        edp_group, _ = dist.new_subgroups_by_enumeration(self.group_ranks("edp"))
        groups = {"pp": mesh.get_group("pp"), "dp": mesh.get_group("dp"),
                  "sp": mesh.get_group("sp"), "dp_sp": dp_sp_group, "ep": ep_group,
                  "edp": edp_group}
        rank = dist.get_rank()
        for name, group in groups.items():  # torch's groups must match our arithmetic
            got = sorted(dist.get_process_group_ranks(group))
            want = self.group_of(name, rank)
            if got != want:
                raise RuntimeError(f"rank {rank}: torch built {name} group {got}, expected {want}")
        return MeshGroups(dims=self, mesh=mesh, dp_sp_mesh=dp_sp_mesh, global_rank=rank,
                          groups=groups)

    # ----------------------------------------------------------------- helpers
    def _check_rank(self, rank: int) -> None:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} out of range [0, {self.world_size})")

    @staticmethod
    def _check_name(name: str) -> None:
        if name not in GROUP_NAMES:
            raise ValueError(f"unknown group {name!r}: use one of {GROUP_NAMES}")


@dataclass
class MeshGroups:
    """The process groups of one rank, as built by ``ParallelDims.build_mesh``.

    ``mesh`` is the 3D (pp, dp, sp) DeviceMesh; ``dp_sp_mesh`` the flattened 1D dp x sp mesh
    (for FSDP/DTensor-style users; None on torch without ``DeviceMesh._flatten``).
    """

    dims: ParallelDims
    mesh: Any
    dp_sp_mesh: Any
    global_rank: int
    groups: dict[str, Any] = field(default_factory=dict)

    @property
    def dense_grad_group(self) -> Any:
        """Gradients of dense (non-expert) parameters are reduced over the whole stage."""
        return self.groups["dp_sp"]

    def group(self, name: str) -> Any:
        ParallelDims._check_name(name)
        return self.groups[name]

    def rank(self, name: str) -> int:
        """This rank's index inside its ``name`` group."""
        ParallelDims._check_name(name)
        return self.dims.coords(self.global_rank)[name]

    def size(self, name: str) -> int:
        return self.dims.group_size(name)

    def ranks(self, name: str) -> list[int]:
        """Global ranks of this rank's ``name`` group."""
        return self.dims.group_of(name, self.global_rank)
