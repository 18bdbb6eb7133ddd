"""The SAM template: valid for cfn-lint, and offering the parameters infra/README.md documents."""

import re
import subprocess
import sys
from pathlib import Path

from functions.kinds import KINDS
from functions.settings import Settings

TEMPLATE = Path(__file__).parents[2] / "infra" / "template.yaml"
CFN_LINT = str(Path(sys.executable).parent / "cfn-lint")


def test_template_passes_cfn_lint() -> None:
    result = subprocess.run([CFN_LINT, str(TEMPLATE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_template_wires_both_handlers_and_the_documented_parameters() -> None:
    text = TEMPLATE.read_text()
    assert "Handler: functions.api.handler" in text
    assert "Handler: functions.tick.handler" in text
    section = text[text.index("\nParameters:") : text.index("\nConditions:")]
    parameters = set(re.findall(r"^  (\w+):\n    Type:", section, re.M))
    readme = (TEMPLATE.parent / "README.md").read_text()
    documented = set(re.findall(r"^\| `(\w+)`(?:, `(\w+)`)? \|", readme, re.M))
    names = {name for pair in documented for name in pair if name}
    assert parameters == names, f"template {sorted(parameters)} vs README {sorted(names)}"


def test_tick_timeout_leaves_room_for_the_longest_kind() -> None:
    """A tick shorter than the longest kind plus the deadline margin would never run that kind."""
    found = re.search(
        r"\n  TickTimeoutSeconds:\n(?:    .*\n)*?    MinValue: (\d+)\n", TEMPLATE.read_text()
    )
    assert found is not None
    settings = Settings()
    longest = max(kind.max_seconds(settings) for kind in KINDS.values())
    assert int(found[1]) >= longest + settings.deadline_margin_s
