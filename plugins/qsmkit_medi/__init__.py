"""Built-in plugin qsmkit_medi (being written)."""

from qsmkit import hookimpl


@hookimpl
def qsmkit_register_stages(registry):
    pass
