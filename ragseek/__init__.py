"""ragseek: RAG over real documents, a DeepSeek-style transformer and post-training, on one CPU. Where each
thing is (docs/README.md maps the lecture's concepts to files):

    model/       the Transformer (MHA/GQA/MQA/MLA, dense/MoE, MTP), tokenizer, decoding, checkpoints, LoRA
    llm/         LLM backends behind one protocol (local, hf:, openai:) and `ragseek serve`
    rag/         documents -> chunks -> store -> search -> ask with citations, and their evaluation
    train/       pretraining and post-training: components, then one recipe per method
    adapters/    the grounded-reader LoRA adapter `--llm local` puts on the embedded SmolLM2
    cli.py       the `ragseek` command, composed of each area's commands (`__main__.py`: `python -m ragseek`)
    config.py    config dataclasses: one field idiom, one loader (YAML + --set + flags) for every command
    errors.py    errors a user can act on: one line, exit 2
    defaults.py  where the embedded models, the cache and the shared data live
    runtime.py   threads torch computes with and how idle threads wait
    progress.py  progress lines on stderr
"""

__version__ = "0.1.0"
