"""Pretraining data: text from a folder of .txt/.jsonl files, a byte-level BPE trained on it, and the whole corpus
tokenised once into memory-mapped token files (train.bin / val.bin, uint16 when the vocabulary fits, else uint32).

    docs = list(read_documents(paths))
    tok = train_bpe(docs, vocab_size=4096)                  # or load_tokenizer(smollm2_gguf())
    split = tokenize_to_memmap(docs, tok, "runs/x/data", val_fraction=0.05)
    train = open_tokens(split, "train")                       # np.memmap, read lazily

Documents are joined with the tokenizer's EOS token after each one, so a window that spans two documents sees
where one ends. The validation split is the last `val_fraction` of the documents (whole documents, never a cut).

A component beside `data.py` (the JSONL rows of post-training): the pretraining recipe's data, usable alone, and no
task (nothing here is scored).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from ragseek.errors import reading
from ragseek.model.tokenizer import Tokenizer

EOS_TOKEN = "<|endoftext|>"
# JSONL fields joined into one document, in this order; rows with none of them use every string value.
TEXT_FIELDS = ("title", "text", "question", "answer", "content")


def _jsonl_text(row: dict) -> str:
    known = [row[k] for k in TEXT_FIELDS if isinstance(row.get(k), str)]
    return "\n".join(known or [v for v in row.values() if isinstance(v, str)])


def _files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl") and p.is_file())
    raise FileNotFoundError(f"{path}: not a file or folder; pass .txt / .jsonl files or folders holding them")


def read_documents(paths: Sequence[str | Path]) -> Iterator[str]:
    """Each .txt file is one document; each JSONL row is one (title+text, question+answer, or its strings)."""
    for path in paths:
        for file in _files(Path(path)):
            if file.suffix == ".txt":
                yield file.read_text()
                continue
            for line in file.read_text().splitlines():
                if line.strip():
                    yield _jsonl_text(json.loads(line))


def train_bpe(docs: Iterable[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE (GPT-2 style: 256 byte symbols + merges) with one special token, EOS."""
    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(docs, trainer=trainer)
    return Tokenizer(backend, eos_token=EOS_TOKEN)


@dataclass
class TokenSplit:
    train: Path
    val: Path
    meta: dict


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def _write_tokens(path: Path, ids: list[int], dtype: np.dtype) -> None:
    out = np.memmap(path, dtype=dtype, mode="w+", shape=(max(len(ids), 1),))
    out[: len(ids)] = ids
    out.flush()


def tokenize_to_memmap(
    docs: Sequence[str], tokenizer: Tokenizer, folder: str | Path, val_fraction: float
) -> TokenSplit:
    """Write folder/train.bin, folder/val.bin (flat token ids, EOS after each document) and folder/meta.json."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction}: choose a fraction in (0, 1), e.g. 0.05")
    if len(docs) < 2:
        raise ValueError(f"{len(docs)} document(s): the train/val split needs at least 2")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    n_val = max(1, round(len(docs) * val_fraction))
    dtype = token_dtype(tokenizer.vocab_size)
    meta = {"dtype": dtype.name, "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id}
    for name, part in (("train", docs[:-n_val]), ("val", docs[-n_val:])):
        ids = [t for encoded in tokenizer.encode_batch(list(part)) for t in [*encoded, tokenizer.eos_id]]
        _write_tokens(folder / f"{name}.bin", ids, dtype)
        meta[f"{name}_tokens"] = len(ids)
        meta[f"{name}_docs"] = len(part)
    (folder / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return TokenSplit(folder / "train.bin", folder / "val.bin", meta)


def load_split(folder: str | Path) -> TokenSplit | None:
    """The split written by tokenize_to_memmap, or None when folder holds none."""
    folder = Path(folder)
    if not (folder / "meta.json").is_file():
        return None
    with reading(folder / "meta.json", "valid JSON", f"delete {folder} to tokenize the corpus again"):
        meta = json.loads((folder / "meta.json").read_text())
    return TokenSplit(folder / "train.bin", folder / "val.bin", meta)


def open_tokens(split: TokenSplit, name: str) -> np.memmap:
    """The `name` ("train" / "val") token file as a read-only memmap of exactly its token count."""
    path = {"train": split.train, "val": split.val}[name]
    return np.memmap(
        path, dtype=np.dtype(split.meta["dtype"]), mode="r", shape=(split.meta[f"{name}_tokens"],)
    )
