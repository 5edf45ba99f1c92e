"""A plugin whose import fails, as one with a missing dependency would."""

import qsmkit_dependency_that_does_not_exist  # noqa: F401
