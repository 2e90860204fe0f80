"""llama.cpp's `llama-server`, built from the source that PyPI's `llama-cpp-python` sdist bundles.

bench.serve's third peer. The binary (Release, CPU only, -march=native) lives in a cache folder
per kind of CPU and is rebuilt from the registry whenever it is missing (a fresh machine):
nothing here is cached that cannot be rebuilt.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

# The sdist whose vendor/llama.cpp we build. Pinned so timings stay comparable across runs.
LLAMA_CPP_PYTHON_VERSION = "0.3.36"


class LlamaServerBuildError(RuntimeError):
    """The sdist could not be fetched or llama-server did not build."""


def cache_dir(version: str = LLAMA_CPP_PYTHON_VERSION) -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return root / "pie" / "llama.cpp" / version


def cpu_key() -> str:
    """The CPU model and flags, hashed: a -march=native binary is kept per kind of CPU."""
    fields: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())  # the first processor's
    text = f"{platform.machine()}|{fields.get('model name', '')}|{fields.get('flags', '')}"
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def build_dir(version: str = LLAMA_CPP_PYTHON_VERSION) -> Path:
    return cache_dir(version) / f"build-{cpu_key()}"


def binary_path(version: str = LLAMA_CPP_PYTHON_VERSION) -> Path:
    return build_dir(version) / "bin" / "llama-server"


def native_flags() -> list[str]:
    """-march=native, less AMX on x86: ggml's AMX kernels die of SIGILL (tilezero) in the VMs
    these benchmarks run in, although the CPU lists AMX and the kernel grants the tile state.
    Explicit -mno-* flags win over -march=native whatever their order."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return []
    no_amx = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
    return [f"-DCMAKE_C_FLAGS={no_amx}", f"-DCMAKE_CXX_FLAGS={no_amx}"]


def _run(cmd: list[str], log: Path, cwd: Path | None = None) -> None:
    with log.open("ab") as out:
        out.write(("\n$ " + " ".join(cmd) + "\n").encode())
        out.flush()
        proc = subprocess.run(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise LlamaServerBuildError(
            f"{' '.join(cmd[:3])}... exited {proc.returncode}; full log in {log}:\n{tail}"
        )


def _fetch_source(version: str, dest: Path, log: Path) -> Path:
    """Download the sdist with pip and unpack its vendor/llama.cpp into dest/llama.cpp."""
    src = dest / "llama.cpp"
    if (src / "CMakeLists.txt").exists():
        return src
    with tempfile.TemporaryDirectory(prefix="pie-llamacpp-sdist-") as tmp:
        _run(
            [
                sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
                f"llama-cpp-python=={version}", "-d", tmp,
            ],
            log,
        )  # fmt: skip
        archives = list(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        if not archives:
            raise LlamaServerBuildError(f"pip download left no sdist in {tmp}; see {log}")
        prefix = f"llama_cpp_python-{version}/vendor/llama.cpp/"
        staging = dest / "llama.cpp.partial"
        shutil.rmtree(staging, ignore_errors=True)
        with tarfile.open(archives[0]) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
            if not members:
                raise LlamaServerBuildError(f"{archives[0].name} has no {prefix}")
            for m in members:
                m.name = m.name[len(prefix) :]
            tar.extractall(staging, members=members, filter="data")
        staging.rename(src)
    return src


def ensure_llama_server(version: str = LLAMA_CPP_PYTHON_VERSION, jobs: int | None = None) -> Path:
    """Path to llama-server, building it (Release, CPU only, that one target) when missing."""
    binary = binary_path(version)
    if binary.exists():
        return binary
    dest = cache_dir(version)
    dest.mkdir(parents=True, exist_ok=True)
    log = dest / "build.log"
    print(f"[bench] building llama-server {version} into {dest} (log {log}, ~5 min on 2 cores)")
    src = _fetch_source(version, dest, log)
    build = build_dir(version)
    _run(
        [
            "cmake", "-S", str(src), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
            "-DGGML_NATIVE=ON", "-DGGML_CUDA=OFF", "-DGGML_METAL=OFF", "-DGGML_VULKAN=OFF",
            "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
            "-DBUILD_SHARED_LIBS=OFF", *native_flags(),
        ],
        log,
    )  # fmt: skip
    _run(
        [
            "cmake", "--build", str(build), "--config", "Release", "--target", "llama-server",
            "-j", str(jobs or os.cpu_count() or 2),
        ],
        log,
    )  # fmt: skip
    if not binary.exists():
        raise LlamaServerBuildError(f"the build finished but {binary} is missing; see {log}")
    return binary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--version", default=LLAMA_CPP_PYTHON_VERSION)
    args = parser.parse_args()
    print(ensure_llama_server(args.version))


if __name__ == "__main__":
    main()
