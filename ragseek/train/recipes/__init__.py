"""One recipe per method, `ragseek train NAME`: setup, an explicit loop, the
final model. A recipe imports components (`ragseek.train.*`), never another recipe (tests/train/test_layout.py)."""
