"""Reading the JSON config file of an adapter directory."""

import json
from pathlib import Path
from typing import Callable


def read_json(path: Path, invalid: Callable[[str], Exception]):
    """The JSON value in ``path``; text that is not JSON (or not UTF-8) raises ``invalid(reason)``."""
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise invalid(str(e)) from e
