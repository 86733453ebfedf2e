"""GPU benchmark of the runtime, for ``scripts/gpu_check.sh``: speed table and latency re-measurement.

Sub-commands (each writes JSON; ``gpu_report.py report`` beside this file turns a folder of them
into ``results.json`` and ``results.md``)::

    python benchmarks/gpu/gpu_bench.py env --out DIR/env.json [--device cuda]
    python benchmarks/gpu/gpu_bench.py speed --out DIR/speed.json --device cuda --time-budget 240
    python benchmarks/gpu/gpu_bench.py remeasure --schedule S.yaml --out DIR/search-b64.json --device cuda --batch-size 64
    python benchmarks/gpu/gpu_bench.py random-checkpoint --model deit_tiny_patch16_224 --out W.pth
    python benchmarks/gpu/gpu_bench.py synthetic-images --out DIR --count 64
    python benchmarks/gpu/gpu_bench.py smoke --dir DIR          # tiny CPU run of env, speed, remeasure, report

Speed table (``speed``): for every model, the unreduced model, hand-set RAPID
(:func:`rapid_search.rapid_schedule`) and ToMe (:func:`rapid_search.tome_for_ratio`) at each
GFLOPs ratio, at each batch size, in each dtype (``model.to(dtype)``: float32, float16,
bfloat16 where the device has it), eager and compiled (``torch.compile``, default mode).

* Eager: the schedules of one (model, dtype, batch) cell are timed round-robin (each round times
  one forward of every schedule), after warm-up runs; medians and IQR per schedule.
* Compiled: per schedule, ``torch._dynamo.reset()``, ``rapid_search.apply``, ``torch.compile``;
  the first call (compilation) is timed apart, then warm-up and timed runs. A compile that
  fails is recorded as ``compile failed: <first line>``, never aborting the table.
* Each forward is timed with CUDA events after ``torch.cuda.synchronize`` (``perf_counter`` on
  the CPU), so a time covers the kernels, launch gaps included.
* Speed-up = unreduced median / schedule median (same dtype, batch and mode); ideal = unreduced
  GFLOPs / schedule GFLOPs (analytic MACs); "of ideal" = speed-up / ideal.
* A time budget (``--time-budget``, seconds for the whole table) is spent in two phases: first
  every eager cell (``--eager-fraction`` of the budget, split over the models by their size;
  unused time passes on), the number of timed rounds adapting to the time left
  (``--min-rounds`` .. ``--max-rounds``); then the compiled rows with whatever is left, model
  after model, each started only if the slowest compile so far (``--compile-estimate`` before the
  first) still fits. What does not fit is recorded as ``skipped: time budget``. The JSON file is
  rewritten after every cell, so a run stopped from outside keeps what it measured.

Speed does not depend on the weights: models are created with random weights, except those
named in ``--pretrained`` (their real weights when the Hugging Face cache has them).

Exit status: 0 done (rows may still record failures), 2 bad arguments (one-line error).
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import torch

import rapid_search as rs
from rapid_search.tools.measure import Timing, parse_device

sys.path.insert(0, str(Path(__file__).resolve().parent))  # gpu_report.py beside this file (also under python -P)
from gpu_report import FORMAT, atomic_write_text, write_report  # noqa: E402

__all__ = [
    "FORMAT",
    "DEFAULT_MODELS",
    "BenchArgumentError",
    "environment",
    "speed_schedules",
    "time_round_robin",
    "time_compiled",
    "run_speed",
    "remeasure",
    "random_checkpoint",
    "synthetic_images",
    "main",
]

#: DeiT-Tiny (real weights when available) and random-weight DeiT-S, ViT-B and ViT-L.
DEFAULT_MODELS = ("deit_tiny_patch16_224", "deit_small_patch16_224", "vit_base_patch16_224", "vit_large_patch16_224")
DEFAULT_RATIOS = (0.7, 0.5, 0.35)
DEFAULT_BATCHES = (1, 64, 256)
DEFAULT_DTYPES = ("float32", "float16", "bfloat16")
METHODS = ("rapid", "tome")
METHOD_LABELS = {"unreduced": "unreduced", "rapid": "RAPID", "tome": "ToMe"}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

Log = Callable[[str], None]


class BenchArgumentError(ValueError):
    """An option the benchmark cannot run with; the message names the fix."""


# ---- environment -----------------------------------------------------------------------------------
def _run_text(cmd: Sequence[str]) -> Optional[str]:
    try:
        out = subprocess.run(list(cmd), capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


def _driver_version() -> Optional[str]:
    text = _run_text(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    if text:
        return text.splitlines()[0].strip()
    try:  # nvidia-ml-py, where nvidia-smi is not on the PATH
        import pynvml

        pynvml.nvmlInit()
        v = pynvml.nvmlSystemGetDriverVersion()
        return v.decode() if isinstance(v, bytes) else str(v)
    except Exception:  # noqa: BLE001 - optional
        return None


def _git_revision() -> str:
    rev = os.environ.get("RAPID_GIT_REV", "").strip()
    if rev:
        return rev
    root = Path(__file__).resolve().parents[2]
    return _run_text(["git", "-C", str(root), "rev-parse", "--short", "HEAD"]) or "unknown"


def environment(*, device: torch.device) -> dict[str, Any]:
    """Facts of the machine and the software the numbers were measured with."""
    import timm

    env: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "rapid_search": rs.__version__,
        "rapid_search_path": str(Path(rs.__file__).resolve().parent),
        "git": _git_revision(),
        "cpu_count": os.cpu_count(),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }
    try:
        import optuna

        env["optuna"] = optuna.__version__
    except ImportError:
        env["optuna"] = None
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(
            gpu=torch.cuda.get_device_name(device),
            gpu_memory_gib=round(p.total_memory / 2**30, 1),
            gpu_capability=f"{p.major}.{p.minor}",
            gpu_multiprocessors=p.multi_processor_count,
            driver=_driver_version(),
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
            tf32_cudnn=torch.backends.cudnn.allow_tf32,
            bf16_supported=torch.cuda.is_bf16_supported(),
        )
        try:
            import triton

            env["triton"] = triton.__version__
        except ImportError:
            env["triton"] = None
    else:
        env.update(gpu=None, driver=None, cuda=torch.version.cuda, torch_threads=torch.get_num_threads())
    return env


# ---- schedules and timing --------------------------------------------------------------------------
def speed_schedules(info: rs.ModelInfo, *, ratios: Sequence[float]) -> list[dict[str, Any]]:
    """The unreduced model, then RAPID and ToMe at each ratio: ``[{label, method, ratio, schedule | reason}]``."""
    out: list[dict[str, Any]] = [{"label": "unreduced", "method": "unreduced", "ratio": 1.0, "schedule": None, "gflops": info.base_gflops}]
    for ratio in ratios:
        for method in METHODS:
            entry: dict[str, Any] = {"label": f"{METHOD_LABELS[method]} {ratio:.0%}", "method": method, "ratio": float(ratio)}
            try:
                s = rs.rapid_schedule(info, ratio) if method == "rapid" else rs.tome_for_ratio(info, ratio)
            except rs.UnreachableBudget as e:
                entry.update(schedule=None, reason=str(e).split(" — ")[0])
            else:
                entry.update(schedule=s, gflops=rs.schedule_macs(info, s) / 1e9)
            out.append(entry)
    return out


def _timed_ms(fn: Callable[[], Any], device: torch.device) -> float:
    """One run of ``fn`` in milliseconds: CUDA events after a synchronise on CUDA, perf_counter on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return float(start.elapsed_time(end))
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def time_round_robin(
    model: torch.nn.Module,
    x: torch.Tensor,
    schedules: dict[str, Optional[rs.Schedule]],
    *,
    device: torch.device,
    warmup: int,
    min_rounds: int,
    max_rounds: int,
    budget_s: float,
) -> tuple[dict[str, Timing], int]:
    """Time ``model(x)`` under each schedule, round-robin, with as many rounds as ``budget_s`` allows.

    Args:
        model: Unpatched model on ``device``; each schedule is applied around its own runs.
        x: ``(B, C, H, W)`` input on ``device`` in the model's dtype.
        schedules: ``{label: schedule}`` (None: the unpatched model).
        device: Where it runs.
        warmup: Untimed runs per schedule first (the last one also estimates the run time).
        min_rounds: Fewest timed rounds (also when over budget).
        max_rounds: Most timed rounds.
        budget_s: Seconds the timed rounds may take.

    Returns:
        ``({label: Timing}, rounds)``.
    """

    def run(sched: Optional[rs.Schedule]) -> float:
        if sched is None:
            return _timed_ms(lambda: model(x), device)
        with rs.applied(model, sched):
            return _timed_ms(lambda: model(x), device)

    with torch.inference_mode():
        per_round = 0.0
        for sched in schedules.values():
            t = 0.0
            for _ in range(max(1, warmup)):
                t = run(sched)
            per_round += t / 1e3
        rounds = max_rounds if per_round <= 0 else int(max(min_rounds, min(max_rounds, budget_s // per_round)))
        times: dict[str, list[float]] = {k: [] for k in schedules}
        for _ in range(rounds):
            for k, sched in schedules.items():
                times[k].append(run(sched))
    return {k: Timing.from_times(v, batch_size=int(x.shape[0])) for k, v in times.items()}, rounds


class _CompileTimeout(Exception):
    pass


@contextmanager
def _alarm(seconds: float) -> Iterator[None]:
    """Raise :class:`_CompileTimeout` after ``seconds`` (main thread on POSIX; otherwise no limit)."""
    usable = hasattr(signal, "setitimer") and seconds > 0
    try:
        import threading

        usable = usable and threading.current_thread() is threading.main_thread()
    except ImportError:  # pragma: no cover
        usable = False
    if not usable:
        yield
        return

    def _raise(_sig, _frame):
        raise _CompileTimeout(f"timed out after {seconds:.0f} s")

    old = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or e.__class__.__name__
    return f"{e.__class__.__name__}: {text}"[:300]


def _dynamo_counts() -> dict[str, Any]:
    try:
        from torch._dynamo.utils import counters

        return {"graphs": int(counters["stats"].get("unique_graphs", 0)), "graph_breaks": int(sum(counters["graph_break"].values()))}
    except Exception:  # noqa: BLE001 - private API; informative only
        return {}


def time_compiled(
    model: torch.nn.Module,
    x: torch.Tensor,
    schedule: Optional[rs.Schedule],
    *,
    device: torch.device,
    warmup: int,
    rounds: int,
    timeout_s: float,
    compile_fn: Optional[Callable[[torch.nn.Module], Callable[..., Any]]] = None,
) -> dict[str, Any]:
    """Compile ``model`` (with ``schedule`` applied) and time it; a failure is returned, not raised.

    Args:
        model: Unpatched model on ``device``.
        x: Input batch.
        schedule: Applied before compiling (None: the unreduced model).
        device: Where it runs.
        warmup: Untimed runs after the compiling call.
        rounds: Timed runs.
        timeout_s: Limit for compiling plus timing.
        compile_fn: ``torch.compile`` (default) or a stand-in.

    Returns:
        ``{"status": "ok", "timing": Timing, "compile_s": ..., "graphs": ..., "graph_breaks": ...}``
        or ``{"status": "compile failed: <one line>"}``.
    """
    compile_fn = compile_fn or torch.compile
    reset = getattr(getattr(torch, "_dynamo", None), "reset", None)
    if reset is not None:
        reset()
    try:
        from torch._dynamo.utils import counters

        counters.clear()
    except Exception:  # noqa: BLE001
        pass
    try:
        with _alarm(timeout_s), torch.inference_mode():
            if schedule is not None:
                rs.apply(model, schedule)
            cm = compile_fn(model)
            t0 = time.perf_counter()
            cm(x)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            compile_s = time.perf_counter() - t0
            for _ in range(warmup):
                cm(x)
            times = [_timed_ms(lambda: cm(x), device) for _ in range(rounds)]
    except torch.cuda.OutOfMemoryError:
        return {"status": "out of memory"}
    except (Exception, _CompileTimeout) as e:  # noqa: BLE001 - any compiler failure is a row's result
        if isinstance(e, _CompileTimeout) or "_CompileTimeout" in str(e):  # the compiler may wrap it (InductorError)
            return {"status": f"skipped: time budget (compiling and timing ran past the {timeout_s:.0f} s left)"}
        return {"status": f"compile failed: {_one_line(e)}"}
    finally:
        rs.remove(model)
        if reset is not None:
            reset()
    return {"status": "ok", "timing": Timing.from_times(times, batch_size=int(x.shape[0])), "compile_s": round(compile_s, 2), **_dynamo_counts()}


# ---- the speed table -------------------------------------------------------------------------------
def _dtype_supported(dtype: torch.dtype, device: torch.device) -> Optional[str]:
    """None when ``dtype`` runs on ``device``, else why not."""
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        return "bfloat16 is not supported by this GPU"
    return None


def _compile_available(device: torch.device) -> Optional[str]:
    """None when ``torch.compile`` can target ``device``, else why not."""
    if not hasattr(torch, "compile"):
        return "this torch has no torch.compile"
    if device.type == "cuda":
        try:
            from torch.utils._triton import has_triton

            if not has_triton():
                return "triton is not installed (torch.compile's CUDA backend)"
        except ImportError:
            pass
    return None


def _make_model(name: str, *, device: torch.device, pretrained: bool, log: Log) -> tuple[torch.nn.Module, str]:
    """The model in eval mode on ``device`` (float32) and where its weights came from."""
    import timm

    if pretrained:
        try:
            from rapid_search.tools.loading import load_model

            return load_model(name, pretrained=True, device=device), "pretrained"
        except Exception as e:  # noqa: BLE001 - fall back, and say so
            log(f"{name}: pretrained weights unavailable ({_one_line(e)[:160]}); random weights instead")
    with torch.device(device):  # initialise on the device: ViT-L's random init is slow on a CPU
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False)
    rs.check_model(model)
    return model.eval(), "random"


def _row(base: dict[str, Any], entry: dict[str, Any], info: rs.ModelInfo) -> dict[str, Any]:
    row = {**base, "schedule": entry["label"], "method": entry["method"], "target_ratio": entry["ratio"]}
    if "gflops" in entry:
        row["gflops"] = round(entry["gflops"], 4)
        row["achieved_ratio"] = round(entry["gflops"] / info.base_gflops, 4)
        row["ideal_speedup"] = round(info.base_gflops / entry["gflops"], 4)
    return row


def _fill_timing(row: dict[str, Any], t: Timing, ref: Optional[Timing]) -> None:
    q25, q75 = (float(v) for v in _percentiles(t.times_ms))
    row.update(
        status="ok",
        median_ms=round(t.median_ms, 4),
        iqr_ms=round(t.iqr_ms, 4),
        p25_ms=round(q25, 4),
        p75_ms=round(q75, 4),
        rounds=t.repeats,
        images_per_s=round(t.images_per_s, 2),
    )
    if ref is not None and t.median_ms > 0:
        row["speedup"] = round(ref.median_ms / t.median_ms, 4)
        if row.get("ideal_speedup"):
            row["of_ideal"] = round(row["speedup"] / row["ideal_speedup"], 4)


def _percentiles(values: Sequence[float]) -> tuple[float, float]:
    import numpy as np

    q25, q75 = np.percentile(np.asarray(values, dtype=np.float64), [25.0, 75.0])
    return float(q25), float(q75)


def _model_weight(name: str) -> float:
    """Share of the time budget: grows with the model's cost (DeiT-Tiny 2.1 ... ViT-L 8.8)."""
    try:
        info = rs.ModelInfo.from_model(_meta_model(name))
        return 1.0 + math.sqrt(info.base_gflops)
    except Exception:  # noqa: BLE001 - unknown names fail later, with a row saying so
        return 1.0


def run_speed(
    *,
    models: Sequence[str],
    ratios: Sequence[float],
    batches: Sequence[int],
    dtypes: Sequence[str],
    device: torch.device,
    compile_mode: str = "auto",
    compile_batches: Sequence[int] = (64,),
    compile_dtypes: Sequence[str] = ("bfloat16",),
    compile_ratios: Sequence[float] = (0.5,),
    pretrained: Sequence[str] = (),
    time_budget_s: float = 240.0,
    warmup: int = 3,
    min_rounds: int = 5,
    max_rounds: int = 30,
    compile_estimate_s: float = 45.0,
    eager_fraction: float = 0.4,
    out: Optional[Path] = None,
    log: Optional[Log] = None,
    compile_fn: Optional[Callable[[torch.nn.Module], Callable[..., Any]]] = None,
) -> dict[str, Any]:
    """Measure the speed table; see the module docstring. Returns (and writes to ``out``) the result."""
    log = log or (lambda _m: None)
    t_start = time.perf_counter()
    deadline = t_start + time_budget_s
    compile_why = None
    if compile_mode == "off":
        compile_why = "--compile off"
    elif compile_mode == "auto":
        compile_why = _compile_available(device)
    result: dict[str, Any] = {
        "format": FORMAT,
        "kind": "speed",
        "setup": {
            "device": str(device),
            "models": list(models),
            "ratios": [float(r) for r in ratios],
            "batches": list(batches),
            "dtypes": list(dtypes),
            "dtype_mode": "weights and inputs cast with model.to(dtype)",
            "compile": "off" if compile_why else "on",
            "compile_note": compile_why,
            "compile_batches": list(compile_batches),
            "compile_dtypes": list(compile_dtypes),
            "compile_ratios": [float(r) for r in compile_ratios],
            "time_budget_s": time_budget_s,
            "eager_fraction": eager_fraction,
            "compile_estimate_s": compile_estimate_s,
            "warmup": warmup,
            "min_rounds": min_rounds,
            "max_rounds": max_rounds,
            "timing": "CUDA events around each forward after torch.cuda.synchronize (perf_counter on CPU); "
            "eager: schedules round-robin per (model, dtype, batch); compiled: per schedule after compiling",
            "float32_matmul_precision": torch.get_float32_matmul_precision(),
        },
        "models": {},
        "rows": [],
        "notes": [],
    }
    if compile_why and compile_mode != "off":
        result["notes"].append(f"compiled rows not run: {compile_why}")

    def save() -> None:
        if out is not None:
            result["seconds"] = round(time.perf_counter() - t_start, 1)
            atomic_write_text(out, json.dumps(result, indent=1) + "\n")

    weights = {name: _model_weight(name) for name in models}
    # phase 1, eager: every model gets a share of this phase's time by its size (unused time passes on)
    eager_deadline = t_start + time_budget_s * (1.0 if compile_why else eager_fraction)
    prepared: dict[str, tuple[rs.ModelInfo, list[dict[str, Any]], str]] = {}
    for mi, name in enumerate(models):
        now = time.perf_counter()
        left_weight = sum(weights[n] for n in models[mi:])
        model_deadline = now + max(0.0, eager_deadline - now) * weights[name] / left_weight
        try:
            model32, source = _make_model(name, device=device, pretrained=name in pretrained, log=log)
        except Exception as e:  # noqa: BLE001 - one model's failure is its rows' result
            result["models"][name] = {"status": f"failed: {_one_line(e)}"}
            log(f"{name}: {_one_line(e)}")
            save()
            continue
        info = rs.ModelInfo.from_model(model32)
        entries = speed_schedules(info, ratios=ratios)
        prepared[name] = (info, entries, source)
        result["models"][name] = {
            "weights": source,
            "base_gflops": round(info.base_gflops, 4),
            "depth": info.depth,
            "num_tokens": info.num_tokens,
            "schedules": {e["label"]: (e["schedule"].to_dict() if e.get("schedule") is not None else None) for e in entries},
        }
        _eager_cells(
            result, model32, info, entries, name=name, batches=batches, dtypes=dtypes, device=device, deadline=model_deadline,
            warmup=warmup, min_rounds=min_rounds, max_rounds=max_rounds, save=save, log=log,
        )
        del model32
        _free(device)

    # phase 2, compiled: what time is left, model after model (unreduced first: it is the reference)
    if not compile_why:
        observed: list[float] = []  # seconds each compile (with its timing) took
        for name, (info, entries, source) in prepared.items():
            labels = {"unreduced"} | {e["label"] for e in entries if e["method"] != "unreduced" and any(abs(e["ratio"] - r) < 1e-9 for r in compile_ratios)}
            todo = [(d, b, e) for d in compile_dtypes if d in dtypes for b in compile_batches if b in batches for e in entries if e["label"] in labels]
            if not todo:
                continue
            model32: Optional[torch.nn.Module] = None
            cache: dict[str, torch.nn.Module] = {}
            refs: dict[tuple[str, int], Timing] = {}
            for dname, batch, e in todo:
                row = _row({"model": name, "dtype": dname, "batch": batch, "mode": "compiled"}, e, info)
                left = deadline - time.perf_counter()
                est = max(observed) if observed else compile_estimate_s
                why = _dtype_supported(DTYPES[dname], device)
                if e["method"] != "unreduced" and e.get("schedule") is None:
                    row.update(status="unreachable", reason=e.get("reason"))
                elif why is not None:
                    row["status"] = why
                elif left < est:
                    row["status"] = f"skipped: time budget (a compile took up to {est:.0f} s here; {max(left, 0):.0f} s left)"
                else:
                    t0 = time.perf_counter()
                    try:
                        if model32 is None:
                            model32, _ = _make_model(name, device=device, pretrained=source == "pretrained", log=log)
                        if dname not in cache:
                            cache.clear()
                            _free(device)
                            cache[dname] = model32 if dname == "float32" else copy.deepcopy(model32).to(DTYPES[dname])
                        H = W = int(model32.patch_embed.img_size[0])
                        x = torch.randn(batch, 3, H, W, generator=torch.Generator().manual_seed(0)).to(device, DTYPES[dname])  # (B, 3, H, W)
                        res = time_compiled(
                            cache[dname], x, e.get("schedule"), device=device, warmup=warmup, rounds=2 * min_rounds,
                            timeout_s=left, compile_fn=compile_fn,
                        )
                        del x
                    except torch.cuda.OutOfMemoryError:
                        res = {"status": "out of memory"}
                    except Exception as exc:  # noqa: BLE001 - e.g. the model cannot be made again: this row's result
                        res = {"status": f"failed: {_one_line(exc)}"}
                    observed.append(time.perf_counter() - t0)
                    if res["status"] == "ok":
                        t = res["timing"]
                        if e["method"] == "unreduced":
                            refs[(dname, batch)] = t
                        _fill_timing(row, t, refs.get((dname, batch)))
                        row.update({k: v for k, v in res.items() if k in ("compile_s", "graphs", "graph_breaks")})
                        eager = next(
                            (r for r in result["rows"] if r["model"] == name and r["dtype"] == dname and r["batch"] == batch
                             and r["mode"] == "eager" and r["method"] == "unreduced" and r.get("status") == "ok"),
                            None,
                        )
                        if eager is not None:
                            row["speedup_vs_eager_unreduced"] = round(eager["median_ms"] / t.median_ms, 4)
                    else:
                        row["status"] = res["status"]
                    log(f"{name} {dname} batch {batch} compiled {e['label']}: {row['status']}"
                        + (f", {row['median_ms']:.3f} ms, compile {row['compile_s']:.0f} s" if row["status"] == "ok" else ""))
                result["rows"].append(row)
                save()
            cache.clear()
            model32 = None
            _free(device)
    save()
    return result


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _eager_cells(
    result: dict[str, Any],
    model32: torch.nn.Module,
    info: rs.ModelInfo,
    entries: Sequence[dict[str, Any]],
    *,
    name: str,
    batches: Sequence[int],
    dtypes: Sequence[str],
    device: torch.device,
    deadline: float,
    warmup: int,
    min_rounds: int,
    max_rounds: int,
    save: Callable[[], None],
    log: Log,
) -> None:
    """The eager rows of one model: every (batch, dtype) cell, schedules round-robin, until ``deadline``."""
    H = W = int(model32.patch_embed.img_size[0])
    runnable = {e["label"]: e for e in entries if e["method"] == "unreduced" or e.get("schedule") is not None}
    cells = [(d, b) for b in batches for d in dtypes]
    gen = torch.Generator().manual_seed(0)
    cache: dict[str, torch.nn.Module] = {}
    for ci, (dname, batch) in enumerate(cells):
        rows = [_row({"model": name, "dtype": dname, "batch": batch, "mode": "eager"}, e, info) for e in entries]
        for row, e in zip(rows, entries):
            if e["label"] not in runnable:
                row.update(status="unreachable", reason=e.get("reason"))
        live = [r for r in rows if r["schedule"] in runnable]
        why = _dtype_supported(DTYPES[dname], device)
        left = deadline - time.perf_counter()
        if why is None and left <= 0:
            why = "skipped: time budget"
        if why is not None:
            for r in live:
                r["status"] = why
            result["rows"].extend(rows)
            save()
            continue
        try:
            if dname not in cache:
                cache.clear()
                _free(device)
                cache[dname] = model32 if dname == "float32" else copy.deepcopy(model32).to(DTYPES[dname])
            x = torch.randn(batch, 3, H, W, generator=gen).to(device, DTYPES[dname])  # (B, 3, H, W)
            timings, n = time_round_robin(
                cache[dname], x, {r["schedule"]: runnable[r["schedule"]]["schedule"] for r in live}, device=device,
                warmup=warmup, min_rounds=min_rounds, max_rounds=max_rounds, budget_s=max(0.0, left / (len(cells) - ci)),
            )
            del x
            for r in live:
                _fill_timing(r, timings[r["schedule"]], timings["unreduced"])
            log(f"{name} {dname} batch {batch} eager: {n} rounds; unreduced {timings['unreduced'].median_ms:.3f} ms")
        except torch.cuda.OutOfMemoryError:
            for r in live:
                r["status"] = "out of memory"
            log(f"{name} {dname} batch {batch} eager: out of memory")
        except Exception as e:  # noqa: BLE001 - a failing cell is that cell's result; the table goes on
            for r in live:
                r["status"] = f"failed: {_one_line(e)}"
            log(f"{name} {dname} batch {batch} eager: {_one_line(e)}")
        result["rows"].extend(rows)
        save()
    cache.clear()
    _free(device)


# ---- re-measuring an exported schedule -------------------------------------------------------------
def remeasure(
    *,
    schedule_path: Path,
    device: torch.device,
    batch_size: int,
    rounds: int = 30,
    warmup: int = 5,
    checkpoint: Optional[Path] = None,
    pretrained: bool = True,
    search_log: Optional[Path] = None,
) -> dict[str, Any]:
    """Time an exported schedule against the unreduced model, round-robin, and check its budget.

    ``met`` compares the re-measured median with the schedule's recorded target (milliseconds
    per batch for a latency budget); ``ratio_to_unreduced`` is the re-measured latency over the
    unreduced model's, measured in the same rounds.
    """
    from rapid_search.tools.loading import load_model

    sched = rs.Schedule.load(schedule_path)
    model = load_model(sched.model.name, pretrained=pretrained and checkpoint is None, checkpoint=checkpoint, device=device)
    info = rs.ModelInfo.from_model(model)
    sched.model.check(info.fingerprint())
    H = W = int(model.patch_embed.img_size[0])
    x = torch.randn(batch_size, 3, H, W, generator=torch.Generator().manual_seed(0)).to(device)  # (B, 3, H, W)
    timings, n = time_round_robin(
        model, x, {"unreduced": None, "schedule": sched}, device=device, warmup=warmup, min_rounds=rounds, max_rounds=rounds, budget_s=0.0
    )
    t, base = timings["schedule"], timings["unreduced"]
    budget = sched.budget
    target = float(budget.target) if budget is not None and budget.kind == "latency" else None
    out: dict[str, Any] = {
        "format": FORMAT,
        "kind": "remeasure",
        "schedule_file": str(schedule_path),
        "model": info.name,
        "device": str(device),
        "batch_size": batch_size,
        "rounds": n,
        "budget": None if budget is None else {"spec": budget.spec, "kind": budget.kind, "target": budget.target, "achieved": dict(budget.achieved)},
        "gflops": round(rs.schedule_macs(info, sched) / 1e9, 4),
        "ratio_gflops": round(rs.schedule_macs(info, sched) / info.base_macs, 4),
        "unreduced_ms": round(base.median_ms, 4),
        "unreduced_iqr_ms": round(base.iqr_ms, 4),
        "schedule_ms": round(t.median_ms, 4),
        "schedule_iqr_ms": round(t.iqr_ms, 4),
        "ratio_to_unreduced": round(t.median_ms / base.median_ms, 4) if base.median_ms > 0 else None,
        "target_ms": target,
        "met": None if target is None else bool(t.median_ms <= target),
        "layers": sched.describe() if hasattr(sched, "describe") else None,
    }
    if search_log is not None and search_log.is_file():
        lines = [ln.strip() for ln in search_log.read_text(errors="replace").splitlines() if ln.strip()]
        out["search_log_tail"] = lines[-8:]
    return out


# ---- small helpers for the check script ------------------------------------------------------------
def random_checkpoint(*, model: str, out: Path) -> Path:
    """Save seeded random weights of ``model`` (a stand-in when the real weights are absent)."""
    import timm

    torch.manual_seed(0)
    m = timm.create_model(model, pretrained=False)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(m.state_dict(), out)
    return out


def synthetic_images(*, out: Path, count: int, size: int = 256) -> Path:
    """``count`` smooth random PNGs in a flat folder (unlabelled calibration images for a dry search)."""
    import numpy as np
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize((size, size), Image.BILINEAR).save(out / f"img{i:03d}.png")
    return out


# ---- command line ----------------------------------------------------------------------------------
def _csv(kind: Callable[[str], Any]) -> Callable[[str], tuple]:
    def parse(text: str) -> tuple:
        try:
            vals = tuple(kind(p.strip()) for p in text.split(",") if p.strip())
        except (ValueError, argparse.ArgumentTypeError) as e:
            raise argparse.ArgumentTypeError(f"{text!r}: {e}") from None
        if not vals:
            raise argparse.ArgumentTypeError("give at least one value")
        return vals

    return parse


def _positive(text: str) -> int:
    v = int(text)
    if v < 1:
        raise ValueError("must be 1 or more")
    return v


def _dtype_name(text: str) -> str:
    if text not in DTYPES:
        raise ValueError(f"unknown dtype {text!r} — use float32, float16 or bfloat16")
    return text


def _ratio(text: str) -> float:
    from rapid_search.tools.bench import parse_ratios

    (r,) = parse_ratios(text)
    return r


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"gpu_bench: error: {' '.join(message.split())} (see {self.prog} --help)\n")
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="gpu_bench.py", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    e = sub.add_parser("env", help="write the environment (GPU, driver, versions) as JSON")
    e.add_argument("--out", type=Path, required=True)
    e.add_argument("--device", default="cuda")

    s = sub.add_parser("speed", help="the speed table")
    s.add_argument("--out", type=Path, required=True, help="JSON file (rewritten after every cell)")
    s.add_argument("--device", default="cuda")
    s.add_argument("--models", type=_csv(str), default=DEFAULT_MODELS)
    s.add_argument("--pretrained", type=_csv(str), default=("deit_tiny_patch16_224",), help="models to load with real weights when cached")
    s.add_argument("--ratios", type=_csv(_ratio), default=DEFAULT_RATIOS, help="GFLOPs ratios in percent (default: 70,50,35)")
    s.add_argument("--batches", type=_csv(_positive), default=DEFAULT_BATCHES)
    s.add_argument("--dtypes", type=_csv(_dtype_name), default=DEFAULT_DTYPES)
    s.add_argument("--compile", choices=("auto", "on", "off"), default="auto", help="compiled rows (auto: where torch.compile can target the device)")
    s.add_argument("--compile-batches", type=_csv(_positive), default=(64,))
    s.add_argument("--compile-dtypes", type=_csv(_dtype_name), default=("bfloat16",))
    s.add_argument("--compile-ratios", type=_csv(_ratio), default=(0.5,))
    s.add_argument("--time-budget", type=float, default=240.0, help="seconds for the whole table (default: 240)")
    s.add_argument("--eager-fraction", type=float, default=0.4, help="share of the budget for the eager rows when compiling (default: 0.4)")
    s.add_argument("--compile-estimate", type=float, default=45.0, help="seconds a first compile is assumed to take (default: 45)")
    s.add_argument("--warmup", type=int, default=3)
    s.add_argument("--min-rounds", type=_positive, default=5)
    s.add_argument("--max-rounds", type=_positive, default=30)

    r = sub.add_parser("remeasure", help="re-measure an exported schedule against the unreduced model")
    r.add_argument("--schedule", type=Path, required=True)
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--device", default="cuda")
    r.add_argument("--batch-size", type=_positive, required=True)
    r.add_argument("--rounds", type=_positive, default=30)
    r.add_argument("--checkpoint", type=Path, default=None)
    r.add_argument("--search-log", type=Path, default=None, help="the search's log (its last lines are kept)")

    c = sub.add_parser("random-checkpoint", help="save seeded random weights of a model")
    c.add_argument("--model", required=True)
    c.add_argument("--out", type=Path, required=True)

    i = sub.add_parser("synthetic-images", help="write smooth random PNGs (unlabelled) into a folder")
    i.add_argument("--out", type=Path, required=True)
    i.add_argument("--count", type=_positive, default=64)

    sm = sub.add_parser("smoke", help="tiny CPU run of env, speed, remeasure and report (test_vit, one row per schedule)")
    sm.add_argument("--dir", type=Path, required=True)
    sm.add_argument("--inputs", type=Path, default=None, help="also write test_vit.pth and images/ here, for a CPU latency search")
    return p


def _smoke(directory: Path, inputs: Optional[Path], log: Log) -> int:
    """CPU run of every measuring path on timm's tiny ``test_vit`` (seconds): env, one speed cell,
    a re-measurement, the report. ``inputs`` also gets what a CPU latency search needs
    (``test_vit.pth`` random weights, ``images/`` 16 synthetic PNGs)."""
    directory.mkdir(parents=True, exist_ok=True)
    work = inputs or directory / "work"
    cpu = torch.device("cpu")
    torch.set_num_threads(1)
    atomic_write_text(directory / "env.json", json.dumps(environment(device=cpu), indent=1) + "\n")
    run_speed(
        models=("test_vit",), ratios=(0.5,), batches=(2,), dtypes=("float32",), device=cpu, compile_mode="off",
        time_budget_s=30.0, warmup=1, min_rounds=3, max_rounds=3, out=directory / "speed.json", log=log,
    )
    ckpt = random_checkpoint(model="test_vit", out=work / "test_vit.pth")
    synthetic_images(out=work / "images", count=16, size=160)
    sched_path = work / "test_vit-rapid50.yaml"
    rs.save_schedule(rs.rapid_schedule(rs.ModelInfo.from_model(_meta_model("test_vit")), 0.5), sched_path)
    res = remeasure(schedule_path=sched_path, device=cpu, batch_size=2, rounds=3, warmup=1, checkpoint=ckpt)
    atomic_write_text(directory / "search-smoke.json", json.dumps(res, indent=1) + "\n")
    j, m = write_report(directory)
    log(f"smoke: wrote {j} and {m}")
    return 0


def _meta_model(name: str) -> torch.nn.Module:
    import timm

    with torch.device("meta"):
        return timm.create_model(name, pretrained=False)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    log: Log = lambda m: print(f"gpu_bench: {m}", file=sys.stderr, flush=True)  # noqa: E731

    try:
        if args.command == "smoke":
            return _smoke(args.dir, args.inputs, log)
        if args.command == "random-checkpoint":
            print(random_checkpoint(model=args.model, out=args.out))
            return 0
        if args.command == "synthetic-images":
            print(synthetic_images(out=args.out, count=args.count))
            return 0
        device = parse_device(args.device)
        if args.command == "env":
            atomic_write_text(args.out, json.dumps(environment(device=device), indent=1) + "\n")
            return 0
        if args.command == "remeasure":
            res = remeasure(
                schedule_path=args.schedule, device=device, batch_size=args.batch_size, rounds=args.rounds,
                checkpoint=args.checkpoint, search_log=args.search_log,
            )
            atomic_write_text(args.out, json.dumps(res, indent=1) + "\n")
            verdict = "met" if res["met"] else ("NOT met" if res["met"] is False else "no latency target")
            target = "—" if res["target_ms"] is None else f"{res['target_ms']:.3f}"
            print(f"re-measured {res['schedule_ms']:.3f} ms vs target {target} ms: {verdict} "
                  f"(unreduced {res['unreduced_ms']:.3f} ms, batch {res['batch_size']})")
            return 0
        if args.command == "speed":
            if args.time_budget <= 0:
                raise BenchArgumentError(f"--time-budget {args.time_budget} must be positive (seconds)")
            run_speed(
                models=args.models, ratios=args.ratios, batches=args.batches, dtypes=args.dtypes, device=device,
                compile_mode=args.compile, compile_batches=args.compile_batches, compile_dtypes=args.compile_dtypes,
                compile_ratios=args.compile_ratios, pretrained=args.pretrained, time_budget_s=args.time_budget,
                warmup=args.warmup, min_rounds=args.min_rounds, max_rounds=args.max_rounds, out=args.out, log=log,
                eager_fraction=args.eager_fraction, compile_estimate_s=args.compile_estimate,
            )
            print(f"wrote {args.out}")
            return 0
    except (ValueError, OSError, ImportError) as e:
        sys.stderr.write(f"gpu_bench: error: {str(e).splitlines()[0] if str(e) else e.__class__.__name__}\n")
        return 2
    raise AssertionError(args.command)  # pragma: no cover


if __name__ == "__main__":
    raise SystemExit(main())
