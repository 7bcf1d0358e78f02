"""The layers of docs/architecture.md hold: checked by import-linter (the contracts live in
pyproject.toml) and by importing the light gateway without torch.

- the real tree keeps every contract;
- each kind of violation (a provider importing the gateway, local_backend importing the gateway,
  the core importing the API, a cycle between two core modules) breaks the contract that names
  it, so the checks are known to bite;
- `import gateway` (the app factory included) and a token count never import torch.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")

pytestmark = pytest.mark.skipif(not LINT_IMPORTS.exists(), reason="import-linter not installed")


def _lint(tree: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-logo", "--no-cache"],
        cwd=tree,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def tree_copy(tmp_path: Path) -> Path:
    for name in ("gateway", "providers", "local_backend"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def test_the_tree_keeps_every_contract() -> None:
    result = _lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 kept, 0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "line", "contract"),
    [
        ("providers/base.py", "import gateway.errors", "gateway over providers"),
        ("local_backend/formats/prompt_format.py", "import gateway.routing", "gateway over"),
        ("local_backend/engine.py", "import providers.base", "gateway over providers"),
        ("gateway/dispatch/dispatcher.py", "import gateway.api.state", "inside gateway"),
        ("gateway/routing/router.py", "import gateway.dispatch", "inside gateway"),
        ("gateway/routing/order.py", "import gateway.routing.router", "no import cycle"),
    ],
)
def test_a_violation_breaks_its_contract(
    tree_copy: Path, module: str, line: str, contract: str
) -> None:
    path = tree_copy / module
    path.write_text(path.read_text() + f"\n{line}  # injected by the test\n")
    result = _lint(tree_copy)
    assert result.returncode != 0, result.stdout
    broken = [row for row in result.stdout.splitlines() if row.endswith("BROKEN")]
    assert any(row.startswith(contract) for row in broken), result.stdout


def test_the_light_gateway_never_imports_torch() -> None:
    code = """
import sys
import gateway.api.app, gateway.cli
from gateway.routing.tokens import PromptCounter
from gateway.settings import Settings
from gateway.api.app import create_app
create_app(Settings(_env_file=None))
counter = PromptCounter()
chat = {"model": "wizardlm-2-8x22b", "messages": [{"role": "user", "content": "Hello there"}]}
n = counter.count_chat("wizardlm-2-8x22b", chat["messages"])
assert n > 3, n
heavy = sorted(m for m in ("torch", "numpy", "sentencepiece", "safetensors") if m in sys.modules)
print("HEAVY", heavy)
"""
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "HEAVY []" in result.stdout, result.stdout
