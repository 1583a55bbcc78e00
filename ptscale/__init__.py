"""ptscale: prefix-tuned PEFT of vision-language models. ``ptscale.from_pretrained(EXPORT_DIR)`` loads an export
(README "Exporting"); importing ``ptscale`` itself stays light (torch and transformers load on first use)."""


def from_pretrained(path, **kwargs):
    """See :func:`ptscale.hub.from_pretrained`."""
    from ptscale.hub import from_pretrained as load

    return load(path, **kwargs)


__all__ = ["from_pretrained"]
