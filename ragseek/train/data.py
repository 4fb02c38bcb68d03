"""JSONL datasets for the post-training recipes: chat formatting, loss masks, packing, collators, a resumable sampler.

Row formats (one JSON object per line):
    SFT          {"prompt": str, "response": str}  or  {"messages": [{"role", "content"}, ...]}   (+ optional "system")
    preference   {"prompt": str, "chosen": str, "rejected": str}                                  (+ optional "system")
    RL prompts   {"prompt": str}  or  {"question": str, "answer": str}  (GSM8K's keys); any "answer" is kept

Every conversation goes through the tokenizer's chat template. The trained tokens (loss_mask / response_mask = 1)
are each assistant turn's content plus its end-of-turn token (<|im_end|> for ChatML), so the model learns to stop;
the system prompt, the user turns and the template's role headers are masked (0). That is the lecture's SFT loss
-E[(1/|y|) sum_t log pi(y_t | x, y_<t)]: only the response y is scored, conditioned on the prompt x.

Masks align with input_ids: mask[t] = 1 means token t is a trained *target*; a caller predicting token t from the
logits at t - 1 shifts the mask with the labels (as Transformer.loss does).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from ragseek.model.tokenizer import Tokenizer
    from ragseek.train.distributed import World

ROLES = ("system", "user", "assistant")


# --------------------------------------------------------------------------------------------------------------------
# rows


def write_jsonl(path: str | Path, rows: Iterable[Mapping[str, Any]]) -> Path:
    """One JSON object per line, UTF-8; parent folders created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    return path


def read_jsonl(path: str | Path) -> Iterator[tuple[str, dict]]:
    """Yield ("file:line", row) for each non-blank line; a line that is not a JSON object is an error naming it."""
    path = Path(path)
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"{where}: not valid JSON ({e.msg}); write one JSON object per line"
                ) from None
            if not isinstance(row, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
            yield where, row


def _text(row: Mapping[str, Any], key: str) -> str:
    value = row.get(key)
    if not isinstance(value, str):
        raise ValueError(f"field {key!r} must be a string, got {type(value).__name__}")
    return value


def _with_system(row: Mapping[str, Any], messages: list[dict[str, str]]) -> list[dict[str, str]]:
    return [{"role": "system", "content": _text(row, "system")}, *messages] if "system" in row else messages


def sft_messages(row: Mapping[str, Any]) -> list[dict[str, str]]:
    """{"prompt", "response"} or {"messages"} -> a validated conversation that ends with an assistant turn."""
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError("'messages' must be a non-empty list of {'role', 'content'} objects")
        for i, m in enumerate(messages):
            if not (isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)):
                raise ValueError(
                    f"messages[{i}] must be {{'role': one of {ROLES}, 'content': str}}, got {m!r}"
                )
        if messages[-1]["role"] != "assistant":
            raise ValueError("the last message must be the assistant's (the response that is trained)")
        return [{"role": m["role"], "content": m["content"]} for m in messages]
    if "prompt" in row and "response" in row:
        return _with_system(
            row,
            [
                {"role": "user", "content": _text(row, "prompt")},
                {"role": "assistant", "content": _text(row, "response")},
            ],
        )
    raise ValueError(f"an SFT row needs 'prompt' and 'response', or 'messages'; got keys {sorted(row)}")


def tokenize_chat(tokenizer: Tokenizer, messages: Sequence[dict[str, str]]) -> tuple[list[int], list[int]]:
    """Token ids of the templated conversation and a mask that is 1 on every assistant turn's tokens.

    Assistant turn i's text is what the template adds after the generation prompt for messages[:i]; it is trained
    up to and including the end-of-turn token (the tokenizer's EOS, e.g. <|im_end|>), not the separator after it.
    A template that writes no EOS after a turn gets the EOS id appended there. The text is encoded piece by
    piece at these boundaries, which sit right after a role header or a special token.
    """
    full = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    eos_text = tokenizer.decode([tokenizer.eos_id], skip_special_tokens=False)
    pieces: list[tuple[str, bool]] = []  # (text, trained)
    pos = 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True)
        turn = tokenizer.apply_chat_template(messages[: i + 1], add_generation_prompt=False)
        if not (full.startswith(prefix) and full.startswith(turn) and pos <= len(prefix) <= len(turn)):
            raise ValueError(
                "the chat template does not render a conversation as the concatenation of its turns, "
                "so the assistant tokens cannot be located; use a ChatML-style template"
            )
        start, end = len(prefix), turn.rfind(eos_text, len(prefix))
        end = len(turn) if end < 0 else end + len(eos_text)
        pieces += [(full[pos:start], False), (turn[start:end], True)]
        pos = end
    pieces.append((full[pos:], False))

    ids: list[int] = []
    mask: list[int] = []
    for text, trained in pieces:
        piece = tokenizer.encode(text) if text else []
        if trained and (not piece or piece[-1] != tokenizer.eos_id):
            piece.append(tokenizer.eos_id)
        ids += piece
        mask += [int(trained)] * len(piece)
    return ids, mask


# --------------------------------------------------------------------------------------------------------------------
# datasets: lists of dicts of token lists


def load_sft(
    path: str | Path, tokenizer: Tokenizer, max_len: int, pack: bool = False
) -> list[dict[str, list[int]]]:
    """SFT examples {"input_ids", "loss_mask"}, cut to max_len tokens (the end is cut).

    An example left with no trained token after the cut is dropped, with a warning that counts them.
    pack=True concatenates whole examples, in file order, into rows of at most max_len tokens, each example still
    computed alone (see `pack_examples`).
    """
    examples, dropped = [], 0
    for where, row in read_jsonl(path):
        try:
            ids, mask = tokenize_chat(tokenizer, sft_messages(row))
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        if not any(mask[:max_len]):
            dropped += 1
            continue
        examples.append({"input_ids": ids[:max_len], "loss_mask": mask[:max_len]})
    _warn_dropped(path, dropped, f"no response token within max_len={max_len}")
    return pack_examples(examples, max_len) if pack else examples


def pack_examples(examples: Sequence[dict[str, list[int]]], max_len: int) -> list[dict[str, list[int]]]:
    """Greedy packing: append whole examples to the current row while it stays <= max_len tokens, else start a row.

    Each row gets "segments", every token's example index in the row (0, 0, 0, 1, 1, ...). The model given them
    (`Transformer.forward(segments=...)`) restarts positions at 0 for each example and blocks attention between
    examples, so a packed example's logits are those it has alone; only the padding saved differs. The loss masks
    are concatenated, so only response tokens are trained; `sft_loss(segments=...)` counts each packed example as
    its own sequence in the sequence mean.
    """
    rows: list[dict[str, list[int]]] = []
    for ex in examples:
        if rows and len(rows[-1]["input_ids"]) + len(ex["input_ids"]) <= max_len:
            row, segment = rows[-1], rows[-1]["segments"][-1] + 1
        else:
            row, segment = {key: [] for key in [*ex, "segments"]}, 0
            rows.append(row)
        for key, value in ex.items():
            row[key].extend(value)
        row["segments"].extend([segment] * len(ex["input_ids"]))
    return rows


def load_preference(path: str | Path, tokenizer: Tokenizer, max_len: int) -> list[dict[str, list[int]]]:
    """Preference pairs {"chosen_ids", "chosen_mask", "rejected_ids", "rejected_mask"}: prompt + each response,
    templated, masks on the response tokens, each cut to max_len (a pair is dropped, with a warning, when either
    side keeps no response token)."""
    pairs, dropped = [], 0
    for where, row in read_jsonl(path):
        try:
            missing = {"prompt", "chosen", "rejected"} - set(row)
            if missing:
                raise ValueError(
                    f"a preference row needs 'prompt', 'chosen' and 'rejected'; missing {sorted(missing)}"
                )
            prompt = _with_system(row, [{"role": "user", "content": _text(row, "prompt")}])
            sides = {
                side: tokenize_chat(tokenizer, [*prompt, {"role": "assistant", "content": _text(row, side)}])
                for side in ("chosen", "rejected")
            }
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        if not all(any(mask[:max_len]) for _, mask in sides.values()):
            dropped += 1
            continue
        pair = {}
        for side, (ids, mask) in sides.items():
            pair[f"{side}_ids"], pair[f"{side}_mask"] = ids[:max_len], mask[:max_len]
        pairs.append(pair)
    _warn_dropped(path, dropped, f"a response with no token within max_len={max_len}")
    return pairs


def load_prompts(path: str | Path, tokenizer: Tokenizer, max_len: int) -> list[dict[str, Any]]:
    """RL prompts {"prompt_ids", "prompt", "answer", ...}: the question templated with the generation prompt
    (`<|im_start|>assistant\\n`), ready to sample from; the row's answer (or None) and its other columns are kept
    for the rewards.
    Prompts longer than max_len tokens are dropped with a warning (cutting one would cut the template)."""
    prompts, dropped = [], 0
    for where, row in read_jsonl(path):
        try:
            key = "prompt" if "prompt" in row else "question"
            if key not in row:
                raise ValueError(f"a prompt row needs 'prompt' or 'question'; got keys {sorted(row)}")
            answer = _text(row, "answer") if "answer" in row else None
            messages = _with_system(row, [{"role": "user", "content": _text(row, key)}])
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        ids = tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
        if len(ids) > max_len:
            dropped += 1
            continue
        columns = {k: v for k, v in row.items() if k not in (key, "system", "answer")}
        prompts.append({**columns, "prompt_ids": ids, "prompt": row[key], "answer": answer})
    _warn_dropped(path, dropped, f"a prompt longer than max_len={max_len}")
    return prompts


def _warn_dropped(path: str | Path, n: int, why: str) -> None:
    if n:
        warnings.warn(f"{path}: dropped {n} row(s) with {why}; raise max_len to keep them", stacklevel=3)


# --------------------------------------------------------------------------------------------------------------------
# collators: right padding; masks are 0 on padding


def pad_right(seqs: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    """(B, T_max) long tensor, each row followed by `value`."""
    width = max(len(s) for s in seqs)
    return torch.tensor([list(s) + [value] * (width - len(s)) for s in seqs], dtype=torch.long)


def _attention_mask(seqs: Sequence[Sequence[int]]) -> torch.Tensor:
    return pad_right([[1] * len(s) for s in seqs], 0)


def collate_sft(rows: Sequence[Mapping[str, Sequence[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """{"input_ids", "loss_mask", "attention_mask"}, each (B, T_max); packed rows (`pack_examples`) add their
    "segments", -1 on padding."""
    ids = [r["input_ids"] for r in rows]
    batch = {
        "input_ids": pad_right(ids, pad_id),
        "loss_mask": pad_right([r["loss_mask"] for r in rows], 0),
        "attention_mask": _attention_mask(ids),
    }
    if "segments" in rows[0]:
        batch["segments"] = pad_right([r["segments"] for r in rows], -1)
    return batch


def collate_preference(rows: Sequence[Mapping[str, Sequence[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """{"input_ids", "response_mask", "attention_mask"}, each (2B, T_max): rows [0, B) are the chosen responses,
    rows [B, 2B) the rejected ones, so one forward pass scores both (split with `.chunk(2)`)."""
    ids = [r["chosen_ids"] for r in rows] + [r["rejected_ids"] for r in rows]
    masks = [r["chosen_mask"] for r in rows] + [r["rejected_mask"] for r in rows]
    return {
        "input_ids": pad_right(ids, pad_id),
        "response_mask": pad_right(masks, 0),
        "attention_mask": _attention_mask(ids),
    }


# --------------------------------------------------------------------------------------------------------------------
# a resumable sampler


class EpochSampler:
    """Shuffled batches of example indices, epoch after epoch, resumable from its position.

    Epoch e visits randperm(n) drawn from a generator seeded with seed + e, so (epoch, index, seed) alone
    restores the stream after a kill: no generator state is saved. A tail shorter than batch_size is skipped,
    so every batch splits evenly into micro-batches.

    Under torchrun (`world`), batch_size is the global batch: every rank walks the same order and position, and
    `next_batch` returns this rank's contiguous 1/W of each global batch (`World.share`), as DistributedSampler
    shards an epoch. The position is global, so a checkpoint resumes at any world size.
    """

    def __init__(
        self, n: int, batch_size: int, seed: int = 0, shuffle: bool = True, world: World | None = None
    ):
        if not 0 < batch_size <= n:
            raise ValueError(
                f"batch_size={batch_size} with {n} examples: need 0 < batch_size <= number of examples"
            )
        self.n, self.batch_size, self.seed, self.shuffle = n, batch_size, seed, shuffle
        self.epoch, self.index = 0, 0
        self.share = world.share(batch_size) if world is not None else slice(None)

    def order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.n))
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()

    def next_batch(self) -> list[int]:
        """The next global batch's indices (this rank's share of them under torchrun)."""
        if self.index + self.batch_size > self.n:
            self.epoch, self.index = self.epoch + 1, 0
        batch = self.order(self.epoch)[self.index : self.index + self.batch_size]
        self.index += self.batch_size
        return batch[self.share]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        if state["seed"] != self.seed:
            raise ValueError(
                f"the checkpoint's shuffle seed is {state['seed']}, this run's is {self.seed}: "
                f"resume with the same seed"
            )
        self.epoch, self.index = state["epoch"], state["index"]
