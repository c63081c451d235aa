"""Layer detection for timm models, from the model's own metadata.

``model.group_matcher()`` splits the parameters into a stem group, block groups and
the rest (neck, head); ``model.pretrained_cfg`` names the first conv and the
classifier. Eligible: layer weights (``families.LAYER_WEIGHTS``) inside a block group.
Exempt: the stem group, ``first_conv``, ``classifier``, everything the matcher leaves
out, and norms, biases, embeddings, tokens and scales anywhere. A model whose matcher
is missing, unusable or selects nothing falls back to the generic rule, with
``first_conv`` and ``classifier`` still exempt. timm itself is never imported.
"""

from __future__ import annotations

import fnmatch
import math
import re
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from torch import nn

from . import families
from .rules import NamedSlot, Verdict, generic_rule, layer_weight_verdict

# (compiled regex, group key, role, merges into the previous group)
_Entry = Tuple["re.Pattern[str]", str, str, bool]
# (group key, role, merges into the previous group, group numbers) of one name
Group = Tuple[str, str, bool, str]


def is_timm_model(model: nn.Module) -> bool:
    """Duck-typed: timm models carry a ``pretrained_cfg`` dict."""
    return isinstance(getattr(model, "pretrained_cfg", None), dict)


def _role(key: str) -> str:
    for glob, role in families.TIMM_GROUP_ROLES:
        if fnmatch.fnmatchcase(key, glob):
            return role
    return "head"


def _compile(matcher: dict) -> List[_Entry]:
    entries: List[_Entry] = []
    for key, spec in matcher.items():
        if spec is None:
            continue
        pairs = spec if isinstance(spec, (list, tuple)) else [(spec, None)]
        for pattern, ordinal in pairs:
            merge = bool(ordinal) and ordinal[-1] == families.TIMM_MERGE_ORDINAL
            entries.append((re.compile(pattern), key, _role(key), merge))
    return entries


def _match(entries: Sequence[_Entry], name: str) -> Optional[Group]:
    for regex, key, role, merge in entries:
        found = regex.match(name)
        if found:
            numbers = ".".join(g for g in found.groups() if g is not None)
            return key, role, merge, numbers
    return None


def _ordinal(matcher: Callable[[str], object], name: str) -> Tuple[float, ...]:
    value = matcher(name)
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def group_names(matcher: object, names: Sequence[str]) -> Optional[List[Optional[Group]]]:
    """The group of each name (None: in no group), or None if the matcher is unusable.

    A dict matcher names its groups; a callable one returns ordinals, where (as timm
    uses them) the lowest is the stem and ``inf`` is no group (the head).
    """
    if isinstance(matcher, dict):
        entries = _compile(matcher)
        return [_match(entries, name) for name in names]
    if not callable(matcher):
        return None
    ordinals = [_ordinal(matcher, name) for name in names]
    stem = min(ordinals, default=())
    return [
        None if math.isinf(o[0]) else
        ("group " + ".".join(f"{x:g}" for x in o), "stem" if o == stem else "blocks", False, "")
        for o in ordinals
    ]


def exempt_prefixes(model: nn.Module) -> List[Tuple[str, str]]:
    """(module prefix, reason) for the input stem and the classifier: the names
    ``pretrained_cfg`` gives, and the module(s) ``get_classifier()`` returns."""
    prefixes = []
    for key, what in families.TIMM_CFG_EXEMPT:
        value = model.pretrained_cfg.get(key)
        for prefix in [value] if isinstance(value, str) else list(value or ()):
            if prefix:
                prefixes.append((prefix, f"timm pretrained_cfg[{key!r}] = {prefix!r} ({what})"))
    try:
        heads = model.get_classifier()
    except (AttributeError, NotImplementedError):
        heads = ()
    heads = heads if isinstance(heads, (tuple, list)) else (heads,)
    for name, module in model.named_modules():
        if name and any(module is head for head in heads):
            prefixes.append((name, f"timm get_classifier() ({type(module).__name__})"))
    return prefixes


def _prefix_reason(name: str, prefixes: Sequence[Tuple[str, str]]) -> Optional[str]:
    for prefix, reason in prefixes:
        if name == prefix or name.startswith(prefix + "."):
            return reason
    return None


def _metadata_verdicts(
    model: nn.Module,
    slots: Sequence[NamedSlot],
    matches: Sequence[Optional[Group]],
    source: str,
) -> Dict[str, Verdict]:
    cfg_prefixes = exempt_prefixes(model)
    # A merged entry (final norm, conv_head) after the last regular block entry sits
    # after the blocks; one before it (a transition between stages) sits among them.
    last_block = max(
        (i for i, m in enumerate(matches) if m and m[1] == "blocks" and not m[2]), default=-1
    )
    verdicts: Dict[str, Verdict] = {}
    for index, ((name, module, local), found) in enumerate(zip(slots, matches)):
        cfg_reason = _prefix_reason(name, cfg_prefixes)
        exempt = layer_weight_verdict(module, local)
        if cfg_reason is not None:
            verdicts[name] = (False, cfg_reason)
        elif found is None:
            verdicts[name] = (False, f"{source}: in no group (neck or head)")
        elif found[1] != "blocks":
            role = "" if found[0] == found[1] else f" ({found[1]})"
            verdicts[name] = (False, f"{source}: {found[0]}{role}")
        elif found[2] and index > last_block:
            verdicts[name] = (False, f"{source}: {found[0]}, after the last block")
        elif exempt is not None:
            verdicts[name] = exempt
        else:
            where = f"{found[0]} {found[3]}".strip()
            verdicts[name] = (True, f"{source}: {where} ({type(module).__name__})")
    return verdicts


def _fallback(model: nn.Module, slots: Sequence[NamedSlot], why: str) -> Dict[str, Verdict]:
    cfg_prefixes = exempt_prefixes(model)
    verdicts = {}
    for name, (eligible, reason) in generic_rule(model, slots).items():
        cfg_reason = _prefix_reason(name, cfg_prefixes)
        if cfg_reason is not None:
            verdicts[name] = (False, cfg_reason)
        else:
            verdicts[name] = (eligible, f"{why}; generic rule: {reason}")
    return verdicts


def detect_timm(model: nn.Module, slots: Sequence[NamedSlot]) -> Optional[Dict[str, Verdict]]:
    """The timm detector (see the module docstring); None for other models."""
    if not is_timm_model(model):
        return None
    class_name = type(model).__name__
    group_matcher = getattr(model, "group_matcher", None)
    if class_name in families.TIMM_GROUP_MATCHERS:
        matcher: object = families.TIMM_GROUP_MATCHERS[class_name]
        source = f"family table {class_name!r}"
    elif group_matcher is None:
        return _fallback(model, slots, "timm model without group_matcher()")
    else:
        try:
            matcher = group_matcher(coarse=False)
        except (NotImplementedError, TypeError, AttributeError) as error:
            return _fallback(model, slots, f"timm group_matcher() failed ({error})")
        source = "timm group_matcher"
    matches = group_names(matcher, [name for name, _, _ in slots])
    if matches is None:
        return _fallback(model, slots, f"timm group_matcher() gave a {type(matcher).__name__}")
    verdicts = _metadata_verdicts(model, slots, matches, source)
    if not any(eligible for eligible, _ in verdicts.values()):
        return _fallback(model, slots, f"{source} left no layer weight in a block group")
    return verdicts
