"""``kernels: liger``: liger-kernel's instance patching, made revertible.

``_apply_liger_kernel_to_instance`` rebinds module forwards on the instance but, depending on the
liger version, also assigns class attributes (``<Family>ForCausalLM.forward``) and module globals
(``apply_rotary_pos_emb``): process-wide. We snapshot every forward (instance and class) and those
globals of the model's modeling modules first, and the handle restores them on revert.
"""

from __future__ import annotations

import sys

from .handle import _MISSING, PatchHandle

_GLOBALS = ("apply_rotary_pos_emb", "rotate_half")


def apply_liger_revertibly(base, handle: PatchHandle, apply_fn) -> None:
    modules = list(base.modules())
    inst = [(m, m.__dict__.get("forward", _MISSING)) for m in modules]
    classes = {type(m) for m in modules}
    cls_fwd = [(c, c.__dict__.get("forward", _MISSING)) for c in classes]
    mods = {sys.modules.get(c.__module__) for c in classes} - {None}
    glob = [(md, g, md.__dict__.get(g, _MISSING)) for md in mods for g in _GLOBALS]
    apply_fn(model=base)

    def undo():
        for m, old in inst:
            if old is _MISSING:
                m.__dict__.pop("forward", None)
            else:
                m.forward = old
        for c, old in cls_fwd:
            if old is not _MISSING and c.__dict__.get("forward") is not old:
                setattr(c, "forward", old)
        for md, g, old in glob:
            if old is not _MISSING:
                setattr(md, g, old)

    handle.add_undo(undo)
    handle.patched["liger"] = 1
