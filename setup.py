"""Build hook: copy the top-level `conf/` tree into the wheel as `rlloop/_conf/`.

Everything else is in pyproject.toml. The config tree stays at the repository's top level, where a
checkout and an editable install read it; a wheel carries a copy, found by `rlloop.confdir.conf_dir()`.
(MANIFEST.in puts conf/ into the sdist, so a wheel built from the sdist gets it too.)
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

CONF = Path(__file__).resolve().parent / "conf"


class build_py_with_conf(build_py):
    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install reads the checkout's conf/ itself
        if not (CONF / "config.yaml").is_file():
            raise RuntimeError(f"{CONF}/config.yaml is missing: rlloop's config tree must ship with the package")
        target = Path(self.build_lib) / "rlloop" / "_conf"
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(CONF, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


setup(cmdclass={"build_py": build_py_with_conf})
