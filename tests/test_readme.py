"""The README's Python API blocks run as written, in order, in a temporary folder with a
temporary ledger (`DPWA_LEDGER`), so a pasted example never touches a user's real ledger."""

import re
import shutil

from tests.conftest import ROOT


def _python_blocks(section: str) -> list[str]:
    text = (ROOT / "README.md").read_text()
    start = text.index(f"## {section}\n")
    end = text.index("\n## ", start + 1)
    return re.findall(r"```python\n(.*?)```", text[start:end], flags=re.S)


def test_the_python_api_blocks_run(tmp_path, monkeypatch, capsys):
    from dpwa.data import SOURCES
    from dpwa.methods import METHODS
    from dpwa.models import MODELS

    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DPWA_LEDGER", str(tmp_path / "never-used.sqlite"))  # the blocks name their own
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    registries = [(r, set(r)) for r in (SOURCES, METHODS, MODELS)]
    blocks = _python_blocks("Python API")
    assert len(blocks) >= 5
    scope: dict = {}
    try:
        for block in blocks:
            exec(compile(block, "README.md", "exec"), scope)  # noqa: S102 - the README's own examples
    finally:
        for registry, before in registries:
            for name in set(registry) - before:
                del registry[name]
    out = capsys.readouterr().out
    assert "would spend epsilon" in out and "\n20\n" in out
    assert (tmp_path / "example-ledger.sqlite").exists() and not (tmp_path / "never-used.sqlite").exists()
