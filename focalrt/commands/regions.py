"""`focalrt regions`: the named regions, the landmarks they come from and the action units they carry."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("regions", help="list the named face regions and their FACS action units")
    p.set_defaults(func=run)


def run(args) -> int:
    from focalrt.runtime.regions import REGIONS

    width = max(len(n) for n in REGIONS)
    for name, region in REGIONS.items():
        print(f"{name:<{width}}  {' '.join(region.action_units):<40}  {region.description}")
    return 0
