"""The reader as it was before issue 19 (commit b7d3ebe), loaded from git into a private module:
the negative control that shows the differential and attack tests can fail."""

from __future__ import annotations

import functools
import importlib.util
import os
import subprocess
import sys
import tempfile

OLD_COMMIT = "b7d3ebe"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@functools.lru_cache(maxsize=1)
def old_safe_pickle():
    source = subprocess.run(["git", "-C", REPO, "show", f"{OLD_COMMIT}:src/ckpt_migrate/safe_pickle.py"],
                            capture_output=True, check=True).stdout
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "old_safe_pickle_b7d3ebe.py")
        with open(path, "wb") as f:
            f.write(source)
        spec = importlib.util.spec_from_file_location("old_safe_pickle_b7d3ebe", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
        spec.loader.exec_module(module)
    return module
