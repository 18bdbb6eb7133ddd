"""The bench's raw references: our own statements as pgbench scripts (local/bench/references.py)."""

import re

from local.bench import references


def test_each_raw_script_names_only_the_pgbench_variables_it_sets() -> None:
    # pgbench reads `:name` anywhere in a script as a variable: one left in our SQL (a
    # to_char format's `HH24:MI:SS`) made every run of the API figures' references fail.
    scripts = {name: value for name, value in vars(references).items()
               if name.startswith("RAW_") and isinstance(value, str)}  # fmt: skip
    scripts["raw_get"] = references.raw_get(1, 10)
    assert {"RAW_INSERT", "RAW_PAGE"} <= scripts.keys()
    for name, script in scripts.items():
        set_here = set(re.findall(r"^\\set (\w+)", script, re.M))
        used = set(re.findall(r"(?<!:):([A-Za-z_]\w*)", script))
        assert used <= set_here, (name, sorted(used - set_here))
