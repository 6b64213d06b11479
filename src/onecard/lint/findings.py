"""What a lint rule reports (:class:`Finding`) and the small facts rules share; imported by rules.py and the
package, so neither imports the other."""

from __future__ import annotations

from dataclasses import asdict, dataclass

FLASH_ATTN_MIN = (2, 6, 3)   # first release with the fixes onecard relies on (softcapping, varlen fixes)


@dataclass(frozen=True)
class Finding:
    id: str
    severity: str        # error | warning | info
    message: str
    why: str
    fix: str
    where: str | None = None   # the file:line or recipe field at fault, where one is

    def to_dict(self) -> dict:
        return asdict(self)

