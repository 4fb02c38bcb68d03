"""Distillation, both kinds of the lecture, from a teacher into a (smaller) student.

    ragseek train distill --config configs/distill.yaml --set kind=data    # teacher writes an SFT set, then `sft`
    ragseek train distill --config configs/distill.yaml --set kind=logit   # soft targets on the fly

kind=data  (data-augmentation distillation): the teacher answers every prompt of `data` (JSONL {"prompt"} or
           {"question"}, optional "system"); its answers become SFT rows {"prompt", "response"} written to
           `generated`, and the student is fine-tuned on them with the SFT loss (`losses.sft_loss`, as `sft`). The teacher is any ragseek
           model (a folder or .gguf: `local:PATH`, or a bare path), a transformers folder (`hf:PATH`) or an
           OpenAI-compatible endpoint (`openai:MODEL` with `teacher_base_url`), through `ragseek.llm.load_llm`.
kind=logit (the "traditional" distillation, Hinton et al. 2015): on SFT rows, the student minimises
               L = α · CE(y, p_S) + (1 − α) · T² · KL(softmax(z_T / T) ‖ softmax(z_S / T))
           with the teacher's logits z_T computed on the fly (`losses.distill_loss`); teacher and student must share
           the tokenizer, so their vocabularies are checked first.
Both kinds then run one loop over SFT rows; only the loss differs. The student is saved with its tokenizer to
`<out_dir>/final`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from torch import Tensor

from ragseek.config import config_field as _f
from ragseek.model import Tokenizer, Transformer
from ragseek.train.data import EpochSampler, collate_sft, load_sft, read_jsonl, write_jsonl
from ragseek.train.distributed import World
from ragseek.train.loop import LoopConfig, build_optimizer, micro_batches, set_seed, train_step
from ragseek.train.losses import SFTReduction, distill_loss, sft_loss
from ragseek.train.run import MODEL_HELP, RecipeConfig, frozen, load_model, loop_field, recipe_main, start_run

DistillKind = Literal["data", "logit"]
PLOT_KEYS: dict[DistillKind, tuple[str, ...]] = {
    "data": ("loss", "lr", "grad_norm"),
    "logit": ("loss", "ce", "kl", "lr"),
}


@dataclass
class DistillConfig(RecipeConfig):
    kind: DistillKind = _f(
        "logit", "data: the teacher writes an SFT set for the student; logit: soft targets"
    )
    teacher: str = _f(
        "", "kind=data: local:PATH | hf:PATH | openai:MODEL | a bare path; kind=logit: a ragseek model path"
    )
    teacher_base_url: str = _f("", "base URL of an OpenAI-compatible endpoint (teacher openai:MODEL)")
    student: str = _f("", f"the model trained: {MODEL_HELP}")
    data: str = _f(
        "", 'kind=data: JSONL prompts {"prompt"} or {"question"}; kind=logit: SFT rows {"prompt", "response"}'
    )
    generated: str = _f(
        "", "kind=data: where the teacher's SFT rows are written (empty: <out_dir>/teacher_sft.jsonl)"
    )
    max_new_tokens: int = _f(256, "kind=data: the teacher's answer length cap")
    gen_temperature: float = _f(0.0, "kind=data: the teacher's sampling temperature (0: greedy)")
    alpha: float = _f(
        0.5, "kind=logit: α, the weight of the hard-target cross-entropy (1 − α on the soft KL)"
    )
    temperature: float = _f(2.0, "kind=logit: T, the softmax temperature of both models in the KL term")
    max_len: int = _f(512, "tokens per training example (the end is cut)")
    pack: bool = _f(False, "kind=data: pack the generated examples (see sft)")
    batch_size: int = _f(8, "examples per optimizer step")
    reduction: SFTReduction = _f("sequence", "kind=data: the SFT loss's reduction (see sft)")
    loop: LoopConfig = loop_field(lr=1e-3, out_dir="runs/distill")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.kind not in get_args(DistillKind):
            raise ValueError(f"kind={self.kind!r}: choose one of {sorted(get_args(DistillKind))}")


# ---------------------------------------------------------------------------------------------------------------------
# kind=data: the teacher writes an SFT set


def teacher_llm(spec: str, base_url: str = ""):
    """A `ragseek.llm` backend for the teacher: a load_llm spec, or a bare model path (read as local:PATH)."""
    from ragseek.llm import load_llm

    if spec != "local" and not spec.startswith(("local:", "hf:", "openai:")):
        spec = f"local:{spec}"
    return load_llm(spec, base_url or None)


def generate_sft_data(
    llm, prompts_path: str | Path, out_path: str | Path, max_new_tokens: int, temperature: float = 0.0
) -> Path:
    """The teacher's answer to every prompt, as SFT rows {"prompt", "response"} (+ "system"), written atomically."""
    rows = []
    for where, row in read_jsonl(prompts_path):
        key = "prompt" if "prompt" in row else "question"
        if not isinstance(row.get(key), str):
            raise ValueError(
                f"{where}: a prompt row needs a string 'prompt' or 'question'; got keys {sorted(row)}"
            )
        rows.append({"prompt": row[key], **({"system": row["system"]} if "system" in row else {})})
    chats = [
        ([{"role": "system", "content": r["system"]}] if "system" in r else [])
        + [{"role": "user", "content": r["prompt"]}]
        for r in rows
    ]
    answers = llm.complete(chats, max_tokens=max_new_tokens, temperature=temperature)
    out_path = Path(out_path)
    tmp = out_path.with_name(f".{out_path.name}.tmp{os.getpid()}")
    write_jsonl(tmp, ({**r, "response": a} for r, a in zip(rows, answers, strict=True)))
    return tmp.replace(out_path)


def teacher_sft_data(cfg: DistillConfig, write: bool = True) -> Path:
    """The teacher's SFT set for kind=data, generated once (kept when resuming); `write=False` (torchrun's ranks
    other than 0) only names the file rank 0 writes."""
    generated = Path(cfg.generated or Path(cfg.loop.out_dir) / "teacher_sft.jsonl")
    if write and not (cfg.loop.resume and generated.exists()):
        generated.parent.mkdir(parents=True, exist_ok=True)
        llm = teacher_llm(cfg.teacher, cfg.teacher_base_url)
        generate_sft_data(llm, cfg.data, generated, cfg.max_new_tokens, cfg.gen_temperature)
        print(f"teacher answers written to {generated}", flush=True)
    return generated


# ---------------------------------------------------------------------------------------------------------------------
# kind=logit: soft targets on the fly


def check_same_vocabulary(
    teacher: Transformer, student: Transformer, teacher_tok: Tokenizer, student_tok: Tokenizer
) -> None:
    """Logit distillation compares distributions over one vocabulary: the sizes and the tokenizers must agree."""
    if teacher.cfg.vocab_size != student.cfg.vocab_size:
        raise ValueError(
            f"teacher vocab_size={teacher.cfg.vocab_size}, student vocab_size={student.cfg.vocab_size}: logit "
            "distillation needs one shared tokenizer; build the student with the teacher's vocabulary, or use kind=data"
        )
    if teacher_tok.backend.get_vocab() != student_tok.backend.get_vocab():
        raise ValueError(
            "the teacher's and the student's tokenizers map tokens to different ids: save the teacher's tokenizer "
            "beside the student (tokenizer.save), or use kind=data"
        )


def load_teacher(cfg: DistillConfig) -> tuple[Transformer, Tokenizer]:
    """kind=logit's teacher, a frozen ragseek model: "local" is the embedded SmolLM2, "local:PATH" or a bare PATH."""
    if cfg.teacher.startswith(("hf:", "openai:")):
        raise ValueError(
            f"teacher={cfg.teacher!r}: kind=logit needs the teacher's logits, a ragseek model path"
        )
    teacher, tokenizer = load_model("" if cfg.teacher == "local" else cfg.teacher.removeprefix("local:"))
    return frozen(teacher), tokenizer


# ---------------------------------------------------------------------------------------------------------------------
# the recipe


def train(cfg: DistillConfig) -> list[dict]:
    """Distil as configured: the SFT loss on the teacher's answers (kind=data) or distill_loss against the frozen
    teacher's logits on the SFT rows of `data` (kind=logit); returns this run's metrics rows."""
    world = World.join(cfg.loop)
    # rank 0 asks the teacher (once); the other ranks then read its answers
    with world.main_first():
        data = teacher_sft_data(cfg, world.main) if cfg.kind == "data" else cfg.data
    set_seed(cfg.loop.seed)
    teacher = None
    if cfg.kind == "logit":
        teacher, teacher_tok = load_teacher(cfg)
        teacher = world.place(teacher)
    student, tokenizer = load_model(cfg.student)
    if teacher is not None:
        check_same_vocabulary(teacher, student, teacher_tok, tokenizer)
    student.train()
    examples = load_sft(data, tokenizer, cfg.max_len, cfg.pack and cfg.kind == "data")
    sampler = EpochSampler(len(examples), cfg.batch_size, seed=cfg.loop.seed, world=world)
    trained = world.parallelize(student, cfg.loop)
    optimizer = build_optimizer(student, cfg.loop)
    run = start_run(cfg, cfg.loop, trained, optimizer, sampler)

    def loss_fn(batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        ids, attention, targets = batch["input_ids"], batch["attention_mask"], batch["loss_mask"][:, 1:]
        if teacher is None:
            # packed rows (pack=true) carry segments: each example computed and averaged alone
            segments = batch.get("segments")
            logits = student(ids, attention_mask=attention, segments=segments)[:, :-1]
            return sft_loss(
                logits, ids[:, 1:], targets, cfg.reduction, None if segments is None else segments[:, 1:]
            )
        teacher_logits = teacher(ids, attention_mask=attention)[:, :-1]
        student_logits = student(ids, attention_mask=attention)[:, :-1]
        return distill_loss(student_logits, teacher_logits, ids[:, 1:], targets, cfg.alpha, cfg.temperature)

    for step in range(run.start, cfg.loop.max_steps):
        batch = collate_sft([examples[i] for i in sampler.next_batch()], tokenizer.pad_id)
        micro = micro_batches(batch, cfg.loop.grad_accum)
        metrics = train_step(optimizer, micro, loss_fn, cfg.loop, step, trained)
        run.end_step(step + 1, metrics, int(batch["attention_mask"].sum()))
    return run.finish(PLOT_KEYS[cfg.kind], student, tokenizer)


main = recipe_main(DistillConfig, train)
