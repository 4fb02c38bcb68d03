"""Toy tasks with checkable answers for the post-training recipes (the lecture's 2-digit addition)."""
