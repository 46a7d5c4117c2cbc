"""The reader as it was before issue 19 (commit b7d3ebe, kept verbatim in tests/data so a shallow
clone has it too), loaded into a private module: the negative control that shows the differential
and attack tests can fail."""

from __future__ import annotations

import functools
import importlib.util
import os
import sys

OLD_READER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "old_safe_pickle_b7d3ebe.py")


@functools.lru_cache(maxsize=1)
def old_safe_pickle():
    spec = importlib.util.spec_from_file_location("old_safe_pickle_b7d3ebe", OLD_READER)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module
