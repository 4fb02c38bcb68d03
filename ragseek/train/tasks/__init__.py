"""Tasks with checkable answers for the post-training recipes: data builders and how a model is scored on them.

`addition` (the lecture's 2-digit addition: SFT / DPO / GRPO rows, the held-out set), `math_eval` (accuracy on
{"question", "answer"} rows: `ragseek eval math`), `reader` (SQuAD-shaped RAG reading data).
"""
