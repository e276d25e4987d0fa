"""Compile a VAR checkpoint (optionally with a compression plan) into a board artifact.

    python -m compiler.build --target host|jetson-orin|mali-g610|rpi5|… [--var VAR --vae VAE]
                             [--plan plan.json] [--device cpu] [--batch 1] --out DIR

Boards are described in targets/*.toml. GPU boards get the GPU variants of the kernels
(scheduled by DLight where they are not hand-scheduled), or with --device cpu everything runs on
the board's CPU cores (which the emulated board, host.emulate, can run); boards of another architecture are
cross-linked on this machine. DIR holds model.so (the TVM library: embed, scale_0…scale_9, next_0…next_8, last, decode),
params.npz (the weights in the packed form the kernels read), for CUDA boards kernels.fatbin
(the kernels compiled ahead of time, when nvcc is installed here) and manifest.json (schema, model
config, plan, target, TVM version, batch, sha256 of every file). The artifact is written to a
temporary directory next to DIR and renamed at the end, so a failed build leaves nothing behind.
The library is checked before it is kept: its ELF machine must be the board's, and a GPU
library must embed device code that compiles (CUDA: nvcc for the board's arch, when installed).
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from compiler.checkpoint import load_models
from compiler.cliargs import add_model_args
from compiler.compress.apply import apply_plan
from compiler.compress.plan import load_plan
from compiler.errors import UserError, cli
from compiler.fileio import ensure_writable_dir
from device.artifact import write_manifest
from device.runtime import SCHEMA, VERSION
from schedules.kv_layout import cache_len, cache_row
import targets

COMPILED_SCHEMES = ("fp32", "fp16", "w8a8", "w4a16", "w4a8")


def check_compilable(plan, where):
    """Refuse plan features that have no compiled kernel yet (instead of silently ignoring them)."""
    for name, entry in plan.quant_layers.items():
        if entry["scheme"] not in COMPILED_SCHEMES:
            raise UserError(f"{where}: quant.layers.{name}: scheme {entry['scheme']} has no compiled kernel yet "
                            f"(compiled: {', '.join(COMPILED_SCHEMES)})")
    if plan.quant_default not in COMPILED_SCHEMES:
        raise UserError(f"{where}: quant.default: scheme {plan.quant_default} has no compiled kernel yet")


def lower(var, vae, plan, batch: int, device: str = "cpu", int_dot: str | None = None):
    """Reference models (+ plan) → (IRModule, ordered parameter arrays) for kernels on `device`
    ("cpu", "cuda" or "opencl"); `int_dot`: the CPU's integer dot product (targets.Board.int_dot)."""
    from compiler.lower.module import GenerationModule
    from compiler.lower.params import param_arrays
    model = apply_plan(var, plan) if plan is not None else var
    gm = GenerationModule(model, vae, plan, gpu=device if device != "cpu" else False, int_dot=int_dot)
    mod, named = gm.export_tvm(spec=gm.spec(batch))
    return mod, param_arrays(named)


def _backend(target):
    from tvm.relax.backend.cpu_generic import pipeline as cpu
    from tvm.relax.backend.cuda import pipeline as cuda
    from tvm.relax.backend.gpu_generic import pipeline as generic
    return {"llvm": cpu, "cuda": cuda}.get(target.kind.name, generic)


def unscheduled_passes(target) -> list:
    """Library dispatch, legalization and fusion: the module whose kernels are scheduled next
    (and whose unscheduled kernels compiler.tune tunes). On CPUs exp, tanh, erf and softmax
    become TVM's polynomial fast_* versions first: LLVM turns the exact ones into scalar libm
    calls (GELU: 5.9 ms for 512×512 exact, 1.6 ms fast)."""
    from tvm import relax
    backend = _backend(target)
    legalize = backend.legalize_passes(target)
    if target.kind.name != "llvm":
        return backend.library_dispatch_passes(target) + legalize[:-1]   # DLight's list: see schedule_passes
    return [relax.transform.FastMathTransform()] + backend.library_dispatch_passes(target) + legalize


def schedule_passes(target, tuning: Path | None = None) -> list:
    """The tuning database's schedules where it has one (compiler.tune), then our rules for
    every kernel still unscheduled: DLight's GPU rules with one change (schedules/gpu.py), or
    parallel CPU loops (schedules/cpu.py). Hand-written kernels are scheduled already."""
    from tvm import relax
    from schedules import cpu as cpu_rules
    from schedules import gpu as gpu_rules
    passes = [relax.transform.MetaScheduleApplyDatabase(str(tuning))] if tuning is not None else []
    return passes + [cpu_rules.default_schedule() if target.kind.name == "llvm" else gpu_rules.default_schedule()]


def pipeline(target, tuning: Path | None = None):
    """Relax's default pipeline for the target (it fuses; tvm.compile's own CPU default does not),
    with the tuning database and our schedule rules in place of its schedule step."""
    import tvm
    backend = _backend(target)

    @tvm.transform.module_pass(opt_level=0)
    def build_pipeline(mod, _ctx):
        with target:
            return tvm.transform.Sequential(unscheduled_passes(target) + schedule_passes(target, tuning)
                                            + backend.dataflow_lower_passes(target)
                                            + backend.finalize_passes(target))(mod)
    return build_pipeline


def compile_module(mod, board, tuning: Path | None = None, cuda_graph: bool = False):
    """cuda_graph: Relax's RewriteCUDAGraph (in the CUDA finalize passes) lifts each run of
    launches whose buffers are all static into a function that the VM captures once as a CUDA
    graph and replays after: a few launches per scale instead of dozens (static_scale_inputs)."""
    import tvm
    target = board.tvm_target()
    if cuda_graph:
        mod = static_scale_inputs(mod)
    with tvm.transform.PassContext(config={"relax.backend.use_cuda_graph": cuda_graph}):
        return tvm.compile(mod, target=target, relax_pipeline=pipeline(target, tuning))


def static_scale_inputs(mod):
    """Static, for RewriteCUDAGraph, are the parameters after a function's `num_input` and the
    storage it plans. A scale function's inputs are x, mods, the CFG weights and the KV caches;
    device/runtime.py passes the same mods, weights and cache tensors on every call (it copies
    new values into them), so only x counts as an input, and the KV-cache writes and the
    attention go into the graphs too."""
    from tvm import relax
    mod = mod.clone()
    for gv, f in list(mod.functions.items()):
        if isinstance(f, relax.Function) and gv.name_hint.startswith("scale_"):
            mod.update_func(gv, f.with_attr("num_input", 1))
    return mod


def check_cross_compiler(board):
    """A board of another architecture needs its cross linker: say which Debian package has it."""
    if board.cross and shutil.which(board.cross["compiler"]) is None:
        raise UserError(f"--target {board.name}: cross compiler {board.cross['compiler']} not found; "
                        f"install it with: apt-get install {board.cross['package']}")


def export(ex, board, path: Path):
    """Link the library (cross-linked for other architectures) and check what came out."""
    from tvm.support import cc
    fcompile = cc.cross_compiler(board.cross["compiler"]) if board.cross else None
    ex.export_library(str(path), fcompile=fcompile)
    with open(path, "rb") as f:
        head = f.read(20)
    machine = int.from_bytes(head[18:20], "little")
    if head[:4] != b"\x7fELF" or machine != board.elf_machine:
        raise UserError(f"{path}: linked for ELF machine {machine}, expected {board.elf_machine} ({board.triple})")


def find_nvcc() -> str | None:
    """nvcc on PATH or in the default CUDA location."""
    default = Path("/usr/local/cuda/bin/nvcc")
    return shutil.which("nvcc") or (str(default) if default.exists() else None)


def device_code(ex, board, workdir: Path, log=print) -> dict | None:
    """Find the GPU kernels in the executable and check that they compile for the board.

    TVM keeps CUDA and OpenCL kernels as source inside the library. OpenCL source is compiled
    by the board's driver when the library is loaded. CUDA source is compiled here, ahead of
    time, into kernels.fatbin (SASS for the board's arch plus PTX) when nvcc is installed; the
    board's runtime loads it instead of compiling the source (device/runtime.py), unless its
    driver is older than this CUDA, in which case it compiles the source with NVRTC."""
    if not board.gpu:
        return None
    mods, found = [ex.mod], []
    while mods:
        m = mods.pop()
        if m.kind in ("cuda", "opencl"):
            found.append(m)
        mods.extend(m.imports)
    if not found:
        raise UserError(f"--target {board.name}: the compiled library holds no {board.device} kernels")
    sources = [m.inspect_source("") for m in found]
    src = "".join(sources)
    info = {"kind": board.device, "format": "source", "kernels": len(re.findall(r"(?:__global__|__kernel) void[^;{]*\{", src)),
            "compiled_on_load_by": "NVRTC (cuda-bindings) or nvcc" if board.device == "cuda" else "the OpenCL driver",
            "checked_with": None}
    if board.device == "opencl":
        info["checked_with"] = check_opencl(src, board, log)
    if board.device == "cuda":
        info.update(compile_fatbin(sources, board, workdir, log))
    return info


def compile_fatbin(sources: list[str], board, workdir: Path, log) -> dict:
    """kernels.fatbin for the board's arch (SASS + PTX), or {} when there is no nvcc here.
    The sha256 of each CUDA module's source lets the runtime match the fatbin to the library."""
    import hashlib
    src = "".join(sources)
    nvcc = find_nvcc()
    if nvcc is None:
        log("  nvcc not found: CUDA kernels stay source (the board compiles them on load); "
            "install the CUDA toolkit (/usr/local/cuda) for an ahead-of-time fatbin")
        return {}
    arch = board.target["arch"]
    num = arch.removeprefix("sm_")
    cu, fatbin = workdir / "kernels.cu", workdir / "kernels.fatbin"
    cu.write_text(src)
    r = subprocess.run([nvcc, "-w", "-O3", "-fatbin", f"-gencode=arch=compute_{num},code=[sm_{num},compute_{num}]",
                        "-o", str(fatbin), str(cu)], capture_output=True, text=True)
    cu.unlink()
    if r.returncode != 0:
        raise UserError(f"--target {board.name}: the generated CUDA kernels do not compile for {arch}: "
                        + (r.stderr.strip().splitlines() or ["?"])[-1])
    version = re.search(r"release (\d+\.\d+)", subprocess.run([nvcc, "--version"], capture_output=True,
                                                              text=True).stdout)
    cuda = version.group(1) if version else "unknown"
    log(f"  CUDA kernels compiled ahead of time: kernels.fatbin ({fatbin.stat().st_size} bytes, {arch}, CUDA {cuda})")
    return {"format": "fatbin", "file": fatbin.name, "arch": arch, "cuda_version": cuda,
            "source_sha256": [hashlib.sha256(s.encode()).hexdigest() for s in sources],
            "checked_with": f"{Path(nvcc).name} -arch={arch} (CUDA {cuda})",
            "compiled_on_load_by": f"nobody on a CUDA {cuda.split('.')[0]}+ driver (the fatbin is loaded); "
                                   "NVRTC (cuda-bindings) on older drivers"}


def model_manifest(var, vae) -> dict:
    c = var.cfg
    return {"depth": c.depth, "width": c.width, "heads": c.heads, "patch_nums": list(c.patch_nums),
            "vocab_size": c.vocab_size, "num_classes": c.num_classes, "seq_len": c.seq_len, "cvae": c.cvae,
            "shared_aln": c.shared_aln, "image_size": vae.image_size, "var": c.to_dict(), "vqvae": vae.cfg.to_dict()}


def check_opencl(src: str, board, log) -> str | None:
    """Compile the OpenCL kernels with this machine's OpenCL (e.g. PoCL on the CPU), if any:
    it catches code no OpenCL C compiler accepts, though not Mali-specific limits."""
    try:
        import pyopencl as cl
        platform = cl.get_platforms()[0]
        ctx = cl.Context(devices=platform.get_devices()[:1])
    except Exception:  # noqa: BLE001  (no pyopencl, no ICD, no device)
        log("  no OpenCL platform here: OpenCL kernels not compiled at build time (the board compiles them on load)")
        return None
    try:
        cl.Program(ctx, src).build()
    except cl.Error as e:
        raise UserError(f"--target {board.name}: the generated OpenCL kernels do not compile: "
                        f"{str(e).strip().splitlines()[-1][:200]}") from None
    return f"{platform.name} {platform.version.strip()}"


def board_for(target_name: str, device: str | None = None):
    """The board to build for; device "cpu" puts everything on a GPU board's CPU cores."""
    board = targets.load(target_name)
    if device in (None, board.device):
        return board
    if device == "cpu":
        return board.cpu_only()
    raise UserError(f"--device {device}: {board.name} runs kernels on cpu or {board.device}")


def _shown(path: Path) -> str:
    """A path for the manifest: relative to the project when inside it (no machine paths)."""
    root = Path(__file__).resolve().parents[1]
    return str(path.resolve().relative_to(root)) if path.resolve().is_relative_to(root) else str(path)


def tuning_database(board, tuning=None, log=print) -> Path | None:
    """The MetaSchedule database to apply: `tuning` if given, else the board's (compiler.tune)
    when it has records. Records that do not parse are dropped with a warning first."""
    from compiler.tune import clean_database
    db = Path(tuning) if tuning else board.tuning_dir
    if tuning and not db.is_dir():
        raise UserError(f"--tuning {db}: no such directory")
    n = clean_database(db, log) if db.is_dir() else 0
    if n == 0:
        return None
    log(f"  applying {n} tuning records from {db}")
    return db


def check_plan_fits(plan, board, plan_path=None):
    """Refuse, before any work, a plan layer the board's kernels cannot compute."""
    if plan is None or board.device != "opencl":
        return
    for name, q in plan.quant_layers.items():
        if q["scheme"] == "w4a8":   # its exact group sums need fp64, which OpenCL leaves optional
            raise UserError(f"{plan_path or 'plan'}: quant.layers.{name}: w4a8 has no OpenCL kernel (Mali GPUs "
                            f"have no fp64 for its exact group sums); use w4a16 or w8a8 for --target {board.name}")


def build(var, vae, plan, target_name: str, batch: int, out, *, device=None, plan_path=None, tuning=None,
          cuda_graph=True, log=print):
    """Build an artifact into `out` (replacing an older artifact there only when done).
    cuda_graph: CUDA builds replay their static launch sequences as CUDA graphs (compile_module)."""
    import tvm
    board = board_for(target_name, device)
    check_plan_fits(plan, board, plan_path)
    check_cross_compiler(board)
    out = Path(out)
    if batch < 1:
        raise UserError(f"--batch must be at least 1, got {batch}")
    ensure_writable_dir(out.parent)
    t0 = time.perf_counter()
    log(f"[1/3] lowering to Relax (batch {batch}, {len(var.cfg.patch_nums)} scales)")
    mod, params = lower(var, vae, plan, batch, board.device, board.int_dot)
    log(f"[2/3] compiling for {board.name}: {json.dumps(board.target)}"
        + (f" on {json.dumps(board.host)}" if board.host else "") + f" ({time.perf_counter() - t0:.0f} s)")
    db = tuning_database(board, tuning, log)
    cuda_graph = cuda_graph and board.device == "cuda"
    if board.device == "cuda":
        log(f"  CUDA graphs: {'on' if cuda_graph else 'off (--no-cuda-graph)'}")
    ex = compile_module(mod, board, db, cuda_graph)
    log(f"[3/3] linking{' with ' + board.cross['compiler'] if board.cross else ''} and writing the artifact "
        f"({time.perf_counter() - t0:.0f} s)")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        export(ex, board, tmp / "model.so")
        gpu_code = device_code(ex, board, tmp, log)
        with open(tmp / "params.npz", "wb") as f:
            np.savez(f, **params)
        manifest = {
            "schema": SCHEMA, "version": VERSION, "target": board.name, "device": board.device,
            "tvm_target": board.target, "tvm_host": board.host, "triple": board.triple,
            "cpu_flags": board.cpu_flags,
            "device_code": gpu_code, "tuning": _shown(db) if db else None, "tvm_version": tvm.__version__, "batch": batch, "model": model_manifest(var, vae),
            "plan": plan.to_json() if plan is not None else None,
            "plan_name": str(plan_path) if plan_path else None,
            "library": "model.so", "params": "params.npz", "param_names": list(params),
            "sampler": "kernel" if board.device == "cpu" else "numpy",   # sample_<s> or device/sampling.py
            "cuda_graph": cuda_graph,
            "kv_shape": [2, 2 * batch, var.cfg.heads, cache_row(cache_len(var.cfg.patch_nums), var.cfg.head_dim)],
        }
        write_manifest(tmp, manifest)
        if out.exists():
            if not (out / "manifest.json").is_file():
                raise UserError(f"{out}: exists and is not an artifact; not overwriting it")
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    log(f"built {out} in {time.perf_counter() - t0:.0f} s")
    return out


@cli
def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m compiler.build", description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default="host",
                    help=f"board to compile for, from targets/*.toml: {', '.join(targets.known())} (default: host)")
    add_model_args(ap)
    ap.add_argument("--plan", help="compression plan from python -m compiler.calibrate (default: dense fp32)")
    ap.add_argument("--device", choices=["cpu", "cuda", "opencl"],
                    help="where the kernels run (default: the board's GPU if it has one; cpu: its CPU cores)")
    ap.add_argument("--batch", type=int, default=1, help="images per generation call (default 1)")
    ap.add_argument("--tuning", help="MetaSchedule database directory (default: targets/<target>/tuning when it "
                                     "has records, from python -m compiler.tune)")
    ap.add_argument("--no-cuda-graph", dest="cuda_graph", action="store_false",
                    help="CUDA builds: launch every kernel on its own instead of replaying each scale's static "
                         "launch sequences as CUDA graphs")
    ap.add_argument("--out", required=True, help="artifact directory to write")
    args = ap.parse_args(argv)
    check_cross_compiler(board_for(args.target, args.device))  # fail before loading anything
    var, vae = load_models(args.var, args.vae)
    plan = None
    if args.plan:
        plan = load_plan(args.plan, var.cfg)
        check_compilable(plan, args.plan)
    build(var, vae, plan, args.target, args.batch, args.out, device=args.device, plan_path=args.plan, tuning=args.tuning,
          cuda_graph=args.cuda_graph, log=lambda s: print(s, file=sys.stderr, flush=True))


if __name__ == "__main__":
    main()
