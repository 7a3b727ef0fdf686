"""Language models, built by name: build_model("gpt" | "moe-gpt" | ..., **config)."""
from .gpt import GPT, GPTConfig
from .hybrid import HybridConfig, HybridLM
from .mamba import MambaConfig, MambaLM
from .pretrained import from_pretrained, save_pretrained
from .saved import load_model

# name -> (model class, config class, defaults that make the variant)
MODELS = {
    "gpt": (GPT, GPTConfig, {"num_experts": 0}),
    # 8 experts of width 256, 2 active: the same FFN FLOPs per token as gpt's width 512
    "moe-gpt": (GPT, GPTConfig, {"num_experts": 8, "top_k": 2, "d_ff": 256}),
    "mamba": (MambaLM, MambaConfig, {}),
    "hybrid": (HybridLM, HybridConfig, {}),
}


def build_model(name: str, **config):
    """A model by name; keyword arguments override the config's fields."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(MODELS)}")
    cls, config_cls, defaults = MODELS[name]
    fields = config_cls.__dataclass_fields__
    unknown = [k for k in config if k not in fields]
    if unknown:
        raise TypeError(f"build_model({name!r}): unknown config fields {unknown}; "
                        f"valid: {', '.join(fields)}")
    return cls(config_cls(**{**defaults, **config}))


__all__ = ["GPT", "GPTConfig", "MambaLM", "MambaConfig", "HybridLM", "HybridConfig", "MODELS",
           "build_model", "load_model", "from_pretrained", "save_pretrained"]
