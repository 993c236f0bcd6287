"""Classes defined inside a function (so that torch is imported only where it is needed) made picklable: the stage
cache saves whole models, and pickle finds a class by ``module.QualifiedName``.

``@picklable`` on the factory runs it once and publishes each class it returns as ``<module>.<ClassName>``; the
module's ``__getattr__ = lazy_classes(__name__, {"ClassName": factory})`` lets a fresh process that unpickles a
model (a resumed build) find the class before anything called the factory.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable


def picklable(factory: Callable) -> Callable:
    once = functools.cache(factory)

    @functools.wraps(factory)
    def wrapper():
        out = once()
        module = sys.modules[factory.__module__]
        for cls in out if isinstance(out, tuple) else (out,):
            if module.__dict__.get(cls.__name__) is not cls:
                cls.__qualname__ = cls.__name__
                setattr(module, cls.__name__, cls)
        return out

    return wrapper


def lazy_classes(module_name: str, factories: dict[str, Callable]) -> Callable[[str], type]:
    def __getattr__(name: str):
        if name in factories:
            factories[name]()
            return sys.modules[module_name].__dict__[name]
        raise AttributeError(f"module {module_name!r} has no attribute {name!r}")

    return __getattr__
