"""Training recipes (YAML), installed as `cocord_fast.configs` so the demo finds its own."""
from pathlib import Path

ROOT = Path(__file__).resolve().parent
