"""Tune the kernels our rules schedule generically, with MetaSchedule and its XGBoost cost model.

    python -m compiler.tune --target T [--var VAR --vae VAE] [--plan plan.json] [--device cpu]
                            [--rpc HOST:PORT | --tracker HOST:PORT --key K] [--timeout 60]
                            --trials N [--round-trials 64]
                            [--tasks SUBSTRING …] [--top 12] [--list] [--db DIR]

The tasks are the model's fused kernels that no hand-written schedule covers (norms, softmax,
GELU, the f̂ resize, the decoder's non-conv layers, …; the attention, dense and conv kernels of
schedules/ are scheduled already and are skipped); by default the 12 with the most
floating-point work per image. Candidates are measured here, or on a board over TVM RPC,
directly or through a tracker: each is a shared library linked here (cross-linked for ARM
boards), so the board only needs TVM's runtime and `python -m tvm.exec.rpc_server`. The board
must answer within --timeout before anything slow starts, and a round in which every
measurement failed stops the run. The database lives in targets/<target>/tuning/ (tuning-cpu/
for --device cpu), and compiler.build applies it automatically. Tuning runs in rounds of
--round-trials measurements; every round's records are in the database when it ends, so an
interrupted run keeps what it measured. A record that does not parse is dropped with a warning
before tuning or building.
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from compiler.build import board_for, check_cross_compiler, lower, unscheduled_passes
from compiler.checkpoint import load_models
from compiler.cliargs import add_model_args
from compiler.compress.plan import load_plan
from compiler.errors import UserError, cli
from device.fileio import atomic_path

WORKLOADS, RECORDS = "database_workload.json", "database_tuning_record.json"
BUILD_TIMEOUT = 300   # seconds per candidate build: LLVM on a busy 2-core machine exceeds the default 30
SESSION_TIMEOUT = 120  # seconds an RPC session for one candidate (upload, load, time) may last, at least
FAILED = 1e9           # MetaSchedule records a failed build or run as 1e10 s


def extract(var, vae, plan, board, batch: int = 1) -> list:
    """The unscheduled kernels of the model as MetaSchedule tasks (weight = calls per image)."""
    import tvm
    from tvm.s_tir import meta_schedule as ms
    mod, _ = lower(var, vae, plan, batch, board.device, board.int_dot)
    target = board.tvm_target()
    with target:
        mod = tvm.transform.Sequential(unscheduled_passes(target))(mod)
    tasks = ms.relax_integration.extract_tasks(mod, target)
    return [t for t in tasks if not _scheduled(t.dispatched[0])]


def _scheduled(mod) -> bool:
    return any(f.attrs is not None and f.attrs.get("tirx.is_scheduled", False) for f in mod.functions.values())


def heaviest(tasks, top: int) -> list:
    """The `top` tasks with the most floating-point work per image (FLOPs × calls): a 2-core
    machine spends ~20 s per task per round, and most tasks are reshapes and copies."""
    from tvm.s_tir.analysis import estimate_tir_flops

    def work(t):
        try:
            return estimate_tir_flops(t.dispatched[0]) * t.weight
        except Exception:  # noqa: BLE001  (an op the estimator does not know)
            return 0.0
    ranked = sorted(tasks, key=work, reverse=True)
    return [t for t in ranked[:top] if work(t) > 0]


def clean_database(db: Path, log=print) -> int:
    """Drop lines that do not parse (and records of dropped workloads); returns the records kept."""
    wl_path, rec_path = db / WORKLOADS, db / RECORDS
    if not wl_path.is_file() or not rec_path.is_file():
        return 0
    new_index, workloads = {}, []
    for i, line in enumerate(wl_path.read_text().splitlines()):
        try:
            json.loads(line)
        except ValueError:
            log(f"warning: {wl_path}:{i + 1}: corrupt workload, skipped with its records")
            continue
        new_index[i] = len(workloads)
        workloads.append(line)
    records = []
    for i, line in enumerate(rec_path.read_text().splitlines()):
        try:
            rec = json.loads(line)
            ok = isinstance(rec, list) and len(rec) == 2 and rec[0] in new_index and isinstance(rec[1], list)
        except ValueError:
            ok = False
        if not ok:
            log(f"warning: {rec_path}:{i + 1}: corrupt tuning record, skipped")
            continue
        rec[0] = new_index[rec[0]]
        records.append(json.dumps(rec))
    for path, lines in ((wl_path, workloads), (rec_path, records)):
        text = "".join(line + "\n" for line in lines)
        if text != path.read_text():
            with atomic_path(path) as tmp:
                tmp.write_text(text)
    return len(records)


def check_where(args, board, connect: bool = True) -> None:
    """--rpc, or --tracker with --key, and (`connect`) a board that answers within --timeout;
    else one line."""
    if args.tracker and not args.key:
        raise UserError(f"--tracker needs --key: the key the board registered under "
                        f"(targets/{board.name}.toml says {board.rpc_key!r})")
    if args.key and not args.tracker:
        raise UserError("--key only applies with --tracker")
    if args.timeout <= 0:
        raise UserError("--timeout must be positive")
    if args.tracker:
        from host.deploy import board_for_key
        other = board_for_key(args.key)
        if other is not None and other.arch != board.arch:
            raise UserError(f"--key {args.key} is a {other.name} ({other.triple}); --target {board.name} "
                            f"builds for {board.triple}")
    if connect and (args.rpc or args.tracker):
        from host.net import rpc_session
        rpc_session(rpc=args.rpc, tracker=args.tracker, key=args.key, timeout=args.timeout,
                    session_timeout=args.timeout)   # dropped at once: the board ends it


def runner_for(args, board):
    """Measure here (LocalRunner), or on a board (RPCRunner) reached directly (--rpc) or through
    a tracker (--tracker): for a board every candidate is a shared library linked here
    (cross-linked for another architecture), so the board needs no compiler."""
    from functools import partial

    from tvm.s_tir import meta_schedule as ms

    from compiler import tune_worker
    if not (args.tracker or args.rpc):
        if board.cross:
            raise UserError(f"--target {board.name}: its kernels cannot run on this machine; measure on the "
                            f"board with --rpc HOST:PORT or --tracker HOST:PORT --key {board.rpc_key}")
        return ms.builder.LocalBuilder(timeout_sec=BUILD_TIMEOUT, f_build=tune_worker.build), ms.runner.LocalRunner()
    from host.net import parse_addr
    host, port = parse_addr(args.rpc or args.tracker, "--rpc" if args.rpc else "--tracker")
    # RPCConfig only knows trackers and insists on all three fields; our session function
    # (tune_worker.session) reads only its session timeout
    config = ms.runner.RPCConfig(tracker_host=host, tracker_port=port, tracker_key=args.key or board.rpc_key,
                                 session_timeout_sec=int(max(SESSION_TIMEOUT, 10 * args.timeout)))
    compiler = board.cross["compiler"] if board.cross else None
    builder = ms.builder.LocalBuilder(timeout_sec=BUILD_TIMEOUT, f_build=tune_worker.build,
                                      f_export=partial(tune_worker.export_shared, compiler=compiler))
    session = partial(tune_worker.session, rpc=args.rpc, tracker=args.tracker, key=args.key, timeout=args.timeout)
    return builder, ms.runner.RPCRunner(config, f_create_session=session, f_alloc_argument=tune_worker.alloc_arguments)


def board_option(args) -> str:
    """How the user named the board, for messages ("" when measuring here)."""
    return f"--rpc {args.rpc}" if args.rpc else f"--tracker {args.tracker} --key {args.key}" if args.tracker else ""


def tune(tasks, db: Path, trials: int, round_trials: int, builder, runner, per_iter: int = 8,
         log=print, board: str = "", recheck=None) -> int:
    """Tune in rounds; `board` names where candidates run (--rpc …, --tracker …; "" here). A round
    whose every new measurement failed stops the run with one line (after `recheck()`, which
    raises if the board went away), and its failed records are dropped: they would keep a later
    run from measuring those candidates again."""
    from tvm.s_tir import meta_schedule as ms
    db.mkdir(parents=True, exist_ok=True)
    clean_database(db, log)
    _cpu_intrinsics_only(tasks)
    done, rnd = 0, 0
    while done < trials:
        rnd += 1
        n = min(round_trials, trials - done)
        log(f"round {rnd}: {n} trials over {len(tasks)} tasks ({done}/{trials} done)")
        before = _lines(db / RECORDS)
        # a population sized to the round: the default 512 costs minutes per task on 2 cores
        batch = min(per_iter, n)
        strategy = ms.search_strategy.EvolutionarySearch(population_size=max(64, min(512, 32 * batch)))
        contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(tasks, str(db / "logs"),
                                                                                  strategy=strategy)
        ms.tune_tasks(tasks=contexts, task_weights=weights, work_dir=str(db / "logs"), max_trials_global=n,
                      num_trials_per_iter=batch, builder=builder, runner=runner,
                      database=ms.database.JSONDatabase(str(db / WORKLOADS), str(db / RECORDS)),
                      cost_model="xgb")
        done += n
        new = _lines(db / RECORDS)[len(before):]
        if new and all(_failed(line) for line in new):
            with atomic_path(db / RECORDS) as tmp:
                tmp.write_text("".join(line + "\n" for line in before))
            if recheck is not None:
                recheck()
            raise UserError(f"{board + ': ' if board else ''}all {len(new)} measurements of round {rnd} failed "
                            f"(their records dropped; MetaSchedule's errors are in {db / 'logs'})")
        log(f"round {rnd} done: {clean_database(db, log)} records in {db}")
    return clean_database(db, log)


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.is_file() else []


def _failed(record_line: str) -> bool:
    """A record whose candidate did not build or run (MetaSchedule stores 1e10 s)."""
    try:
        return min(json.loads(record_line)[1][1] or [FAILED]) >= FAILED
    except (ValueError, TypeError, IndexError):
        return False   # not ours to judge: clean_database drops what does not parse


def _cpu_intrinsics_only(tasks) -> None:
    """MetaSchedule's TuneContext imports tvm.s_tir.tensor_intrin, and parsing its CUDA, ROCm and
    Hexagon intrinsics (TVMScript) costs about a minute of CPU on this machine. CPU tasks can only
    use the x86, Arm and RISC-V ones: register the package without running its __init__ and
    import just those. GPU tasks get the whole package."""
    import importlib
    import importlib.util
    name = "tvm.s_tir.tensor_intrin"
    if name in sys.modules or any(t.target.kind.name != "llvm" for t in tasks):
        return
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return
    package = importlib.util.module_from_spec(spec)   # __path__ set, __init__ not run
    sys.modules[name] = package
    try:
        for sub in ("x86", "arm_cpu", "riscv_cpu"):
            importlib.import_module(f"{name}.{sub}")
    except Exception:  # noqa: BLE001  (another TVM: import it the usual way)
        for mod in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
            del sys.modules[mod]
        return
    import tvm.s_tir
    tvm.s_tir.tensor_intrin = package


@cli
def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m compiler.tune", description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default="host", help="board from targets/ (default host)")
    ap.add_argument("--device", choices=["cpu", "cuda", "opencl"], help="as for compiler.build")
    add_model_args(ap)
    ap.add_argument("--plan", help="compression plan the build will use (its kernels differ)")
    ap.add_argument("--trials", type=int, default=256, help="measurements in all (default 256)")
    ap.add_argument("--round-trials", type=int, default=64, help="measurements per saved round (default 64)")
    where = ap.add_mutually_exclusive_group()
    where.add_argument("--rpc", help="HOST:PORT of a board's rpc_server: measure there")
    where.add_argument("--tracker", help="HOST:PORT of an RPC tracker: measure on a board registered there")
    ap.add_argument("--key", help="the key the board registered under with the tracker (targets/*.toml rpc_key)")
    ap.add_argument("--timeout", type=float, default=60.0,
                    help="seconds to wait for the board, or for a free one from the tracker (default 60); "
                         "one candidate's session may last 10× that, at least 120 s")
    ap.add_argument("--tasks", nargs="+", metavar="SUBSTRING", help="tune only tasks whose name contains one")
    ap.add_argument("--top", type=int, default=12, help="tune the N tasks with the most work per image (default 12)")
    ap.add_argument("--list", action="store_true", help="list the tasks and exit")
    ap.add_argument("--db", type=Path, help="database directory (default targets/<target>/tuning)")
    args = ap.parse_args(argv)
    if args.trials < 1 or args.round_trials < 1:
        raise UserError("--trials and --round-trials must be at least 1")
    board = board_for(args.target, args.device)
    check_cross_compiler(board)
    check_where(args, board, connect=not args.list)   # before anything slow, bounded by --timeout
    var, vae = load_models(args.var, args.vae)
    plan = load_plan(args.plan, var.cfg) if args.plan else None
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    log(f"extracting tasks for {board.name} ({board.device})")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tasks = extract(var, vae, plan, board)
    if args.tasks:
        tasks = [t for t in tasks if any(s in t.task_name for s in args.tasks)]
        if not tasks:
            raise UserError(f"--tasks {' '.join(args.tasks)}: no task matches (see --list)")
    tasks = heaviest(tasks, args.top)
    if args.list:
        for t in tasks:
            print(f"{t.task_name}  (×{t.weight})")
        return
    builder, runner = runner_for(args, board)
    db = args.db or board.tuning_dir
    n = tune(tasks, db, args.trials, args.round_trials, builder, runner, log=log, board=board_option(args),
             recheck=(lambda: check_where(args, board)) if args.rpc or args.tracker else None)
    print(f"{n} tuning records in {db}; compiler.build --target {args.target} applies them")


if __name__ == "__main__":
    main()
