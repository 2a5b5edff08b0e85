"""Where rlloop's Hydra config tree (the top-level `conf/`) lives, in a checkout and in an installed wheel.

The tree stays at the repository's top level (`conf/`, beside `rlloop/`), where a checkout and an
editable install (`pip install -e .`) read it. A wheel has no such folder, so the build copies it into
the package as `rlloop/_conf/` (setup.py's build_py hook). `conf_dir()` prefers that copy: inside an
installed wheel, `<site-packages>/conf` would be whatever another distribution put there, if anything.
"""

from __future__ import annotations

from pathlib import Path

from rlloop.errors import RlloopError

_PACKAGE = Path(__file__).resolve().parent
PACKAGED = _PACKAGE / "_conf"  # a wheel's copy (written by the build, never present in a checkout)
SOURCE = _PACKAGE.parent / "conf"  # the checkout's tree


def conf_dir() -> str:
    """Absolute path of the config tree: the wheel's packaged copy, else the checkout's `conf/`.

    Raises RlloopError naming both places when neither holds a config.yaml (a broken install).
    """
    for candidate in (PACKAGED, SOURCE):
        if (candidate / "config.yaml").is_file():
            return str(candidate)
    raise RlloopError(
        f"rlloop's config tree is missing: neither {PACKAGED} (an installed wheel) nor {SOURCE} (a "
        "checkout) holds config.yaml; reinstall rlloop (pip install .) or run from a checkout"
    )
