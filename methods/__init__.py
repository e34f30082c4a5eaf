"""Method plugins: one file per method, each registered with ``@register_method``."""
