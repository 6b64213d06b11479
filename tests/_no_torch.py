"""Pure modules (plan, lint, catalog, reports) never import torch: a fresh interpreter runs the code and checks."""

from __future__ import annotations

import subprocess
import sys


def assert_runs_without_torch(statements: str) -> None:
    """Run ``statements`` (one line of Python) in a new interpreter; fail if it errors or torch got imported."""
    code = f"import sys; {statements}; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
