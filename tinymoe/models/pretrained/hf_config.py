"""Reading a Hugging Face config.json: the keys a model needs, and the options tinymoe does not
support, each refused by name rather than silently computed differently."""
from __future__ import annotations


class UnsupportedCheckpoint(ValueError):
    """A checkpoint (or a model to save) that tinymoe cannot map: the message names the
    tensor or the config option."""


def need(hf: dict, key: str, arch: str):
    """hf[key], or an error naming the key."""
    if key not in hf:
        raise UnsupportedCheckpoint(f"config.json of a {arch} has no {key!r}, which tinymoe needs")
    return hf[key]


def require(hf: dict, key: str, supported, default, arch: str, why: str):
    """hf.get(key, default), which must equal `supported`; else an error naming the option."""
    value = hf.get(key, default)
    if value != supported:
        raise UnsupportedCheckpoint(f"config.json: {key}={value!r} is not supported by tinymoe's "
                                    f"{arch} ({why}); supported: {supported!r}")
    return value


def refuse(owner: str, option: str, value, arch: str, supported):
    """An error for a tinymoe config option that `arch` cannot express (saving)."""
    return UnsupportedCheckpoint(f"save_pretrained: {owner} {option}={value!r} has no equivalent "
                                 f"in {arch}; it needs {option}={supported!r}")
