"""The package layout docs/architecture.md promises: no module longer than it says."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 520  # docs/architecture.md


@pytest.mark.parametrize("package", ["streamdet", "engines", "pipeline", "training"])
def test_no_module_is_longer_than_the_architecture_doc_says(package):
    long = {str(p.relative_to(ROOT)): n for p in sorted((ROOT / package).rglob("*.py"))
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split them, or change docs/architecture.md): {long}"
    assert f"longer than {MAX_LINES} lines" in (ROOT / "docs" / "architecture.md").read_text()
