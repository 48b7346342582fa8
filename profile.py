"""profile.py: Juliet's measurements (paper §5.1, §5.2, §5.3, §6.1) -- and a superset of the stdlib `profile`.

This file shares its name with the standard library's `profile`, which `cProfile` imports and torch
imports `cProfile` (torch._dynamo). With the repo directory first on sys.path, `import profile` finds
this file, so it first loads the standard library's profile.py under another name and re-exports what
`cProfile` needs (`run`, `runctx`, `Profile`, `_Utils`). Top-level imports stay plain `import x`:
this module may run while torch itself is still importing (DESIGN §1).
"""

import importlib.util
import os
import sysconfig


def _load_stdlib_profile():
    path = os.path.join(sysconfig.get_paths()["stdlib"], "profile.py")
    spec = importlib.util.spec_from_file_location("_stdlib_profile", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_stdlib_profile = _load_stdlib_profile()
run, runctx, Profile, _Utils = (_stdlib_profile.run, _stdlib_profile.runctx,
                                _stdlib_profile.Profile, _stdlib_profile._Utils)
