"""train/ is components, then recipes that use them (torchtune's split): a recipe never imports another recipe.

The check reads each recipe's source (nothing is imported or run): every `import` and `from ... import` in its AST,
at any depth (a function-local import counts too), resolved against the package `ragseek.train.recipes`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import ragseek.train.recipes

RECIPES_DIR = Path(ragseek.train.recipes.__file__).parent
PACKAGE = "ragseek.train.recipes"


def recipe_names() -> set[str]:
    return {p.stem for p in RECIPES_DIR.glob("*.py") if p.stem != "__init__"}


def imported_modules(source: str, package: str = PACKAGE) -> set[str]:
    """Every module an import statement of `source` names, relative imports resolved against `package`; for
    `from X import a, b` both X and X.a, X.b (a name may be a submodule: `from ragseek.train.recipes import sft`)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def recipe_imports(source: str, recipes: set[str]) -> set[str]:
    """The recipes (names in `recipes`) that `source` imports."""
    return {
        name
        for module in imported_modules(source)
        for name in recipes
        if module == f"{PACKAGE}.{name}" or module.startswith(f"{PACKAGE}.{name}.")
    }


def test_the_recipes_are_the_seven_methods():
    assert recipe_names() == {"pretrain", "sft", "distill", "rm", "dpo", "ppo", "grpo"}


@pytest.mark.parametrize("name", sorted(recipe_names()))
def test_a_recipe_imports_no_other_recipe(name):
    source = (RECIPES_DIR / f"{name}.py").read_text()
    assert recipe_imports(source, recipe_names()) == set(), (
        f"recipes/{name}.py imports another recipe: move what it shares into a component (ragseek/train/*.py)"
    )


@pytest.mark.parametrize(
    "source",
    [
        "from ragseek.train.recipes import sft\n",
        "from ragseek.train.recipes.sft import SFTConfig\n",
        "import ragseek.train.recipes.sft\n",
        "import ragseek.train.recipes.sft as s\n",
        "from . import sft\n",
        "from .sft import train\n",
        "def f():\n    from ragseek.train.recipes import grpo, sft\n",
    ],
)
def test_the_check_catches_every_form_of_a_recipe_import(source):
    assert "sft" in recipe_imports(source, recipe_names())


@pytest.mark.parametrize(
    "source",
    [
        "from ragseek.train.run import start_run\n",
        "from ragseek.train import rollout\n",
        "import ragseek.train.losses\n",
        "from .. import data\n",
        "from ragseek.train.recipes_notes import sft\n",
    ],
)
def test_the_check_lets_components_through(source):
    assert recipe_imports(source, recipe_names()) == set()
