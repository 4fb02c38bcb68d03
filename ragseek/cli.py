"""The `ragseek` command. Each area keeps its commands beside its code; this file only composes them."""

from __future__ import annotations

import typer

from ragseek import progress, runtime
from ragseek.config import with_configs
from ragseek.errors import JSON_ASKED, CommandGroup
from ragseek.model.sampling import SamplingConfig

# rich_markup_mode=None: help texts are plain, so "[n]" and "[1]" print as written instead of vanishing as markup;
# CommandGroup prints an error a user can act on as one line, exit 2 (ragseek/errors.py)
app = typer.Typer(
    cls=CommandGroup,
    add_completion=False,
    rich_markup_mode=None,
    no_args_is_help=True,
    help="ragseek: RAG over your documents, a DeepSeek-style transformer, and post-training — on a CPU.",
)
eval_app = typer.Typer(no_args_is_help=True, help="Evaluate retrieval (beir) or a model (math).")
app.add_typer(eval_app, name="eval")


@app.callback()
def main(
    ctx: typer.Context,
    debug: bool = typer.Option(
        False,
        "--debug",
        envvar="RAGSEEK_DEBUG",
        help="show the traceback of an error instead of its one line (or set RAGSEEK_DEBUG=1)",
    ),
    threads: int = typer.Option(
        None,
        "--threads",
        envvar="RAGSEEK_THREADS",
        help="CPU threads torch computes with (default: one per core; idle threads sleep, so a CPU shared with "
        "other busy programs slows ragseek down instead of stalling it; docs/threads.md)",
    ),
) -> None:
    """The options every command takes (before its name: `ragseek --debug ask ...`)."""
    # before any command imports torch: the OpenMP runtime reads its settings when it loads (ragseek/runtime.py)
    runtime.use_threads(threads)
    runtime.quiet_libraries()
    progress.enable(progress.wanted(json_out=ctx.meta.get(JSON_ASKED, False)))


def generate(
    prompt: str = typer.Argument(..., help="the user message (or raw text with --raw)"),
    model: str = typer.Option(
        None, help="HF folder or .gguf file (default: the embedded SmolLM2-135M-Instruct)"
    ),
    system: str = typer.Option(None, help="system message (default: the model's chat template default)"),
    raw: bool = typer.Option(False, help="feed the prompt as is, without the chat template"),
    quantize: str = typer.Option(
        None,
        help="'int8' or 'int4' (llama.cpp's Q4_1 layout; the fastest at batch 1 with --compile): quantised "
        "weights for the linear layers (faster decoding on CPU)",
    ),
    compile_step: bool = typer.Option(
        False,
        "--compile",
        help="torch.compile the decoding step (needs a C++ compiler, else ignored): faster tokens after a first "
        "step that compiles for tens of seconds, so only worth it for long outputs",
    ),
    json_out: bool = typer.Option(
        False, "--json", help='print {"text", "tokens", "logprobs", "finish_reason"} instead of streaming'
    ),
    sampling: SamplingConfig = None,
) -> None:
    """Generate text with ragseek's own Transformer (streams to the terminal)."""
    import json
    import sys
    from pathlib import Path

    from ragseek.defaults import smollm2_gguf
    from ragseek.model import Transformer, load_tokenizer, stream
    from ragseek.model import generate as run_generate
    from ragseek.model.decoding import compile_decoding
    from ragseek.model.quant import quantize_weights

    path = model or str(smollm2_gguf())
    with progress.task(f"loading {Path(path).name}"):
        net = Transformer.from_pretrained(path)
        if quantize:
            quantize_weights(net, quantize)
        if compile_step:
            compile_decoding(net)
        tok = load_tokenizer(path)
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": prompt}
    ]
    text = prompt if raw else tok.apply_chat_template(messages, add_generation_prompt=True)
    if json_out:
        g = run_generate(net, tok, text, sampling)[0]
        print(
            json.dumps(
                {"text": g.text, "tokens": g.tokens, "logprobs": g.logprobs, "finish_reason": g.finish_reason}
            )
        )
        return
    for piece in progress.until_first(stream(net, tok, text, sampling), "reading the prompt"):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


# the sampling flags are SamplingConfig's fields (their help is written once, there)
app.command()(with_configs(generate, {"SamplingConfig": SamplingConfig}))

# Each area registers its own commands.
from ragseek.llm.cli import register as _register_llm  # noqa: E402
from ragseek.rag.cli import register as _register_rag  # noqa: E402
from ragseek.train.cli import register as _register_train  # noqa: E402
from ragseek.train.cli import register_data as _register_data  # noqa: E402
from ragseek.train.cli import register_math as _register_math  # noqa: E402

_register_rag(app, eval_app)
_register_math(eval_app)
_register_llm(app)
_register_train(app)
_register_data(app)
