"""Pie for Python: a programmable LLM serving system.

Layers (top to bottom): server/ → runtime/ (wasm inferlets) → control/ (pages, batching)
→ engine/ (torch model). See docs/structures.md.
"""

__version__ = "0.1.0"
