"""Where every benchmark script writes its JSON result (the scripts import this from their own folder)."""

import json
import os


def save_result(path: str, result: dict) -> None:
    """Write ``result`` as indented JSON at ``path``, making its folder."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1, default=str)


def print_and_save(result: dict, path: str | None) -> None:
    """Print ``result`` as indented JSON, and save it at ``path`` when one is given."""
    print(json.dumps(result, indent=1, default=str))
    if path:
        save_result(path, result)
