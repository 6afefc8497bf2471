"""`focalrt regions`: the named regions, the landmarks they come from and the action units they carry."""

from __future__ import annotations

import textwrap

from focalrt.commands.args import add_parser

AU_WIDTH = 36  # long lists (mouth, face) wrap inside their column instead of pushing it out of line


def register(sub) -> None:
    p = add_parser(sub, "regions", help="list the named face regions and their FACS action units",
                   description="The names `--regions` accepts, what each covers, and the FACS action units it carries.")
    p.set_defaults(func=run)


def table(regions) -> list[str]:
    """Rows of name, description and action units, each column starting at the same offset on every line."""
    rows = [("region", "covers", "action units")]
    rows += [(name, r.description, " ".join(r.action_units)) for name, r in regions.items()]
    name_w = max(len(r[0]) for r in rows)
    desc_w = max(len(r[1]) for r in rows)
    lines = []
    for name, desc, aus in rows:
        wrapped = textwrap.wrap(aus, AU_WIDTH) or [""]
        lines.append(f"{name:<{name_w}}  {desc:<{desc_w}}  {wrapped[0]}".rstrip())
        lines += [f"{'':<{name_w}}  {'':<{desc_w}}  {more}" for more in wrapped[1:]]
    return lines


def run(args) -> int:
    from focalrt.runtime.faces.regions import REGIONS

    print("\n".join(table(REGIONS)))
    return 0
