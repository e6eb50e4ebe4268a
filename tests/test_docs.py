"""The documents that are generated stay generated: a hand edit or a machine-local input would make them disagree
with what their command writes on a fresh clone."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_results_md_is_what_make_results_writes(tmp_path):
    out = tmp_path / "RESULTS.md"
    subprocess.run(["make", "-s", "results", f"PYTHON={sys.executable}", f"RESULTS_OUT={out}"], cwd=ROOT,
                   check=True, capture_output=True)
    assert out.read_text() == (ROOT / "docs" / "RESULTS.md").read_text(), \
        "docs/RESULTS.md differs from `make results`: edit docs/results_*.md or the CSVs, then run it"
