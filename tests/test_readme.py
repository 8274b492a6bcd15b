"""README.md's Python examples run as written, and print what their comments say."""

import contextlib
import io
import os
import re

import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def _blocks():
    text = open(README, encoding="utf-8").read()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def _expected_prints(code):
    """The comment after each print(...) line: what that line prints."""
    return [line.split("#", 1)[1].strip() for line in code.splitlines()
            if line.startswith("print(") and "#" in line]


BLOCKS = _blocks()


def test_readme_has_its_examples():
    assert len(BLOCKS) >= 3 and all(_expected_prints(code) for code in BLOCKS)


@pytest.mark.parametrize("code", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_example_runs_and_prints_what_it_says(code):
    if re.search(r"^(import|from) (convgen\.)?torch", code, flags=re.M):
        pytest.importorskip("torch")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, README, "exec"), {"__name__": "readme_example"})
    assert out.getvalue().splitlines() == _expected_prints(code)
