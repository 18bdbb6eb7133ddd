"""The code and the migrations agree on which schema revision is current."""

from alembic.config import Config
from alembic.script import ScriptDirectory

from functions.queries import SCHEMA_REVISION
from local.migrate import MIGRATIONS


def test_the_code_names_the_newest_migration() -> None:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    assert ScriptDirectory.from_config(config).get_current_head() == SCHEMA_REVISION
