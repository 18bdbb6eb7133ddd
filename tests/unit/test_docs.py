"""The README documents every setting the code reads."""

import dataclasses
from pathlib import Path

from functions.settings import Settings

README = (Path(__file__).parents[2] / "README.md").read_text()


def test_every_setting_is_in_the_readme_configuration_table() -> None:
    table = README[README.index("## Configuration") : README.index("## Performance")]
    missing = [
        f"TASKRUNNER_{name.upper()}"
        for name in (field.name for field in dataclasses.fields(Settings))
        if f"`TASKRUNNER_{name.upper()}`" not in table
    ]
    assert missing == []
