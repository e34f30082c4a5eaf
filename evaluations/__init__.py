"""Evaluation plugins: each module registers itself with ``@register_evaluation(name, ConfigClass)``.

``features.py`` holds what they share (eval transform, ImageFolder loading, feature pooling and extraction).
Modules are imported by the registry on first use, never here, so importing the package stays cheap.
"""
