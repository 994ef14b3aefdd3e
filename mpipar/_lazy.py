"""Names of a package that load on first use (PEP 562), so importing the package imports nothing heavy."""

import importlib
from typing import Callable, Mapping, Optional, Tuple


def lazy_getattr(package: str, names: Mapping[str, Tuple[str, Optional[str]]], namespace: dict) -> Callable:
    """A module ``__getattr__`` for ``package`` that imports ``names[name] = (module, attribute)``
    (``attribute`` None: the module itself) on first use and keeps it in ``namespace``."""

    def __getattr__(name: str):
        if name not in names:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module_name, attribute = names[name]
        module = importlib.import_module(module_name)
        value = module if attribute is None else getattr(module, attribute)
        namespace[name] = value
        return value

    return __getattr__
