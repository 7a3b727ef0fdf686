"""Where a model folder comes from: a local path (no network), or a Hugging Face Hub repo id
downloaded through huggingface_hub (the `hub` extra); and its tokenizer, through `tokenizers`."""
from __future__ import annotations

import re
from pathlib import Path

REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
# what from_pretrained reads: never *.bin / *.pt (pickles) or code
FILES = ["config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer.json",
         "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"]


def resolve_folder(path_or_repo_id) -> Path:
    """A local folder as is; a repo id ("owner/name") downloaded once into the Hub's cache."""
    path = Path(path_or_repo_id).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"from_pretrained: {path} is a file; give the model's folder "
                         f"(config.json and model.safetensors)")
    text = str(path_or_repo_id)
    if not REPO_ID.match(text) or text.startswith("."):
        raise FileNotFoundError(f"from_pretrained: no folder {text} (and it is not a Hub repo id "
                                f"such as state-spaces/mamba-130m-hf)")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise RuntimeError(f"from_pretrained: {text} is not a local folder, and downloading it "
                           f"from the Hugging Face Hub needs huggingface_hub: "
                           f"pip install -e '.[hub]'") from None
    return Path(snapshot_download(text, allow_patterns=FILES))


class HubTokenizer:
    """The model's own tokenizer (tokenizer.json), with tinymoe.data's encode/decode shape:
    encode(str) -> (n,) int64 ids, decode(ids) -> str."""

    def __init__(self, path: Path):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise RuntimeError(f"{path} needs the tokenizers package: pip install -e '.[hub]'") from None
        self.tokenizer = Tokenizer.from_file(str(path))

    def encode(self, text: str):
        import numpy as np
        return np.array(self.tokenizer.encode(text).ids, dtype=np.int64)

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids])


def load_tokenizer(path_or_repo_id):
    """The folder's tokenizer.json as a HubTokenizer, or None when the folder has none."""
    path = resolve_folder(path_or_repo_id) / "tokenizer.json"
    return HubTokenizer(path) if path.exists() else None
