"""What `molmocap info` reports: the model and its verification state, ONNX Runtime, the CPU, the cache, versions.

Everything a user needs before filing a question, gathered without loading the model and without hashing its files
(unless asked to verify), as one plain dict that the CLI prints as text or as JSON.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
from pathlib import Path

import onnxruntime as ort

from .cache import ResultCache, cache_dir
from .demo import is_demo_model
from .errors import CacheError, ModelError
from .manifest import read_manifest
from .quality import is_poor, summary

CPUINFO = Path("/proc/cpuinfo")
# /proc/cpuinfo flags (x86 "flags", Arm "Features") that name each feature the CPU kernels care about.
FEATURE_FLAGS = {
    "AVX2": {"avx2"},
    "AVX-512": {"avx512f"},
    "AVX-512 VNNI": {"avx512_vnni"},
    "AMX": {"amx_tile"},
    "NEON": {"asimd", "neon"},
}


def gather(model_dir: Path | None, verify: bool = False) -> dict:
    """The whole report; `model` is None when there is no model to describe (the environment still helps)."""
    return {
        "model": model_info(model_dir, verify) if model_dir is not None else None,
        "onnxruntime": {"version": ort.__version__, "providers": ort.get_available_providers()},
        "cpu": cpu_info(_read_cpuinfo()),
        "cache": cache_info(),
        "molmocap": _molmocap_version(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def model_info(model_dir: Path, verify: bool = False) -> dict:
    """The model's identity, plan and files with their verification state (from the stamp, or hashed with `verify`).

    A directory that is not a readable molmocap model is a `ModelError`; a failed `verify` is not: it is reported
    as `error`, beside the file states it left in the stamp.
    """
    manifest = read_manifest(model_dir)
    error = None
    if verify:
        try:
            manifest.verify_files()
        except ModelError as exc:
            error = str(exc)
    states = manifest.file_states()
    files = [{"path": entry["path"], "bytes": entry["bytes"], "state": states[entry["path"]]}
             for entry in manifest.data["files"]]
    overall = next((state for state in ("mismatch", "not yet") if state in states.values()), "verified")
    return {
        "dir": str(manifest.root.resolve()),
        "source": manifest.data.get("source"),
        "quant": manifest.data.get("quant"),
        "plan": plan_kinds(manifest.data.get("plan") or {}),
        "demo_model": is_demo_model(manifest),
        "model_id": manifest.model_id,
        "files": files,
        "total_bytes": sum(entry["bytes"] for entry in files),
        "verification": overall,
        "error": error,
        "check": manifest.data.get("check"),
    }


def plan_kinds(plan: dict) -> dict[str, str]:
    """Each part's precision in one word (fp32, int8, int4), from the manifest's export plan; the decoder layers a
    plan keeps at another precision are named."""
    kinds = {}
    for part, spec in plan.items():
        if isinstance(spec, dict):
            kinds[part] = f"int{spec['bits']}" if spec.get("kind") == "nbits" else str(spec.get("kind"))
            if "layers" in spec:
                kinds[part] += f" (layers {', '.join(map(str, spec['layers']))})"
        else:
            kinds[part] = str(spec)
    return kinds


def cpu_info(cpuinfo: str | None) -> dict:
    """CPU model, features, cores and the threads ONNX Runtime uses by default (one per physical core)."""
    logical = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    physical = _physical_cores(cpuinfo)
    return {
        "model": _cpuinfo_value(cpuinfo, "model name") or platform.processor() or None,
        "machine": platform.machine(),
        "features": cpu_features(cpuinfo),
        "logical_cores": logical,
        "physical_cores": physical,
        "default_threads": physical or logical,
    }


def cpu_features(cpuinfo: str | None) -> dict[str, bool] | None:
    """Which of `FEATURE_FLAGS` the CPU has, from /proc/cpuinfo; None where that is not available (not Linux)."""
    flags: set[str] = set()
    for line in (cpuinfo or "").splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    if not flags:
        return None
    return {name: bool(flags & names) for name, names in FEATURE_FLAGS.items()}


def cache_info() -> dict:
    """Where the cache directory is, and the result cache's file, entries and size (or why it cannot be read)."""
    cache = ResultCache()
    report: dict = {"dir": str(cache_dir()), "results": str(cache.path)}
    try:
        stats = cache.stats()
    except CacheError as exc:
        return {**report, "error": str(exc)}
    finally:
        cache.close()
    return {**report, "entries": stats.entries, "size_bytes": stats.size_bytes}


def _read_cpuinfo() -> str | None:
    try:
        return CPUINFO.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def _cpuinfo_value(cpuinfo: str | None, key: str) -> str | None:
    for line in (cpuinfo or "").splitlines():
        name, _, value = line.partition(":")
        if name.strip() == key:
            return value.strip()
    return None


def _physical_cores(cpuinfo: str | None) -> int | None:
    """Distinct (physical id, core id) pairs in /proc/cpuinfo, or None where it does not say."""
    cores, package = set(), "0"
    for line in (cpuinfo or "").splitlines():
        name, _, value = line.partition(":")
        if name.strip() == "physical id":
            package = value.strip()
        elif name.strip() == "core id":
            cores.add((package, value.strip()))
    return len(cores) or None


def _molmocap_version() -> str:
    try:
        return importlib.metadata.version("molmocap")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"



def render_text(report: dict) -> str:
    """The report as the lines `molmocap info` prints."""
    lines = []
    model = report["model"]
    if model is None:
        lines.append("model: none (no MODEL, no $MOLMOCAP_MODEL and no embedded demo model)")
    else:
        lines += [f"model: {model['dir']}" + (" (the embedded demo model)" if model["demo_model"] else ""),
                  f"source: {model['source']}",
                  f"quant: {model['quant']} ({', '.join(f'{part} {kind}' for part, kind in model['plan'].items())})",
                  f"model id: {model['model_id'][:16]}", "files:"]
        width = max(len(entry["path"]) for entry in model["files"])
        lines += [f"  {entry['path']:<{width}}  {entry['bytes']:>15,} bytes  {entry['state']}"
                  for entry in model["files"]]
        total = model["total_bytes"]
        lines.append(f"  {'total':<{width}}  {total:>15,} bytes  ({total / 2**20:.1f} MiB)")
        hint = {"verified": "", "not yet": " (checked on first load; --verify checks now)",
                "mismatch": " (re-export or re-download the model)"}[model["verification"]]
        lines.append(f"verification: {model['verification']}{hint}")
        check = model["check"]
        if check is None:
            lines.append("check: not measured (molmocap export --check measures what the quantization costs)")
        else:
            poor = " (poor: answers often differ from the reference's)" if is_poor(check) else ""
            lines.append(f"check: {summary(check)}, {check.get('date', 'undated')}{poor}")
    ort_info, cpu, cache = report["onnxruntime"], report["cpu"], report["cache"]
    lines.append(f"onnxruntime: {ort_info['version']} (providers: {', '.join(ort_info['providers'])})")
    features = ("unknown (no /proc/cpuinfo)" if cpu["features"] is None
                else ", ".join(f"{name} {'yes' if present else 'no'}" for name, present in cpu["features"].items()))
    lines += [f"cpu: {cpu['model'] or 'unknown'} ({cpu['machine']}): {features}",
              f"cores: {cpu['logical_cores']} logical, {cpu['physical_cores'] or 'unknown'} physical; "
              f"onnxruntime threads by default: {cpu['default_threads']} (--threads to change)"]
    held = (f"cache error: {cache['error']}" if "error" in cache
            else f"{cache['entries']} results, {cache['size_bytes']:,} bytes")
    lines += [f"cache: {cache['dir']} ({held})", f"molmocap: {report['molmocap']}",
              f"python: {report['python']} ({report['platform']})"]
    return "\n".join(lines)
