"""One recipe per method, `python -m ragseek.train.recipes.NAME` or `ragseek train NAME`: setup, an explicit loop, the
final model. A recipe imports components (`ragseek.train.*`), never another recipe (tests/train/test_layout.py)."""
