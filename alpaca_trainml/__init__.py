"""The machinery behind the Alpaca scripts, by concern: data/, training/, generation/, self_instruct/, evaluation/.

The scripts at the repository root (train.py, serve.py, ...) are thin entry points over this package; the package
never imports them.
"""

from pathlib import Path

# The files a user reads and edits sit at the repository root, beside this package: prompt.txt, seed_tasks.jsonl,
# front-end/, data/. The package runs from a checkout (`pip install -e .`), so they are found from here.
REPO_ROOT = Path(__file__).resolve().parents[1]
