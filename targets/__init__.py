"""Boards we compile for: one TOML file per board in this folder.

Each file gives the TVM target (`[target]`, plus `[host]` for the CPU side of a GPU board), the
device the runtime runs on (cpu, cuda or opencl), the cross compiler that links the library on
this x86 machine (`[cross]`, with the Debian package that provides it), the default RPC key and
the board's memory, bandwidth and peak throughput for a roofline. A file holding only
`alias = "other"` is another name for a board. `load(name)` reads one; an unknown name lists
the known ones.
"""
from __future__ import annotations

import os
import platform
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from device.errors import UserError

HERE = Path(__file__).parent
ELF_MACHINES = {"aarch64": 183, "x86_64": 62}   # e_machine of the library each triple gives
# CPU extensions LLVM may use in our kernels (its feature name → the flag /proc/cpuinfo shows):
# the manifest lists those of the build's target, and the runtime refuses a CPU without one
CPU_FLAGS = {
    "x86_64": {"avx2": "avx2", "fma": "fma", "f16c": "f16c", "avxvnni": "avx_vnni", "avx512f": "avx512f",
               "avx512bw": "avx512bw", "avx512vl": "avx512vl", "avx512vnni": "avx512_vnni"},
    "aarch64": {"dotprod": "asimddp", "fullfp16": "asimdhp", "i8mm": "i8mm", "sve": "sve"},
}


def known() -> list[str]:
    return sorted(p.stem for p in HERE.glob("*.toml"))


@dataclass
class Board:
    name: str
    description: str
    device: str                       # "cpu", "cuda" or "opencl": where the kernels run
    target: dict                      # TVM target dict of the kernels
    host: dict | None = None          # TVM target dict of the host code (GPU boards)
    cross: dict | None = None         # {"compiler": …, "package": …}; None: link natively
    rpc_key: str = ""
    roofline: dict = field(default_factory=dict)
    variant: str = ""                 # "cpu": a GPU board built for its CPU cores only

    @property
    def tuning_dir(self) -> Path:
        """Where compiler.tune keeps this board's MetaSchedule database (compiler.build applies it)."""
        return HERE / self.name / (f"tuning-{self.variant}" if self.variant else "tuning")

    @property
    def gpu(self) -> bool:
        return self.device != "cpu"

    @property
    def cpu_target(self) -> dict:
        """The LLVM target the board's CPU code is compiled for."""
        return self.host if self.host is not None else self.target

    @property
    def triple(self) -> str:
        return self.cpu_target.get("mtriple", "x86_64-linux-gnu")

    @property
    def arch(self) -> str:
        """"x86_64" or "aarch64": which CPU kernels the build may use (a target without a triple
        is this machine)."""
        if "mtriple" not in self.cpu_target:
            return {"arm64": "aarch64", "AMD64": "x86_64"}.get(platform.machine(), platform.machine())
        return self.triple.split("-")[0]

    @property
    def int_dot(self) -> str | None:
        """The integer dot product W8A8 kernels may use on the board's CPU: "vpdpbusd" (x86 with
        AVX-VNNI, or AVX512-VNNI and 256-bit AVX-512: Alder Lake, Cascade Lake, Zen 4 and
        later), "pmaddwd" (x86 with AVX2), "sdot" (AArch64 with dotprod: Cortex-A55/A75 and
        later), or None."""
        has = self.has_features
        if self.arch == "x86_64":
            if has("avxvnni") or has("avx512vnni", "avx512vl"):
                return "vpdpbusd"
            return "pmaddwd" if has("avx2") else None
        if self.arch == "aarch64":
            return "sdot" if has("dotprod") else None
        return None

    @property
    def cpu_flags(self) -> list[str]:
        """The /proc/cpuinfo flags of the extensions (CPU_FLAGS) the board's CPU target has, so
        code built for it may use: a CPU without one would stop on an illegal instruction."""
        return [flag for feature, flag in CPU_FLAGS.get(self.arch, {}).items() if self.has_features(feature)]

    def has_features(self, *features: str) -> bool:
        """Whether the board's CPU target (its LLVM CPU name) has every LLVM feature named."""
        from tvm.target import Target, codegen  # noqa: PLC0415
        target = Target(self.cpu_target)
        return all(codegen.target_has_features(f, target) for f in features)

    @property
    def elf_machine(self) -> int:
        return ELF_MACHINES[self.triple.split("-")[0]]

    def cpu_only(self) -> "Board":
        """The same board with everything on its CPU cores (a GPU board's host target)."""
        if not self.gpu:
            return self
        roof = {k: v for k, v in self.roofline.items() if k != "peak_gflops"}   # that peak is the GPU's
        if "cpu_peak_gflops" in self.roofline:
            roof["peak_gflops"] = self.roofline["cpu_peak_gflops"]
        return Board(name=self.name, description=f"{self.description} (CPU cores only)", device="cpu",
                     target=self.host, cross=self.cross, rpc_key=self.rpc_key, roofline=roof, variant="cpu")

    def tvm_target(self):
        import tvm  # noqa: PLC0415  (only the build machine needs the compiler)
        return tvm.target.Target(self.target, host=self.host) if self.host else tvm.target.Target(self.target)


def _native(d: dict | None) -> dict | None:
    """Fill in "native" values with this machine's (the host target)."""
    if d is None:
        return None
    d = dict(d)
    if d.get("mcpu") == "native":
        import tvm  # noqa: PLC0415
        # Without an explicit CPU, LLVM targets generic x86-64 (SSE only): name this machine's.
        d["mcpu"] = str(tvm.target.codegen.llvm_get_system_cpu())
    if d.get("num-cores") == "native":
        d["num-cores"] = os.cpu_count() or 1
    return d


def load(name: str) -> Board:
    path = HERE / f"{name}.toml"
    if not path.is_file():
        raise UserError(f"--target {name}: unknown target; known targets: {', '.join(known())}")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path}: not valid TOML: {e}") from None
    if "alias" in data:
        return load(data["alias"])
    try:
        return Board(name=name, description=data["description"], device=data["device"],
                     target=_native(data["target"]), host=_native(data.get("host")), cross=data.get("cross"),
                     rpc_key=data.get("rpc_key", name), roofline=data.get("roofline", {}))
    except KeyError as e:
        raise UserError(f"{path}: missing key {e.args[0]}") from None
