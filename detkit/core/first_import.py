"""Code run around the first import of a top-level package.

``wrap(package, around)`` puts a finder first on ``sys.meta_path`` that finds ``package`` as the
path finder does and loads it through ``around(module, execute)``: ``execute()`` runs the
package's own body, and ``around`` decides what happens before and after it. The finder removes
itself when the package is loaded (not when it is only looked up: TensorFlow looks Keras up with
``importlib.util.find_spec`` before importing it), so submodules and later imports go the usual way,
a retry after a failed import too.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from collections.abc import Callable
from types import ModuleType

Around = Callable[[ModuleType, Callable[[], None]], None]


def wrap(package: str, around: Around) -> None:
    if package in sys.modules or any(isinstance(f, _Finder) and f.package == package for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _Finder(package, around))


class _Finder(importlib.abc.MetaPathFinder):
    def __init__(self, package: str, around: Around):
        self.package, self.around = package, around

    def find_spec(self, name, path=None, target=None):
        if name != self.package:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader, self)
        return spec


class _Loader(importlib.abc.Loader):
    def __init__(self, loader, finder: _Finder):
        self.loader, self.finder = loader, finder

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        if self.finder in sys.meta_path:
            sys.meta_path.remove(self.finder)
        try:
            self.finder.around(module, lambda: self.loader.exec_module(module))
        finally:  # the package's own loader again, for its resources (importlib.resources, pkgutil.get_data)
            module.__loader__ = module.__spec__.loader = self.loader
