"""Hardware profiles: what one device computes and moves per second, as data.

A profile is a YAML file in ``configs/hardware/`` (``h800``, ``h100``, ``h200``, ``a100``,
``b200``, and ``cpu_measured`` written by ``benchmarks/bench_calibrate_cpu.py``); every number
in it carries its source in a comment. The step simulator (``step_sim``) turns FLOPs into time
with the GEMM and attention rates below and bytes into time with the links:

* ``peak_tflops[dtype]``: dense peak of the GEMM datatype (``fp8``, ``bf16``, ``fp32``; a
  device without FP8 omits it and FP8 runs are priced at BF16);
* ``gemm_efficiency[dtype]``: achieved / peak of the GEMMs in a training step, from a
  published kernel measurement (for Hopper: DeepSeek's own training profile, see the YAML);
* ``attn_efficiency_fwd`` / ``_bwd``: achieved / BF16 peak of the attention core
  (FlashAttention forward and backward);
* ``nongemm_fraction``: the share of the compute stream spent outside GEMMs and attention
  (norms, casts to FP8, transposes, SwiGLU, routing: memory-bound work that FLOPs do not see);
* ``ep_link``: the expert-parallel all-to-all links, with exactly the fields of
  ``hai_llm.parallel.a2a_wire.LinkModel`` (``intra_gbps`` NVLink, ``inter_gbps`` InfiniBand
  per GPU, ``latency_us`` per exchange stage, ``time_scale``: 1 on real hardware, the scale of
  the emulation for simulated CPU ranks);
* ``net``: what the collectives and pipeline sends of the real transport reach (NCCL on GPUs,
  gloo on CPU): bandwidth and per-step latency within and across nodes;
* ``hbm_gbps``: memory bandwidth (prices the AdamW step over the ZeRO shard);
* ``shared_cores``: 0 for devices of their own; > 0 when all ranks of the job share that many
  CPU cores (simulated ranks): a rank computes at ``core_share`` of its solo rate while the
  others compute too (measured: cache and memory contention), and the step cannot be shorter
  than all ranks' CPU seconds over the cores (``step_sim``: time-sharing; a rank that waits or
  sleeps in the link emulation gives its core to another);
* ``net.a2a_cpu_us``: CPU seconds one expert dispatch or combine costs the rank that issues it
  (routing plan, packing, gloo's own threads): compute-stream time, not link time; likewise
  ``net.p2p_cpu_us`` per pipeline send or receive.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

DTYPES = ("fp8", "bf16", "fp32")
PROFILE_DIR = Path(__file__).resolve().parents[2] / "configs" / "hardware"


@dataclass(frozen=True)
class EpLink:
    """The all-to-all links; the fields of ``LinkModel`` (docs in ``a2a_wire``)."""

    intra_gbps: float
    inter_gbps: float
    latency_us: float
    time_scale: float = 1.0

    def stage_seconds(self, intra_bytes: float, inter_bytes: float) -> float:
        """``LinkModel.stage_seconds`` times the time scale: the emulated delay of one stage."""
        return self.time_scale * (self.latency_us * 1e-6 + max(intra_bytes / (self.intra_gbps * 1e9),
                                                               inter_bytes / (self.inter_gbps * 1e9)))


@dataclass(frozen=True)
class Net:
    """Collectives and point-to-point sends of the real transport."""

    intra_gbps: float
    inter_gbps: float
    intra_latency_us: float
    inter_latency_us: float
    # wall seconds of one dispatch/combine stage of the expert transport beyond its CPU (count
    # and payload exchanges; 0: priced by the ep_link alone, as on GPUs where DeepEP's kernels
    # are the transfer)
    a2a_latency_us: float = 0.0
    # CPU seconds per dispatch/combine on the issuing rank (0 on GPUs: the kernels run on the
    # device's copy engines / SMs already priced); simulated CPU ranks pay it on their core
    a2a_cpu_us: float = 0.0
    p2p_cpu_us: float = 0.0  # CPU seconds of one pipeline send or receive (gloo; 0 on GPUs)

    def seconds(self, nbytes: float, steps: int, cross_node: bool) -> float:
        """``steps`` ring steps moving ``nbytes`` in all (per rank) over one link class."""
        bw, lat = (self.inter_gbps, self.inter_latency_us) if cross_node else (self.intra_gbps, self.intra_latency_us)
        return steps * lat * 1e-6 + nbytes / (bw * 1e9)


@dataclass(frozen=True)
class HardwareProfile:
    name: str
    description: str
    gpus_per_node: int
    peak_tflops: dict[str, float]
    gemm_efficiency: dict[str, float]
    attn_efficiency_fwd: float
    attn_efficiency_bwd: float
    nongemm_fraction: float
    hbm_gbps: float
    ep_link: EpLink
    net: Net
    shared_cores: int = 0
    core_share: float = 1.0  # per-rank rate with every shared core computing / solo rate
    measured: dict[str, Any] = field(default_factory=dict)  # calibration record (CPU profile)

    def gemm_dtype(self, precision: str) -> str:
        """The datatype GEMMs of ``precision`` run in here (FP8 falls back to BF16 without FP8)."""
        if precision == "fp8" and "fp8" not in self.peak_tflops:
            return "bf16"
        return precision

    def gemm_flops_per_s(self, dtype: str) -> float:
        d = self.gemm_dtype(dtype)
        if d not in self.peak_tflops or d not in self.gemm_efficiency:
            raise ValueError(f"hardware profile {self.name!r} has no {d} GEMM rate: add peak_tflops.{d} "
                             f"and gemm_efficiency.{d} to its YAML")
        return self.peak_tflops[d] * 1e12 * self.gemm_efficiency[d]

    def attn_flops_per_s(self, backward: bool) -> float:
        """Attention core rate (BF16 on GPUs; the CPU profile has only fp32, used then)."""
        d = "bf16" if "bf16" in self.peak_tflops else "fp32"
        return self.peak_tflops[d] * 1e12 * (self.attn_efficiency_bwd if backward else self.attn_efficiency_fwd)


def _need(d: dict, key: str, where: str):
    if key not in d:
        raise ValueError(f"hardware profile {where}: missing key {key!r}")
    return d[key]


def _share(d: dict, where: str) -> float:
    v = float(d.get("core_share", 1.0))
    if not 0 < v <= 1:
        raise ValueError(f"hardware profile {where}: core_share={v} must be in (0, 1]")
    return v


def _section(cls, d: dict, key: str, where: str):
    """``cls(**d[key])`` with an unknown or missing field named in one line."""
    sub = _need(d, key, where)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(sub) - known)
    if unknown:
        raise ValueError(f"hardware profile {where}: unknown keys {unknown} in {key} (known: {sorted(known)})")
    try:
        return cls(**sub)
    except TypeError as e:  # a required field is missing
        raise ValueError(f"hardware profile {where}: {key}: {e}") from None


def profile_from_dict(d: dict, where: str = "<dict>") -> HardwareProfile:
    known = {f.name for f in fields(HardwareProfile)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"hardware profile {where}: unknown keys {unknown} (known: {sorted(known)})")
    peak = {k: float(v) for k, v in _need(d, "peak_tflops", where).items() if v is not None}
    eff = {k: float(v) for k, v in _need(d, "gemm_efficiency", where).items() if v is not None}
    for k in list(peak) + list(eff):
        if k not in DTYPES:
            raise ValueError(f"hardware profile {where}: dtype {k!r} is not one of {DTYPES}")
    for k, v in eff.items():
        if not 0 < v <= 1:
            raise ValueError(f"hardware profile {where}: gemm_efficiency.{k}={v} must be in (0, 1]")
    frac = float(d.get("nongemm_fraction", 0.0))
    if not 0 <= frac < 1:
        raise ValueError(f"hardware profile {where}: nongemm_fraction={frac} must be in [0, 1)")
    return HardwareProfile(
        name=str(_need(d, "name", where)), description=str(d.get("description", "")),
        gpus_per_node=int(_need(d, "gpus_per_node", where)), peak_tflops=peak, gemm_efficiency=eff,
        attn_efficiency_fwd=float(_need(d, "attn_efficiency_fwd", where)),
        attn_efficiency_bwd=float(_need(d, "attn_efficiency_bwd", where)),
        nongemm_fraction=frac, hbm_gbps=float(_need(d, "hbm_gbps", where)),
        ep_link=_section(EpLink, d, "ep_link", where), net=_section(Net, d, "net", where),
        shared_cores=int(d.get("shared_cores", 0)), core_share=_share(d, where), measured=dict(d.get("measured") or {}))


def available_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))


def load_profile(name_or_path: str) -> HardwareProfile:
    """A profile by name (``configs/hardware/<name>.yaml``) or by path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = PROFILE_DIR / f"{name_or_path.lower()}.yaml"
    if not path.exists():
        raise ValueError(f"hardware profile {name_or_path!r} not found: use one of {available_profiles()} "
                         f"or a YAML path")
    with open(path) as f:
        return profile_from_dict(yaml.safe_load(f), str(path))
