"""ragseek model (exports are added once all modules exist)."""
