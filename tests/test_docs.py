"""The README's option table and YAML keys are the settings object's options."""

import re

from conftest import ROOT

from mlx_lm_optiq import settings


def test_readme_lists_every_option_and_no_other():
    text = (ROOT / "README.md").read_text()
    table = set(re.findall(r"^\| `(--[a-z-]+)", text, flags=re.M))
    options = {settings.option_name(f.name) for f in settings.options()}
    assert table == options
    yaml = re.search(r"the YAML keys are (.+?)\. A run", text, flags=re.S).group(1)
    assert set(re.findall(r"`([a-z_]+)`", yaml)) == {f.name for f in settings.options()}
