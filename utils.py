"""The seed's shared names, importable from utils as before: the prompt templates, the special tokens, JSON I/O,
the embedded default model and the download of the original 52K data. Each lives in the package; this file names
them for the scripts and users that import utils.

    python utils.py download_alpaca_data --path alpaca_data.json
    python utils.py embedded_model_path          # converts the embedded GGUF once, prints the folder
"""

import logging

from alpaca_trainml.cli import run_fire
from alpaca_trainml.data.alpaca_data import (
    ALPACA_DATA_BLOB_SHA1,
    ALPACA_DATA_ROWS,
    ALPACA_DATA_URL,
    download_alpaca_data,
    git_blob_sha1,
    verify_alpaca_data,
)
from alpaca_trainml.data.prompts import PROMPT_DICT, format_prompt
from alpaca_trainml.data.special_tokens import (
    DEFAULT_BOS_TOKEN,
    DEFAULT_EOS_TOKEN,
    DEFAULT_PAD_TOKEN,
    DEFAULT_UNK_TOKEN,
    IGNORE_INDEX,
)
from alpaca_trainml.jsonio import atomic_write, jdump, jload
from alpaca_trainml.models import (
    DEFAULT_MODEL_MAX_LENGTH,
    EMBEDDED_MODEL,
    embedded_model_path,
    from_pretrained,
    resolve_model_path,
)

__all__ = ["IGNORE_INDEX", "DEFAULT_MODEL_MAX_LENGTH", "DEFAULT_PAD_TOKEN", "DEFAULT_EOS_TOKEN", "DEFAULT_BOS_TOKEN"]
__all__ += ["DEFAULT_UNK_TOKEN", "PROMPT_DICT", "format_prompt", "jload", "jdump", "atomic_write"]
__all__ += ["ALPACA_DATA_URL", "ALPACA_DATA_BLOB_SHA1", "ALPACA_DATA_ROWS", "git_blob_sha1", "verify_alpaca_data"]
__all__ += ["download_alpaca_data", "EMBEDDED_MODEL", "embedded_model_path", "resolve_model_path", "from_pretrained"]

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    run_fire({"download_alpaca_data": download_alpaca_data, "embedded_model_path": embedded_model_path}, "utils.py")
