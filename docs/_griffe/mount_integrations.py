"""Griffe extension for the API reference: the adapters in the repository's
``integrations/`` folder are installed as ``lips_wrap.integrations`` (see
``[tool.setuptools.package-dir]`` in pyproject.toml), a mapping static analysis
cannot see. This mounts the folder under ``lips_wrap`` so the reference documents,
and cross-references resolve to, ``lips_wrap.integrations.<module>``."""

from __future__ import annotations

from typing import Any

import griffe


class MountIntegrations(griffe.Extension):
    """Load ``integrations`` and make it the member ``integrations`` of ``lips_wrap``."""

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        if pkg.name != "lips_wrap" or "integrations" in pkg.members:
            return
        integrations = loader.load("integrations")
        pkg.set_member("integrations", integrations)
