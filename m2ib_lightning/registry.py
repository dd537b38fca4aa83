"""One registry helper for everything a config picks by name: backbone adapters, attribution methods, probing
adapters and metrics. Each registry lists what it holds, creates an entry by name, and refuses a second entry
under a taken name unless ``overwrite=True``, so a plug-in cannot silently replace a shipped one."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError, ValueError):
    """A name no entry of the registry has; the message lists the registered ones."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class Registry(Mapping[str, T], Generic[T]):
    """Named entries of one ``kind``, in registration order (the order ``auto`` look-ups try them).

    Read like a dict (``name in registry``, ``registry[name]``, ``.items()``); written only by :meth:`register`.
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T | None = None, *, overwrite: bool = False) -> Any:
        """Add ``entry`` under ``name``; without ``entry``, a decorator that adds what it decorates.

        A taken name is refused unless ``overwrite=True``; a name must be non-empty and hold no ``:``
        (a config's ``package.module:Name`` is a dotted path, not a registered name).
        """
        if entry is None:
            def decorate(value: T) -> T:
                self.register(name, value, overwrite=overwrite)
                return value
            return decorate
        if not isinstance(name, str) or not name or ":" in name:
            raise ValueError(f"a {self.kind} name must be a non-empty string without ':', got {name!r}")
        if name in self._entries and not overwrite:
            raise ValueError(f"a {self.kind} named {name!r} is already registered (register it with overwrite=True to replace it)")
        self._entries[name] = entry
        return entry

    def names(self) -> list[str]:
        return list(self._entries)

    def create(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Call the entry named ``name`` (a class or factory) with these arguments."""
        factory: Callable[..., Any] = self[name]  # type: ignore[assignment]
        return factory(*args, **kwargs)

    def __getitem__(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownNameError(f"no {self.kind} named {name!r}; registered: {', '.join(self._entries) or 'none'}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self._entries)})"
