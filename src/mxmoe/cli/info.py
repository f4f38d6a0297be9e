"""Show the device, the versions, and which backends are usable here (and why not)."""

from __future__ import annotations

from ._common import environment, header


def add_arguments(parser) -> None:
    pass


def run(args) -> int:
    from ..backends import backends

    info = environment()
    print(header(info))
    print()
    print(f"{'backend':<16} {'usable':<7} reason")
    for name, (usable, reason) in backends().items():
        print(f"{name:<16} {'yes' if usable else 'no':<7} {reason}")
    return 0
