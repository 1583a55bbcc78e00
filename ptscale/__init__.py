"""ptscale: prefix-tuned PEFT (PT-PEFT) under DeepSpeed ZeRO-3. ``ptscale.from_pretrained(EXPORT_DIR)`` loads an
export (README "Exporting"); importing ``ptscale`` itself stays light (torch and transformers load on first use)."""

from ptscale.version import __version__


def from_pretrained(path, **kwargs):
    """See :func:`ptscale.hub.from_pretrained`."""
    from ptscale.hub import from_pretrained as load

    return load(path, **kwargs)


__all__ = ["__version__", "from_pretrained"]
